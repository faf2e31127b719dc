"""`dalle-ds plan`: will the prior fit, and what crosses the network, before renting the cluster.

    dalle-ds plan --preset 12b --hostfile hostfiles/v100 [--ds-config FILE] [--json FILE]

Builds the prior on the meta device (no memory), counts its parameters exactly, and prints per-GPU memory
for parameters, gradients, optimizer state and activations (with and without activation checkpointing)
under the ZeRO config, next to DeepSpeed's own ZeRO-3 estimator, for ZeRO-3 sharded across all GPUs (the default)
or within a node (`--set prior_train.compression=powersgd|onebit|fp32`, as training shards then), with the
ds_config's offload_optimizer/offload_param taken off the GPU and counted as host memory per node; the paper's own
storage (16-bit moments, no master copy) for comparison; the bytes each node sends to the others
per step uncompressed, with PowerSGD at the paper's rank (896 per node = 112 per GPU, PAPER §5.3) and with
1-bit sign compression; and whether it fits the GPU's memory: `--gpu-memory GB`, else the hostfile's
`# gpu_memory_gb: N` line (with an optional `# gpu: NAME` label), else a 16 GB V100 (the paper's cluster).

Accounting (bytes per parameter; N = all GPUs, n = GPUs per node, b = micro-batch, s = sequence, d = width):
  * ZeRO-3 model states per GPU, S = GPUs a shard set spans (N, or n when sharded within a node): 16-bit
    parameter shard 2/S, 16-bit gradient shard 2/S, fp32 gradient copy made for the optimizer step 4/S (one
    sub-group of at most sub_group_size elements at a time), fp32 master 4/S, Adam m and v 8/S (DeepSpeed
    keeps the moments in fp32; the paper's 16-bit moments are not available there). With ZeRO++ hpZ a
    secondary 16-bit parameter shard of 2/hpz is added. offload_optimizer moves gradients, master, moments
    and the (then whole) fp32 gradient to the host, offload_param the parameter shard. Node-local with
    powersgd/onebit adds our compressors' fp32 error buffer (4 B per 16-bit parameter / n) and PowerSGD's Q,
    on the gradients' device. Working set: the largest layer gathered (fp16), prefetch buckets.
  * The paper (§4.1, §4.3, §5.1): resblock matrices' parameters, gradients (= error buffer) and Adam m, v in
    16 bit (8 B), gains, biases and embeddings in fp32 with fp32 moments (16 B), no master copy, all / n.
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

from dataclasses import dataclass
from pathlib import Path

import torch

from dalle_ds.config import ConfigError, apply_overrides, get_preset
from dalle_ds.prior.model import Prior

GiB = 1024**3
DEFAULT_GPU = (16.0, "16 GB V100")  # the paper's GPU; "16 GB" taken as 16e9 bytes (~14.9 GiB), conservative
CUDA_RESERVED = int(1.0 * GiB)  # CUDA context, NCCL buffers, allocator fragmentation (assumed)
POWERSGD_RANK_PER_NODE = 896  # PAPER §5.3, Table 1 (12B): 112 per GPU x 8


def read_hostfile(path: str | Path) -> list[int]:
    """Slots per host, through DeepSpeed's own hostfile parser."""
    from deepspeed.launcher.runner import fetch_hostfile  # noqa: PLC0415

    if not Path(path).exists():
        raise ConfigError(f"--hostfile: {path} does not exist")
    hosts = fetch_hostfile(str(path))
    if not hosts:
        raise ConfigError(f"--hostfile: {path} lists no `host slots=N` lines")
    return list(hosts.values())


