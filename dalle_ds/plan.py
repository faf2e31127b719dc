"""`dalle-ds plan`: will the prior fit, and what crosses the network, before renting the cluster.

    dalle-ds plan --preset 12b --hostfile hostfiles/v100 [--ds-config FILE] [--json FILE]

Builds the prior on the meta device (no memory), counts its parameters exactly, and prints per-GPU memory
for parameters, gradients, optimizer state and activations (with and without activation checkpointing)
under the ZeRO config, next to DeepSpeed's own ZeRO-3 estimator; the bytes each node sends to the others
per step uncompressed, with PowerSGD at the paper's rank (896 per node = 112 per GPU, PAPER §5.3) and with
1-bit sign compression; and whether it fits a 16 GB V100.

Accounting (bytes per parameter; N = all GPUs, n = GPUs per node, b = micro-batch, s = sequence, d = width):
  * ZeRO-3 model states per GPU: 16-bit parameter shard 2/N, 16-bit gradient shard 2/N, fp32 gradient
    copy made for the optimizer step 4/N, fp32 master 4/N, Adam m and v 8/N (DeepSpeed keeps the moments in
    fp32; the paper's 16-bit moments are not available there). With ZeRO++ hpZ a secondary 16-bit
    parameter shard of 2/hpz is added. Working set: the largest layer gathered (fp16), prefetch buckets.
  * Activations (Korthikanti et al. 2022, no tensor parallelism, memory-efficient attention): 34·s·b·d
    bytes per layer stored in 16 bit; a dense attention-score matrix adds 5·heads·s²·b bytes per layer.
    With checkpointing of every layer only each layer's fp32 stream input is kept (4·s·b·d) plus one layer
    recomputed at a time. Logits are fp32 (s·b·V·4, times 3 for logits, softmax and gradient).
  * Inter-node traffic per step and node: a ring all-reduce between the nodes of each GPU's gradient shard
    moves 2·(M−1)/M of it out of the node (M nodes). PowerSGD factorises each GPU's shard (a × c) of every
    16-bit weight matrix into P (a × r) and Q (c × r), r = 112, both all-reduced in 16 bit; embeddings,
    gains, biases and the output head go uncompressed in fp32 (PAPER §4.3, §5.3). 1-bit sends one sign bit
    per element plus one fp32 scale per tensor.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dalle_ds.config import ConfigError, get_preset

GiB = 1024 ** 3
V100_BYTES = 16 * 1000 ** 3        # "16 GB": 16e9 bytes (~14.9 GiB)
CUDA_RESERVED = int(1.0 * GiB)     # CUDA context, NCCL buffers, allocator fragmentation (assumed)
POWERSGD_RANK_PER_NODE = 896       # PAPER §5.3, Table 1 (12B): 112 per GPU x 8


def read_hostfile(path: str | Path) -> list[int]:
    """Slots per host, through DeepSpeed's own hostfile parser."""
    from deepspeed.launcher.runner import fetch_hostfile  # noqa: PLC0415

    if not Path(path).exists():
        raise ConfigError(f"--hostfile: {path} does not exist")
    hosts = fetch_hostfile(str(path))
    if not hosts:
        raise ConfigError(f"--hostfile: {path} lists no `host slots=N` lines")
    return list(hosts.values())


def meta_prior(preset: str, overrides: list[str] | None = None):
    from dalle_ds.config import apply_overrides  # noqa: PLC0415
    from dalle_ds.prior.model import Prior  # noqa: PLC0415

    cfg = apply_overrides(get_preset(preset), overrides or [])
    with torch.device("meta"):
        return Prior(cfg.prior), cfg


def _is_16bit(name: str, p: torch.nn.Parameter) -> bool:
    """The paper's split: resblock weight matrices in 16 bit; gains, biases, embeddings, head in fp32."""
    return p.dim() == 2 and name.startswith("blocks.")


