"""Cost of one training step per preset: FLOPs counted exactly, CPU time measured, one-GPU time estimated.

    dalle-ds bench steps                                   # every preset, 1 CPU thread
    dalle-ds bench steps --preset shapes real32 --json bench_results/steps.json

One step = forward + backward of the model's own loss (`DVAE.forward`, `Prior.forward`, the functions training
calls) at the preset's batch. The batch is not in the preset: it is the DeepSpeed config the preset is run with
(`DS_CONFIGS_OF` below), micro-batch x accumulation x GPUs.

* FLOPs: `torch.utils.flop_counter.FlopCounterMode` over the models built on the `meta` device (no memory, so the
  12b preset counts in a second). It counts matmuls and convolutions (2 per multiply-add), not elementwise ops,
  norms or the optimizer. Attention is counted dense, over the whole (L, L) score matrix as SDPA with the boolean
  mask computes it (a block-sparse kernel does less), as "model FLOPs": the forward's two matmuls and the
  backward's four, no recomputation. `SDPA_FLOPS` gives every SDPA kernel that convention, so the count is the
  same on meta (math path: plain bmm) and on CPU (the fused kernel, which torch's counter does not know).
* CPU ms: median wall time of plain PyTorch steps (forward, backward, AdamW) in fp32 with the preset's own
  attention backend, after warm-up steps; skipped (None, "—" in the table) above CPU_TIMING_MAX_FLOPS.
* GPU ms: FLOPs / GPU_SUSTAINED_FLOPS, and GPU hours for the preset's dvae_train.steps + prior_train.steps.
  A lower bound on time: only large models come near the assumed utilisation.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from dalle_ds.attention.bench import time_ms
from dalle_ds.config import PRESETS, ExperimentConfig, get_preset
from dalle_ds.dvae import DVAE
from dalle_ds.dvae.schedules import dvae_schedules
from dalle_ds.prior.model import Prior
from dalle_ds.resources import DS_CONFIGS
from dalle_ds.training.engine import grad_accum, load_ds_config, micro_batch

# H100 SXM dense bf16 tensor-core peak (NVIDIA datasheet: 989 TFLOP/s; the 1,979 quoted is with 2:4 sparsity).
GPU_PEAK_FLOPS = 989e12
# Assumed model-FLOP utilisation: what well-tuned large-transformer training reaches in bf16 (roughly 35-50 %).
# Small models reach far less (kernel launches and memory traffic dominate), so their estimates are lower bounds.
GPU_UTILISATION = 0.40
GPU_SUSTAINED_FLOPS = GPU_PEAK_FLOPS * GPU_UTILISATION
# Steps above this are not timed on CPU: one core does ~40 GFLOP/s here (real64's dVAE: 3.2e10 in 0.76 s), so
# 2e11 is about 5 s a step; small (4.7e11 and 2.6e12) and the GPU presets are above it.
CPU_TIMING_MAX_FLOPS = 2e11
GPUS_12B = 128  # hostfiles/a100: 16 machines x 8 GPUs; with gpu_zero3_bf16_12b.json (4 x 2) the paper's batch 1024

# preset -> (dVAE ds_config, prior ds_config, GPUs of the prior's global batch)
DS_CONFIGS_OF = {
    "tiny": ("cpu_zero0_fp32.json", "cpu_zero0_fp32.json", 1),  # train-dvae / train-prior's CPU default
    "shapes": ("demo_dvae.json", "demo_prior.json", 1),  # `dalle-ds demo`
    "real32": ("demo_dvae.json", "demo_prior.json", 1),  # `dalle-ds demo --data` (make realdata)
    "real64": ("demo_dvae.json", "demo_prior.json", 1),
    "real256_gpu": ("gpu_zero2_bf16.json", "gpu_zero2_bf16.json", 1),  # its docstring
    "small": ("gpu_default_bf16.json", "gpu_default_bf16.json", 1),  # the sm80+ default of train-*
    "12b": ("gpu_default_bf16.json", "gpu_zero3_bf16_12b.json", GPUS_12B),  # the dVAE has no 12b config
}


def _sdpa_fwd(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)  # QK^T and PV: 4 B H Lq Lk D


def _sdpa_bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return 2 * sdpa_flop_count(q, k, v)  # dV, dP, dQ, dK; not the fused kernels' recomputation of QK^T


_aten = torch.ops.aten
SDPA_FLOPS = {  # custom_mapping of FlopCounterMode: one convention for every SDPA kernel (module docstring)
    _aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_fwd,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_bwd,
    _aten._scaled_dot_product_flash_attention_backward: _sdpa_bwd,
    _aten._scaled_dot_product_efficient_attention_backward: _sdpa_bwd,
    _aten._scaled_dot_product_cudnn_attention_backward: _sdpa_bwd,
}


def count_flops(fn: Callable[[], None]) -> int:
    """Matmul and convolution FLOPs of fn() (forward and backward), SDPA as SDPA_FLOPS counts it."""
    with FlopCounterMode(display=False, custom_mapping=SDPA_FLOPS) as counter:
        fn()
    return int(counter.get_total_flops())


def batches(name: str) -> dict:
    """The ds_configs a preset runs with and its batch per step: micro-batch x accumulation x GPUs."""
    if name not in DS_CONFIGS_OF:
        raise KeyError(f"bench steps: preset {name!r} has no ds_config pairing; add it to DS_CONFIGS_OF")
    dvae_file, prior_file, prior_gpus = DS_CONFIGS_OF[name]
    dvae_ds, prior_ds = load_ds_config(DS_CONFIGS / dvae_file), load_ds_config(DS_CONFIGS / prior_file)
    return {
        "dvae_ds_config": dvae_file,
        "prior_ds_config": prior_file,
        "prior_gpus": prior_gpus,
        "dvae_batch": micro_batch(dvae_ds) * grad_accum(dvae_ds),
        "prior_batch": micro_batch(prior_ds) * grad_accum(prior_ds) * prior_gpus,
    }


def dvae_step(model: DVAE, cfg: ExperimentConfig, batch: int) -> Callable[[], torch.Tensor]:
    """A closure: the dVAE's loss at step 0's schedule on random pixels (B, C, H, W), then backward."""
    d = cfg.dvae
    device = next(model.parameters()).device
    pixels = torch.rand(batch, d.channels, d.image_size, d.image_size, device=device)  # (B, C, H, W)
    s = dvae_schedules(0, cfg.dvae_train)

    def step() -> torch.Tensor:
        loss, _ = model(pixels, temperature=s["temperature"], kl_weight=s["kl_weight"], mse_weight=s["mse_weight"])
        loss.backward()
        return loss

    return step


def prior_step(model: Prior, cfg: ExperimentConfig, batch: int) -> Callable[[], torch.Tensor]:
    """A closure: the prior's loss on random text (B, T) and image tokens (B, N), then backward."""
    p = cfg.prior
    device = next(model.parameters()).device
    text = torch.randint(1, p.text_vocab_size, (batch, p.text_len), device=device)  # (B, T), no pads
    image = torch.randint(0, p.image_vocab_size, (batch, p.image_len), device=device)  # (B, N)

    def step() -> torch.Tensor:
        loss, _ = model(text, image)
        loss.backward()
        return loss

    return step


