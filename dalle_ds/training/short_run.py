"""A short prior training run on synthetic tokens under one of the shipped DeepSpeed configs, reporting what a
first GPU run needs to see: loss, DeepSpeed's loss scale, skipped steps, the per-resblock scales, peak memory.

`make gpu-check` (dalle_ds/gpu_check.py) runs RUNS with the `small` prior for 300 steps on a GPU; the tests
run the same code for 3 steps of the `tiny` prior on CPU, where 16-bit configs are trained in fp32 (DeepSpeed
refuses fp16 on CPU) with everything else (ZeRO stage, scaling policy, the stages) unchanged.

The data: text ids uniform in [1, Vt) and image token j = (31 * text[j mod T] + j) mod Vi, a function of the
text the prior can learn, so the loss falls within a few hundred steps and a broken run shows.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dalle_ds import attention
from dalle_ds.config import apply_overrides, get_preset
from dalle_ds.prior.model import Prior
from dalle_ds.prior.train import block_scaler, lr_factor
from dalle_ds.resources import DS_CONFIGS
from dalle_ds.training.distributed import device, init_distributed
from dalle_ds.training.engine import build_engine, load_ds_config
from dalle_ds.training.grad_scaling import loss_scale_reader
from dalle_ds.training.loop import LoopConfig, fit
from dalle_ds.training.precision import precision_of


@dataclass(frozen=True)
class RunSpec:
    name: str
    ds_config: str  # a file in ds_configs/; its micro-batch is replaced by the run's
    grad_scaling: str = "off"  # prior_train.grad_scaling: off | pow2 | paper
    policy: str = "skip"  # prior_train.grad_scaling_policy
    min_capability: tuple[int, int] = (7, 0)  # bf16 needs sm80 (training/precision.py)


RUNS = (
    RunSpec("bf16_zero2", "gpu_zero2_bf16.json", min_capability=(8, 0)),
    # the V100 recipe: ZeRO-3, fp16 with DeepSpeed's dynamic loss scale, the paper's per-resblock scales
    RunSpec("fp16_zero3_block_scaling", "gpu_zero3_fp16_12b_v100.json", grad_scaling="paper"),
)


def run_ds_config(spec: RunSpec, micro_batch: int, on_gpu: bool) -> dict:
    """The spec's DeepSpeed config with the run's micro-batch; off a GPU without its fp16/bf16 section."""
    cfg = json.loads((DS_CONFIGS / spec.ds_config).read_text())
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = 1
    if not on_gpu:
        cfg.pop("fp16", None)
        cfg.pop("bf16", None)
    return cfg


def synthetic_tokens(prior_cfg, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(text (n, T), image (n, N)) int64: see the module docstring."""
    g = torch.Generator().manual_seed(seed)
    T, N = prior_cfg.text_len, prior_cfg.image_grid**2
    text = torch.randint(1, prior_cfg.text_vocab_size, (n, T), generator=g)
    j = torch.arange(N)
    image = (31 * text[:, j % T] + j) % prior_cfg.image_vocab_size
    return text, image


class StepRecorder:
    """A stage of the step pipeline that records, after each optimizer step, DeepSpeed's loss scale and skip
    counter and the per-resblock scales (log2)."""

    order = -1  # after_step runs in descending order: this one last, after the scaler's update

    def __init__(self, engine, scaler=None):
        self.read_scale = loss_scale_reader(engine)
        self.scaler = scaler
        self.loss_scale: list[float] = []
        self.ds_skipped: list[int] = []
        self.block_log2: list[list[float]] = []
        self.bad_steps = 0

    def before_step(self, engine, ctx) -> None:
        pass

    def after_step(self, engine, ctx) -> None:
        self.loss_scale.append(self.read_scale())
        self.ds_skipped.append(int(getattr(engine, "skipped_steps", 0)))
        if self.scaler is not None:
            self.block_log2.append([math.log2(s) for s in self.scaler.scales])
            self.bad_steps += bool(ctx.bad_blocks)


def _scale_summary(values: list[float]) -> dict:
    if not values:
        return {}
    changes = sum(a != b for a, b in zip(values, values[1:]))
    return {"initial": values[0], "final": values[-1], "min": min(values), "max": max(values), "changes": changes}