def _shard_shape(name: str, shape: tuple[int, int], n: int) -> tuple[int, int]:
    """The per-GPU shard of a torch (out, in) weight. PAPER §5.3 shards "axis 1 for everything except the
    second MLP matrix" in its (in, out) storage, i.e. the output axis here, except mlp_branch.proj, whose
    input axis (the 4d one) is split. Both keep each shard's shorter side short, which keeps P and Q small."""
    out, inp = shape
    return (out, inp // n) if name.endswith("mlp_branch.proj.weight") else (out // n, inp)


def plan(preset: str = "12b", hostfile: str | Path = "hostfiles/v100", ds_config: dict | None = None,
         micro_batch: int | None = None, overrides: list[str] | None = None) -> dict:
    model, cfg = meta_prior(preset, overrides)
    slots = read_hostfile(hostfile)
    nodes, per_node = len(slots), max(slots)
    N = sum(slots)
    ds = ds_config or {}
    zero = ds.get("zero_optimization", {})
    stage = int(zero.get("stage", 3))
    hpz = int(zero.get("zero_hpz_partition_size", 1))
    b = int(micro_batch or ds.get("train_micro_batch_size_per_gpu", 1))
    p = cfg.prior
    s, d, L, H = p.seq_len, p.d_model, p.n_layers, p.n_heads
    V = model.text_vocab + model.image_vocab

    named = list(model.named_parameters())
    total = sum(t.numel() for _, t in named)
    p16 = sum(t.numel() for n, t in named if _is_16bit(n, t))
    p32 = total - p16
    resblock = sum(t.numel() for n, t in named if n.startswith("blocks."))
    largest_layer = max(sum(t.numel() for t in m.parameters(recurse=False)) for m in model.modules())

    shard = {0: 1, 1: 1, 2: 1, 3: N}[stage]           # parameters are sharded only by ZeRO-3
    gshard = N if stage >= 2 else 1
    oshard = N if stage >= 1 else 1
    mem = {
        "params": (2 * total) / shard + (2 * total / hpz if hpz > 1 else 0),
        "grads": (2 * total) / gshard,
        "optimizer": (12 * total + 4 * total) / oshard,  # fp32 master + m + v, and the step's fp32 gradient
        "gathered_layer_and_buckets": 2 * largest_layer * 2
        + 2 * int(zero.get("stage3_prefetch_bucket_size", 5e7)) if stage == 3 else 0,
    }
    model_states = mem["params"] + mem["grads"] + mem["optimizer"]

    per_layer_full = 34 * s * b * d
    dense_scores = 5 * H * s * s * b
    logits = 3 * s * b * V * 4
    act = {
        "no_checkpointing": L * per_layer_full + logits,
        "no_checkpointing_dense_scores": L * (per_layer_full + dense_scores) + logits,
        "checkpoint_every_layer": L * 4 * s * b * d + per_layer_full + logits,
    }

    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs  # noqa: PLC0415

    _, ds_gpu, ds_largest = estimate_zero3_model_states_mem_needs(
        total, largest_layer, num_gpus_per_node=per_node, num_nodes=nodes, cpu_offload=False,
        cpu_offload_params=False, zero_init=True)
    ours_z3 = 20 * total / N + 4 * largest_layer  # the same terms, ZeRO-3 across all N GPUs, no hpZ

    # inter-node bytes per node per step
    M = nodes
    ring = 2 * (M - 1) / M if M > 1 else 0.0
    r = POWERSGD_RANK_PER_NODE // per_node
    unc16 = p16 * 2
    unc32 = p32 * 4
    psgd = 0
    onebit = 0
    for n, t in named:
        if not _is_16bit(n, t):
            continue
        a, c = _shard_shape(n, tuple(t.shape), per_node)
        rr = min(r, a, c)
        psgd += per_node * (a + c) * rr * 2
        onebit += t.numel() / 8 + per_node * 4
    net = {"uncompressed": ring * (unc16 + unc32), "powersgd": ring * (psgd + unc32),
           "one_bit": ring * (onebit + unc32)}

    budget = V100_BYTES - CUDA_RESERVED
    total_no_ckpt = model_states + mem["gathered_layer_and_buckets"] + act["no_checkpointing"]
    total_ckpt = model_states + mem["gathered_layer_and_buckets"] + act["checkpoint_every_layer"]
    return {
        "preset": preset, "hostfile": str(hostfile), "nodes": nodes, "gpus_per_node": per_node, "gpus": N,
        "zero_stage": stage, "hpz_partition": hpz, "micro_batch": b, "seq_len": s,
        "params": {"total": total, "resblocks": resblock, "sixteen_bit": p16, "fp32": p32,
                   "largest_layer": largest_layer, "vs_12B_total": total / 12e9 - 1,
                   "vs_12B_resblocks": resblock / 12e9 - 1},
        "per_gpu_bytes": {**mem, "model_states": model_states, "activations": act,
                          "total_no_checkpointing": total_no_ckpt, "total_checkpointing": total_ckpt},
        "deepspeed_estimator": {"gpu_model_states": ds_gpu, "largest_layer_memory": ds_largest,
                                "ours_same_terms": ours_z3, "ratio": ours_z3 / ds_gpu},
        "internode_bytes_per_node_per_step": {**net, "powersgd_rank_per_gpu": r,
                                              "powersgd_ratio": (psgd + unc32) / (unc16 + unc32),
                                              "one_bit_ratio": (onebit + unc32) / (unc16 + unc32)},
        "v100_16gb": {"budget_bytes": budget, "fits_without_checkpointing": total_no_ckpt <= budget,
                      "fits_with_checkpointing": total_ckpt <= budget},
    }


def _fmt(report: dict) -> str:
    g = lambda x: f"{x / GiB:8.2f} GiB"  # noqa: E731
    pr, m, a = report["params"], report["per_gpu_bytes"], report["per_gpu_bytes"]["activations"]
    e, net, v = report["deepspeed_estimator"], report["internode_bytes_per_node_per_step"], report["v100_16gb"]
    lines = [
        f"preset {report['preset']}: {pr['total']:,} parameters ({pr['vs_12B_total']:+.1%} vs 12.0B); "
        f"resblocks {pr['resblocks']:,} ({pr['vs_12B_resblocks']:+.1%}); 16-bit {pr['sixteen_bit']:,}, "
        f"fp32 {pr['fp32']:,}",
        f"cluster {report['nodes']} nodes x {report['gpus_per_node']} GPUs = {report['gpus']}, ZeRO-{report['zero_stage']}"
        f" (hpZ {report['hpz_partition']}), micro-batch {report['micro_batch']}, sequence {report['seq_len']}",
        "per GPU:",
        f"  parameters                   {g(m['params'])}",
        f"  gradients                    {g(m['grads'])}",
        f"  optimizer (fp32 master+m+v+grad) {g(m['optimizer'])}",
        f"  gathered layer + buckets     {g(m['gathered_layer_and_buckets'])}",
        f"  activations, no checkpointing {g(a['no_checkpointing'])} (dense scores: {g(a['no_checkpointing_dense_scores'])})",
        f"  activations, checkpointing   {g(a['checkpoint_every_layer'])}",
        f"  total without / with checkpointing {g(m['total_no_checkpointing'])} / {g(m['total_checkpointing'])}",
        f"DeepSpeed ZeRO-3 estimator (model states): {g(e['gpu_model_states'])}; ours, same terms: "
        f"{g(e['ours_same_terms'])} (ratio {e['ratio']:.3f})",
        f"between nodes, per node per step: uncompressed {g(net['uncompressed'])}, PowerSGD rank "
        f"{net['powersgd_rank_per_gpu']}/GPU {g(net['powersgd'])} ({net['powersgd_ratio']:.1%}), 1-bit "
        f"{g(net['one_bit'])} ({net['one_bit_ratio']:.1%})",
        f"fits a 16 GB V100 (budget {g(v['budget_bytes'])}): without checkpointing "
        f"{'yes' if v['fits_without_checkpointing'] else 'NO'}, with checkpointing "
        f"{'yes' if v['fits_with_checkpointing'] else 'NO'}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="12b")
    p.add_argument("--hostfile", default="hostfiles/v100")
    p.add_argument("--ds-config", default=None, help="a ds_configs/*.json (default: ZeRO-3, micro-batch 1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    args = p.parse_args(argv)
    ds = None
    if args.ds_config:
        try:
            ds = json.loads(Path(args.ds_config).read_text())
        except FileNotFoundError:
            raise ConfigError(f"--ds-config: {args.ds_config} does not exist") from None
    report = plan(args.preset, args.hostfile, ds, overrides=args.overrides)
    print(_fmt(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