def hostfile_gpu(path: str | Path) -> tuple[float | None, str | None]:
    """(GB, label) from the hostfile's `# gpu_memory_gb: N` and `# gpu: NAME` comment lines (DeepSpeed's parser
    skips comments), or None where a line is absent."""
    gb = label = None
    for line in Path(path).read_text().splitlines():
        key, _, value = line.lstrip("# ").partition(":") if line.startswith("#") else ("", "", "")
        if key.strip() == "gpu_memory_gb":
            try:
                gb = float(value)
            except ValueError:
                raise ConfigError(
                    f"--hostfile: {path}: gpu_memory_gb must be a number, got {value.strip()!r}"
                ) from None
        elif key.strip() == "gpu":
            label = value.strip()
    return gb, label


def gpu_memory(hostfile: str | Path, gb: float | None = None) -> tuple[float, str]:
    """(GB per GPU, label): the --gpu-memory argument, else the hostfile's lines, else a 16 GB V100."""
    file_gb, file_label = hostfile_gpu(hostfile)
    if gb is not None:
        if gb <= 0:
            raise ConfigError(f"--gpu-memory must be > 0 GB, got {gb}")
        return gb, f"{gb:g} GB GPU"
    if file_gb is not None:
        return file_gb, file_label or f"{file_gb:g} GB GPU"
    return DEFAULT_GPU


def meta_prior(preset: str, overrides: list[str] | None = None):
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


def _offload(zero: dict, key: str) -> str | None:
    """`cpu`/`nvme` where the ds_config's zero_optimization.<key>.device offloads, else None."""
    dev = (zero.get(key) or {}).get("device", "none")
    return dev if dev in ("cpu", "nvme") else None