def _run_config(spec: RunSpec, preset: str, steps: int):
    """`preset` with the run's length, warmup and the spec's gradient-scaling settings."""
    return apply_overrides(
        get_preset(preset),
        [
            f"prior_train.steps={steps}",
            f"prior_train.warmup_steps={max(1, steps // 10)}",
            f"prior_train.grad_scaling={spec.grad_scaling}",
            f"prior_train.grad_scaling_policy={spec.policy}",
        ],
    )


def _build_prior_engine(cfg, ds_cfg: dict):
    t = cfg.prior_train
    torch.manual_seed(t.seed)
    return build_engine(
        Prior(cfg.prior),
        ds_cfg,
        lr=t.lr,
        betas=t.betas,
        eps=t.eps,
        weight_decay=t.weight_decay,
        lr_lambda=lambda step: lr_factor(step, t),
    )


def _timed_fit(engine, cfg, ds_cfg: dict, out_dir, steps: int, scaler, recorder: StepRecorder, on_gpu: bool):
    """Trains on the synthetic tokens; (fit's result, seconds), with the GPU's peak-memory counter reset first."""
    text, image = synthetic_tokens(cfg.prior, 512)

    def loss_fn(eng, idx, step):
        x, y = text[idx].to(device()), image[idx].to(device())
        loss, stats = eng(x, y)
        return loss, stats, x.numel() + y.numel()

    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = fit(
        engine,
        loss_fn=loss_fn,
        num_items=len(text),
        ds_cfg=ds_cfg,
        out_dir=out_dir,
        loop=LoopConfig(steps=steps, log_every=max(1, steps // 30), save_every=steps, progress=False),
        resume=False,
        grad_scaler=scaler,
        stages=[s for s in (scaler, recorder) if s is not None],
    )
    return result, time.perf_counter() - t0


def _loss_summary(history: list[dict]) -> dict:
    losses = [(h["step"], h["loss"]) for h in history]
    return {
        "losses": losses,  # (step, mean loss over the logging window)
        "loss_first": losses[0][1] if losses else None,
        "loss_last": losses[-1][1] if losses else None,
        "finite": all(math.isfinite(v) for _, v in losses),
    }


def _block_scales_summary(scaler, recorder: StepRecorder) -> dict | None:
    """The per-resblock scales (log2) over the run; None without a block scaler."""
    blocks = recorder.block_log2
    if not blocks:
        return None
    return {
        "names": scaler.names,
        "final": blocks[-1],
        "min_over_run": min(min(b) for b in blocks),
        "max_over_run": max(max(b) for b in blocks),
        "steps_with_bad_blocks": recorder.bad_steps,
        "backoffs": list(scaler.backoffs),
    }


def short_run(
    spec: RunSpec, *, out_dir: str | Path, preset: str = "small", steps: int = 300, micro_batch: int = 8
) -> dict:
    """Train `preset`'s prior for `steps` under `spec` on this machine's device; the summary (JSON-able)."""
    init_distributed()
    on_gpu = torch.cuda.is_available()
    ds_cfg = load_ds_config(run_ds_config(spec, micro_batch, on_gpu))
    cfg = _run_config(spec, preset, steps)
    engine = _build_prior_engine(cfg, ds_cfg)
    scaler = block_scaler(engine, cfg.prior_train)
    recorder = StepRecorder(engine, scaler)
    result, seconds = _timed_fit(engine, cfg, ds_cfg, out_dir, steps, scaler, recorder, on_gpu)
    backend = cfg.prior.attention_backend
    return {
        **asdict(spec),
        "preset": preset,
        "precision": precision_of(ds_cfg),
        "zero_stage": int(ds_cfg.get("zero_optimization", {}).get("stage", 0)),
        "attention_backend": attention.auto_backend() if backend == "auto" else backend,
        "steps": result.step,
        "micro_batch": micro_batch,
        "seconds": seconds,
        "s_per_step": seconds / max(result.step, 1),
        **_loss_summary(result.history),
        "loss_scale": _scale_summary(recorder.loss_scale),
        "skipped_steps": {
            "deepspeed_overflow": recorder.ds_skipped[-1] if recorder.ds_skipped else 0,
            "block_scaler": scaler.skipped if scaler is not None else 0,
        },
        "block_scales_log2": _block_scales_summary(scaler, recorder),
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if on_gpu else None,
    }