def build(cfg: ExperimentConfig, which: str, *, dense: bool = False) -> torch.nn.Module:
    """The dVAE or the prior of `cfg` on the current default device; `dense` switches the prior to SDPA."""
    if which == "dvae":
        return DVAE(cfg.dvae)
    return Prior(dataclasses.replace(cfg.prior, attention_backend="dense") if dense else cfg.prior)


STEPS = {"dvae": dvae_step, "prior": prior_step}


def step_flops(cfg: ExperimentConfig, which: str, batch: int, device: str = "meta") -> tuple[int, int]:
    """(FLOPs of one forward + backward, parameter count) of the dVAE or the prior, built on `device`."""
    with torch.device(device):
        model = build(cfg, which, dense=True)
        step = STEPS[which](model, cfg, batch)
    return count_flops(step), sum(p.numel() for p in model.parameters())


def cpu_step_ms(cfg: ExperimentConfig, which: str, batch: int, *, warmup: int = 2, repeats: int = 3) -> float:
    """Median ms of a plain PyTorch training step on CPU (fp32, AdamW with the preset's settings)."""
    t = cfg.dvae_train if which == "dvae" else cfg.prior_train
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build(cfg, which).train()
        opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)
        fwd_bwd = STEPS[which](model, cfg, batch)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            fwd_bwd()
            opt.step()

        return time_ms(step, torch.device("cpu"), warmup, repeats)