def _model_states(total, p16, largest_tensor, S, zero, compressor, named, powersgd_rank, per_node):
    """Bytes per GPU of DeepSpeed's ZeRO-3 model states with the shard group of S GPUs, split into what stays
    on the GPU and what the ds_config offloads (stage3.py: with offload_optimizer the 16-bit gradient
    partition buffer, the fp32 master, Adam m and v and the fp32 gradients live on the offload device)."""
    opt_off, par_off = _offload(zero, "offload_optimizer"), _offload(zero, "offload_param")
    # the step's fp32 gradient copy is made one sub-group at a time (stage3.py _prepare_fp32_grad_for_sub_group);
    # a sub-group closes once it reaches sub_group_size elements, so it can overshoot by one tensor's shard
    # (with offload_optimizer every sub-group keeps its fp32 gradient buffer on the offload device instead)
    sub = int(zero.get("sub_group_size", 1e9))
    fp32_grad = 4 * total / S if opt_off else 4 * min(total / S, sub + largest_tensor / S)
    parts = {"params": 2 * total / S, "grads": 2 * total / S, "optimizer": 12 * total / S + fp32_grad}
    # our compressors keep an fp32 error buffer per compressed (16-bit) shard, and PowerSGD a fixed Q of
    # (row length x rank) per shard viewed as whole rows (training/node_exchange.py); on the gradient's device
    comp = 0.0
    if compressor in ("powersgd", "onebit"):
        comp = 4 * p16 / S
        if compressor == "powersgd":
            for n, t in named:
                if _is_16bit(n, t):
                    out, inp = t.shape
                    comp += 4 * inp * min(powersgd_rank, max(out // per_node, 1), inp)
    parts["compressor_state"] = comp
    where = {"params": par_off, "grads": opt_off, "optimizer": opt_off, "compressor_state": opt_off}
    gpu = {k: (0.0 if where[k] else v) for k, v in parts.items()}
    off = {"cpu": 0.0, "nvme": 0.0}
    for k, v in parts.items():
        if where[k]:
            off[where[k]] += v
    return gpu, off, parts, opt_off, par_off


@dataclass
class _Counts:
    """Exact parameter counts of the meta-device prior, split the way the accounting needs them."""

    named: list
    total: int
    p16: int  # resblock weight matrices (16 bit in the paper)
    p32: int  # gains, biases, embeddings, head (fp32 in the paper)
    resblock: int
    largest_layer: int  # one module's own parameters, the unit ZeRO-3 gathers
    largest_tensor: int


def _count_params(model: torch.nn.Module) -> _Counts:
    named = list(model.named_parameters())
    total = sum(t.numel() for _, t in named)
    p16 = sum(t.numel() for n, t in named if _is_16bit(n, t))
    return _Counts(
        named=named,
        total=total,
        p16=p16,
        p32=total - p16,
        resblock=sum(t.numel() for n, t in named if n.startswith("blocks.")),
        largest_layer=max(sum(t.numel() for t in m.parameters(recurse=False)) for m in model.modules()),
        largest_tensor=max(t.numel() for _, t in named),
    )


def _activation_bytes(s: int, b: int, d: int, L: int, H: int, V: int) -> dict:
    """Activation bytes per GPU without checkpointing (with and without dense scores) and with every layer
    checkpointed; see the module docstring for the terms."""
    per_layer_full = 34 * s * b * d
    dense_scores = 5 * H * s * s * b
    logits = 3 * s * b * V * 4
    return {
        "no_checkpointing": L * per_layer_full + logits,
        "no_checkpointing_dense_scores": L * (per_layer_full + dense_scores) + logits,
        "checkpoint_every_layer": L * 4 * s * b * d + per_layer_full + logits,
    }


@dataclass
class _Scope:
    """What every sharding layout shares: the counts, the compressor's geometry and the memory it must fit."""

    counts: _Counts
    powersgd_rank: int
    n_local: int  # GPUs per node as training shards within it
    per_node: int  # GPUs per node in the hostfile
    working: float  # gathered layer + prefetch buckets
    act: dict
    budget: int


def _deepspeed_estimate(c: _Counts, ds_gpn: int, ds_nodes: int, opt_off, par_off) -> dict:
    """DeepSpeed's own ZeRO-3 estimator for the same layout, with and without its 1.5x host allowance."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs  # noqa: PLC0415

    kwargs = dict(
        num_gpus_per_node=ds_gpn,
        num_nodes=ds_nodes,
        cpu_offload=bool(opt_off),
        cpu_offload_params=bool(opt_off and par_off),
        zero_init=True,
    )
    ds_cpu, ds_gpu, ds_largest = estimate_zero3_model_states_mem_needs(c.total, c.largest_layer, **kwargs)
    # without its 1.5x allowance, to compare
    ds_cpu_raw, _, _ = estimate_zero3_model_states_mem_needs(
        c.total, c.largest_layer, **kwargs, additional_buffer_factor=1.0
    )
    return {"gpu_model_states": ds_gpu, "largest_layer_memory": ds_largest, "cpu": ds_cpu, "cpu_raw": ds_cpu_raw}


def _layout(sc: _Scope, S: int, compressor: str, ds_gpn: int, ds_nodes: int, zero: dict) -> dict:
    """One sharding scope: ZeRO-3 over S GPUs (S = N: all GPUs, one shard set; S = n: every node holds a
    replica). DeepSpeed's estimator sees it as ds_nodes nodes of ds_gpn GPUs."""
    c = sc.counts
    gpu, off, parts, opt_off, par_off = _model_states(
        c.total, c.p16, c.largest_tensor, S, zero, compressor, c.named, sc.powersgd_rank, sc.n_local
    )
    states = gpu["params"] + gpu["grads"] + gpu["optimizer"] + gpu["compressor_state"]
    ds = _deepspeed_estimate(c, ds_gpn, ds_nodes, opt_off, par_off)
    ours = gpu["params"] + gpu["grads"] + gpu["optimizer"] + 4 * c.largest_layer  # DeepSpeed's terms only
    host = off["cpu"] * sc.per_node  # the node's GPUs' offloads
    host_ds_terms = host - (sc.per_node * parts["compressor_state"] if opt_off == "cpu" else 0)  # ours, not DS's
    t_no, t_ck = (states + sc.working + sc.act[k] for k in ("no_checkpointing", "checkpoint_every_layer"))
    return {
        "shard_gpus": S,
        "compressor": compressor,
        "offload_optimizer": opt_off,
        "offload_param": par_off,
        "per_gpu_bytes": {
            **gpu,
            "gathered_layer_and_buckets": sc.working,
            "model_states": states,
            "total_no_checkpointing": t_no,
            "total_checkpointing": t_ck,
        },
        "offloaded_bytes_per_gpu": off,
        "host_bytes_per_node": host,
        "deepspeed_estimator": {
            "gpu_model_states": ds["gpu_model_states"],
            "largest_layer_memory": ds["largest_layer_memory"],
            "ours_same_terms": ours,
            "ratio": ours / ds["gpu_model_states"],
            "cpu_per_node": ds["cpu"],
            "cpu_per_node_no_allowance": ds["cpu_raw"],
            "host_same_terms": host_ds_terms,
            "host_ratio": host_ds_terms / ds["cpu_raw"] if ds["cpu_raw"] and host else None,
        },
        "fits_without_checkpointing": t_no <= sc.budget,
        "fits_with_checkpointing": t_ck <= sc.budget,
    }


def _layouts(sc: _Scope, zero: dict, N: int, nodes: int, compression: str) -> dict:
    """All GPUs, node-local with the configured compressor (the paper's PowerSGD when none is configured),
    and, unless the ds_config offloads already, what offloading the optimizer would do to the node-local one."""
    node_local = compression != "none"
    layouts = {
        "all_gpus": _layout(sc, N, "none", sc.per_node, nodes, zero),
        "node_local": _layout(sc, sc.n_local, compression if node_local else "powersgd", sc.n_local, 1, zero),
    }
    if not _offload(zero, "offload_optimizer"):
        offload = {**zero, "offload_optimizer": {"device": "cpu"}}
        layouts["node_local_offload"] = _layout(
            sc, sc.n_local, layouts["node_local"]["compressor"], sc.n_local, 1, offload
        )
    return layouts


def _apply_zero_stage(sel: dict, sc: _Scope, stage: int, hpz: int, N: int) -> None:
    """Adjusts the selected layout in place for ZeRO stages below 3 and for ZeRO++ hpZ, and re-judges its fit."""
    total = sc.counts.total
    mem = sel["per_gpu_bytes"]
    if stage != 3:  # ZeRO-0/1/2: parameters replicated, gradients (stage 2) and optimizer state sharded over N
        gshard, oshard = (N if stage >= 2 else 1), (N if stage >= 1 else 1)
        mem.update(grads=2 * total / gshard, optimizer=16 * total / oshard, params=2 * total)
    if hpz > 1:  # ZeRO++ hpZ: a secondary 16-bit parameter shard within groups of hpz GPUs
        mem["params"] += 2 * total / hpz
    model_states = mem["params"] + mem["grads"] + mem["optimizer"] + mem["compressor_state"]
    mem.update(
        model_states=model_states,
        total_no_checkpointing=model_states + sc.working + sc.act["no_checkpointing"],
        total_checkpointing=model_states + sc.working + sc.act["checkpoint_every_layer"],
    )
    sel.update(
        fits_without_checkpointing=mem["total_no_checkpointing"] <= sc.budget,
        fits_with_checkpointing=mem["total_checkpointing"] <= sc.budget,
    )


def _paper_storage(sc: _Scope) -> dict:
    """PAPER §4.1, §4.3, §5.1: 16-bit parameters, gradients (the PowerSGD error buffer, §5.4) and Adam m, v
    for resblock matrices, fp32 for gains, biases, embeddings; no fp32 master copy; sharded over a node."""
    p16, p32, n_local = sc.counts.p16, sc.counts.p32, sc.n_local
    paper = {
        "params": (2 * p16 + 4 * p32) / n_local,
        "grads": (2 * p16 + 4 * p32) / n_local,
        "adam_moments": (4 * p16 + 8 * p32) / n_local,
    }
    paper["model_states"] = sum(paper.values())
    paper["total_no_checkpointing"] = paper["model_states"] + sc.working + sc.act["no_checkpointing"]
    paper["total_checkpointing"] = paper["model_states"] + sc.working + sc.act["checkpoint_every_layer"]
    return {
        "per_gpu_bytes": paper,
        "shard_gpus": n_local,
        "fits_without_checkpointing": paper["total_no_checkpointing"] <= sc.budget,
        "fits_with_checkpointing": paper["total_checkpointing"] <= sc.budget,
    }


def _internode_traffic(c: _Counts, nodes: int, per_node: int) -> dict:
    """Inter-node bytes per node per step: uncompressed, PowerSGD at the paper's rank, 1-bit."""
    M = nodes
    ring = 2 * (M - 1) / M if M > 1 else 0.0
    r = POWERSGD_RANK_PER_NODE // per_node
    unc16 = c.p16 * 2
    unc32 = c.p32 * 4
    psgd = 0
    onebit = 0
    for n, t in c.named:
        if not _is_16bit(n, t):
            continue
        a, cols = _shard_shape(n, tuple(t.shape), per_node)
        rr = min(r, a, cols)
        psgd += per_node * (a + cols) * rr * 2
        onebit += t.numel() / 8 + per_node * 4
    return {
        "uncompressed": ring * (unc16 + unc32),
        "powersgd": ring * (psgd + unc32),
        "one_bit": ring * (onebit + unc32),
        "powersgd_rank_per_gpu": r,
        "powersgd_ratio": (psgd + unc32) / (unc16 + unc32),
        "one_bit_ratio": (onebit + unc32) / (unc16 + unc32),
    }


def _working_set(zero: dict, stage: int, largest_layer: int) -> float:
    """ZeRO-3's transient GPU memory: the largest layer gathered in fp16 (and its gradient) plus prefetch buckets."""
    return (2 * largest_layer * 2 + 2 * int(zero.get("stage3_prefetch_bucket_size", 5e7))) if stage == 3 else 0


def _fit_verdict(gpu_label: str, gpu_gb: float, budget: int, sel: dict) -> dict:
    """Whether the configured layout fits one GPU, without and with activation checkpointing."""
    return {
        "label": gpu_label,
        "bytes": int(gpu_gb * 1000**3),
        "budget_bytes": budget,
        "fits_without_checkpointing": sel["fits_without_checkpointing"],
        "fits_with_checkpointing": sel["fits_with_checkpointing"],
    }


def _params_summary(c: _Counts) -> dict:
    return {
        "total": c.total,
        "resblocks": c.resblock,
        "sixteen_bit": c.p16,
        "fp32": c.p32,
        "largest_layer": c.largest_layer,
        "largest_tensor": c.largest_tensor,
        "vs_12B_total": c.total / 12e9 - 1,
        "vs_12B_resblocks": c.resblock / 12e9 - 1,
    }


def plan(
    preset: str = "12b",
    hostfile: str | Path = "hostfiles/v100",
    ds_config: dict | None = None,
    micro_batch: int | None = None,
    overrides: list[str] | None = None,
    gpu_memory_gb: float | None = None,
) -> dict:
    model, cfg = meta_prior(preset, overrides)
    slots = read_hostfile(hostfile)
    gpu_gb, gpu_label = gpu_memory(hostfile, gpu_memory_gb)
    nodes, per_node, N = len(slots), max(slots), sum(slots)
    ds = ds_config or {}
    zero = ds.get("zero_optimization", {})
    stage = int(zero.get("stage", 3))
    hpz = int(zero.get("zero_hpz_partition_size", 1))
    b = int(micro_batch or ds.get("train_micro_batch_size_per_gpu", 1))
    p, pt = cfg.prior, cfg.prior_train
    # prior_train.compression other than none makes ZeRO-3's data-parallel group the node (NodeMPU)
    node_local = pt.compression != "none"
    counts = _count_params(model)
    sc = _Scope(
        counts=counts,
        powersgd_rank=pt.powersgd_rank,
        n_local=pt.ranks_per_node or per_node,
        per_node=per_node,
        working=_working_set(zero, stage, counts.largest_layer),
        act=_activation_bytes(p.seq_len, b, p.d_model, p.n_layers, p.n_heads, model.text_vocab + model.image_vocab),
        budget=int(gpu_gb * 1000**3) - CUDA_RESERVED,
    )
    layouts = _layouts(sc, zero, N, nodes, pt.compression)
    sel = layouts["node_local" if node_local else "all_gpus"]
    _apply_zero_stage(sel, sc, stage, hpz, N)
    mem = sel["per_gpu_bytes"]
    return {
        "preset": preset,
        "hostfile": str(hostfile),
        "nodes": nodes,
        "gpus_per_node": per_node,
        "gpus": N,
        "zero_stage": stage,
        "hpz_partition": hpz,
        "micro_batch": b,
        "seq_len": p.seq_len,
        "layout": "node_local" if node_local else "all_gpus",
        "compression": pt.compression,
        "shard_gpus": sel["shard_gpus"],
        "offload": {"optimizer": sel["offload_optimizer"], "params": sel["offload_param"]},
        "params": _params_summary(counts),
        "per_gpu_bytes": {**mem, "activations": sc.act},
        "host_bytes_per_node": sel["host_bytes_per_node"],
        "offloaded_bytes_per_gpu": sel["offloaded_bytes_per_gpu"],
        "deepspeed_estimator": sel["deepspeed_estimator"],
        "layouts": layouts,
        "paper_storage": _paper_storage(sc),
        "internode_bytes_per_node_per_step": _internode_traffic(counts, nodes, per_node),
        "gpu_memory": _fit_verdict(gpu_label, gpu_gb, sc.budget, sel),
    }


def _yn(ok: bool) -> str:
    return "yes" if ok else "NO"


def _gib(x: float) -> str:
    return f"{x / GiB:8.2f} GiB"


def _header_lines(report: dict) -> list[str]:
    """The parameter count and the cluster."""
    pr = report["params"]
    return [
        f"preset {report['preset']}: {pr['total']:,} parameters ({pr['vs_12B_total']:+.1%} vs 12.0B); "
        f"resblocks {pr['resblocks']:,} ({pr['vs_12B_resblocks']:+.1%}); 16-bit {pr['sixteen_bit']:,}, "
        f"fp32 {pr['fp32']:,}",
        f"cluster {report['nodes']} nodes x {report['gpus_per_node']} GPUs = {report['gpus']}, "
        f"ZeRO-{report['zero_stage']} (hpZ {report['hpz_partition']}), micro-batch {report['micro_batch']}, "
        + f"sequence {report['seq_len']}",
    ]


def _memory_lines(report: dict) -> list[str]:
    """Per-GPU memory of the configured layout, term by term."""
    g, m, a, off = _gib, report["per_gpu_bytes"], report["per_gpu_bytes"]["activations"], report["offload"]
    where = lambda k: f" [offloaded to {off[k]}]" if off[k] else ""  # noqa: E731
    scope = (
        f"within each node ({report['shard_gpus']} GPUs; compression {report['compression']})"
        if report["layout"] == "node_local"
        else f"across all {report['shard_gpus']} GPUs"
    )
    lines = [
        f"per GPU, ZeRO-3 sharded {scope}:",
        f"  parameters                   {g(m['params'])}{where('params')}",
        f"  gradients                    {g(m['grads'])}{where('optimizer')}",
        f"  optimizer (fp32 master+m+v+grad) {g(m['optimizer'])}{where('optimizer')}",
    ]
    if m["compressor_state"] or report["layout"] == "node_local":
        lines.append(f"  compressor state (fp32 error, Q) {g(m['compressor_state'])}{where('optimizer')}")
    return lines + [
        f"  gathered layer + buckets     {g(m['gathered_layer_and_buckets'])}",
        f"  activations, no checkpointing {g(a['no_checkpointing'])} "
        f"(dense scores: {g(a['no_checkpointing_dense_scores'])})",
        f"  activations, checkpointing   {g(a['checkpoint_every_layer'])}",
        f"  total without / with checkpointing {g(m['total_no_checkpointing'])} / {g(m['total_checkpointing'])}",
    ]


def _comparison_lines(report: dict) -> list[str]:
    """Host memory for offloads, DeepSpeed's estimator, the paper's storage and the inter-node traffic."""
    g, e, pa = _gib, report["deepspeed_estimator"], report["paper_storage"]
    net, off = report["internode_bytes_per_node_per_step"], report["offload"]
    lines = []
    if off["optimizer"] or off["params"]:
        lines.append(
            f"host memory per node for offloaded states: {g(report['host_bytes_per_node'])}; DeepSpeed "
            f"estimator {g(e['cpu_per_node'])} with its 1.5x allowance, ours/its terms without it "
            f"{e['host_ratio']:.3f}"
        )
    return lines + [
        f"DeepSpeed ZeRO-3 estimator (model states): {g(e['gpu_model_states'])}; ours, same terms: "
        f"{g(e['ours_same_terms'])} (ratio {e['ratio']:.3f})",
        f"paper's storage (16-bit params, grads, Adam m+v; fp32 gains/biases/embeddings; no master copy; "
        f"{pa['shard_gpus']} GPUs/shard set): model states {g(pa['per_gpu_bytes']['model_states'])}, total without / "
        f"with checkpointing {g(pa['per_gpu_bytes']['total_no_checkpointing'])} / "
        f"{g(pa['per_gpu_bytes']['total_checkpointing'])}",
        f"between nodes, per node per step: uncompressed {g(net['uncompressed'])}, PowerSGD rank "
        f"{net['powersgd_rank_per_gpu']}/GPU {g(net['powersgd'])} ({net['powersgd_ratio']:.1%}), 1-bit "
        f"{g(net['one_bit'])} ({net['one_bit_ratio']:.1%})",
    ]


def _layout_fit_line(name: str, lay: dict, configured: str) -> str:
    """One layout's verdict: fits without / with checkpointing."""
    what = (
        f"ZeRO-3 across all {lay['shard_gpus']} GPUs (compression none)"
        if name == "all_gpus"
        else f"ZeRO-3 within a node, {lay['shard_gpus']} GPUs (compression {lay['compressor']})"
    )
    offl = " + ".join(f"{k} offload to {lay['offload_' + k]}" for k in ("optimizer", "param") if lay["offload_" + k])
    if name == "node_local_offload":
        offl += f" (host {_gib(lay['host_bytes_per_node']).strip()}/node)"
    mark = " <- this config" if name == configured else ""
    return (
        f"  {what}{', ' + offl if offl else ''}: {_yn(lay['fits_without_checkpointing'])} / "
        f"{_yn(lay['fits_with_checkpointing'])} ({_gib(lay['per_gpu_bytes']['total_checkpointing']).strip()}"
        f" with checkpointing){mark}"
    )


def _fit_lines(report: dict) -> list[str]:
    """Whether each layout, and the paper's storage, fits the GPU."""
    v, pa = report["gpu_memory"], report["paper_storage"]
    return [
        f"fits one {v['label']} (budget {_gib(v['budget_bytes'])}), without / with checkpointing:",
        *(_layout_fit_line(name, lay, report["layout"]) for name, lay in report["layouts"].items()),
        f"  paper's storage within a node, no offload: {_yn(pa['fits_without_checkpointing'])} / "
        f"{_yn(pa['fits_with_checkpointing'])}",
    ]


def format_report(report: dict) -> str:
    lines = _header_lines(report) + _memory_lines(report) + _comparison_lines(report) + _fit_lines(report)
    return "\n".join(lines)