def bench_preset(
    name: str, *, time_cpu: bool = True, max_cpu_flops: float = CPU_TIMING_MAX_FLOPS, warmup: int = 2, repeats: int = 3
) -> dict:
    """One row of the table: batches, parameters, FLOPs, CPU ms (None when not timed), GPU estimates."""
    cfg = get_preset(name).validate()
    row = {"preset": name, **batches(name)}
    hours = 0.0
    for which, steps in (("dvae", cfg.dvae_train.steps), ("prior", cfg.prior_train.steps)):
        batch = row[f"{which}_batch"]
        flops, params = step_flops(cfg, which, batch)
        timed = time_cpu and flops <= max_cpu_flops
        row[f"{which}_params"] = params
        row[f"{which}_flops"] = flops
        row[f"{which}_steps"] = steps
        row[f"{which}_cpu_ms"] = cpu_step_ms(cfg, which, batch, warmup=warmup, repeats=repeats) if timed else None
        row[f"{which}_gpu_ms"] = flops / GPU_SUSTAINED_FLOPS * 1e3
        row[f"{which}_gpu_hours"] = flops * steps / GPU_SUSTAINED_FLOPS / 3600
        hours += row[f"{which}_gpu_hours"]
    row["gpu_hours"] = hours
    return row


def bench_steps(
    presets: list[str] | None = None,
    *,
    time_cpu: bool = True,
    threads: int = 1,
    max_cpu_flops: float = CPU_TIMING_MAX_FLOPS,
    warmup: int = 2,
    repeats: int = 3,
    log=print,
) -> dict:
    """Every preset's row (see the module docstring), with the assumptions, as a JSON-able dict."""
    presets = presets or list(PRESETS)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows = []
    try:
        for name in presets:
            rows.append(
                bench_preset(name, time_cpu=time_cpu, max_cpu_flops=max_cpu_flops, warmup=warmup, repeats=repeats)
            )
            log(f"  {name}: done")
    finally:
        torch.set_num_threads(old_threads)
    return {
        "rows": rows,
        "cpu": cpu_name(),
        "threads": threads,
        "load_avg_1min_at_start": load,
        "torch": torch.__version__,
        "warmup": warmup,
        "repeats": repeats,
        "cpu_timing_max_flops": max_cpu_flops,
        "gpu_sustained_flops": GPU_SUSTAINED_FLOPS,
        "gpu_note": (
            f"GPU ms = FLOPs / ({GPU_PEAK_FLOPS / 1e12:.0f} TFLOP/s H100 bf16 dense peak x {GPU_UTILISATION:.0%} "
            "assumed utilisation): a lower bound, small models get nowhere near it; GPU hours = dvae_train.steps "
            "+ prior_train.steps at that rate, summed over GPUs"
        ),
        "flops_note": "matmul + conv FLOPs of forward + backward; attention dense over (L, L), no recomputation",
    }


def _g(x: float | None) -> str:
    """3 significant digits, exponents short (1.24e8, 3.13e-4); "—" for None (not measured)."""
    if x is None:
        return "—"
    text = f"{x:.3g}"
    if "e" in text:
        mantissa, exp = text.split("e")
        text = f"{mantissa}e{int(exp)}"
    return text


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_table(result: dict) -> str:
    """The table `dalle-ds bench steps` prints (README's preset cost table copies it)."""
    head = (
        f"one training step (forward + backward) per preset; CPU: {result['cpu']}, {result['threads']} thread(s), "
        f"1-min load {_g(result['load_avg_1min_at_start'])}; GPU: estimated at "
        f"{result['gpu_sustained_flops'] / 1e12:.0f} TFLOP/s"
    )
    cols = (
        f"{'preset':12s} {'batch':>11s} {'FLOP / step':>19s} {'CPU ms / step':>19s} {'GPU ms / step (est.)':>21s} "
        f"{'GPU hours':>10s}"
    )
    sub = f"{'':12s} {'dVAE':>5s} {'prior':>5s} {'dVAE':>9s} {'prior':>9s} {'dVAE':>9s} {'prior':>9s} "
    sub += f"{'dVAE':>10s} {'prior':>10s} {'(est.)':>10s}"
    lines = [head, cols, sub]
    for r in result["rows"]:
        lines.append(
            f"{r['preset']:12s} {r['dvae_batch']:>5d} {r['prior_batch']:>5d} {_g(r['dvae_flops']):>9s} "
            f"{_g(r['prior_flops']):>9s} {_g(r['dvae_cpu_ms']):>9s} {_g(r['prior_cpu_ms']):>9s} "
            f"{_g(r['dvae_gpu_ms']):>10s} {_g(r['prior_gpu_ms']):>10s} {_g(r['gpu_hours']):>10s}"
        )
    lines.append(result["gpu_note"])
    return "\n".join(lines)
