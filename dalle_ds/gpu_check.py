"""`make gpu-check`: the checks a first GPU has to pass, in one run of at most ~8 minutes, written to one JSON.

    python -m dalle_ds.cli.gpu_check --json bench_results/gpu_check.json      (dalle-ds gpu-check)

Phases, in this order (each records its seconds and peak GPU memory; once the time budget is spent the
remaining phases are skipped and say so, so a slow first compile still leaves a JSON):
  1. accuracy: the Triton kernels' out/dQ/dK/dV vs float64 at T = 256 + 32x32 = 1280 in fp16 and bf16 for
     every layout, next to SDPA's error in the same dtype (`kernels/bench_gpu.check_accuracy`); a layout
     passes where each Triton error is at most twice SDPA's (or 1e-3);
  2. training: 300 steps of the `small` prior per `training/short_run.RUNS` (bf16 ZeRO-2; fp16 ZeRO-3 with the
     paper's per-resblock scales): loss, DeepSpeed's loss scale, skipped steps, the block scales, peak memory;
  3. attention timing: forward and forward+backward of triton, FlexAttention with a BlockMask of the Triton
     backend's tile (64) and SDPA causal (`attention/bench.bench_attention`), with the issue's targets
     (`kernels/bench_gpu.targets`).
On a V100 (sm70) the Triton and Flex parts and the bf16 run are skipped with the reason (training/precision.py).
The compiled Triton kernels are cached (~/.triton/cache), so a second run spends far less time compiling.
"""

from __future__ import annotations

import importlib.metadata
import math
import tempfile
import time
from collections.abc import Callable

import torch

from dalle_ds.attention import bench
from dalle_ds.errors import ConfigError
from dalle_ds.kernels import bench_gpu
from dalle_ds.kernels import block_sparse_attention as bsa
from dalle_ds.training.short_run import RUNS, short_run

GPU_LAYOUTS = ("row", "column_t", "conv", "causal")
ACCURACY_FLOOR = 1e-3  # absolute error always accepted (fp16/bf16 rounding of O(1) outputs is ~1e-3)


def require_gpu() -> tuple[int, int]:
    """The GPU's compute capability, or a ConfigError saying why this check cannot run here."""
    if not torch.cuda.is_available():
        raise ConfigError(
            f"gpu-check needs a CUDA GPU and torch.cuda.is_available() is False here (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda}); the CPU test suite is `make test`"
        )
    return tuple(torch.cuda.get_device_capability())


def plan_phases(capability: tuple[int, int], runs) -> dict:
    """What this GPU runs: {"triton": reason or None, "flex": ..., "runs": [(spec, reason or None)], "dtype"}."""
    sm80 = tuple(capability) >= (8, 0)
    why = None if sm80 else f"sm{capability[0]}{capability[1]}: Triton 3.x has no tensor-core path below sm80"
    return {
        "triton": why,
        "flex": why,  # FlexAttention compiles through the same Triton
        "dtype": "bfloat16" if sm80 else "float16",
        "runs": [
            (s, None if tuple(capability) >= s.min_capability else f"{s.name} needs sm{s.min_capability[0]}0+")
            for s in runs
        ],
    }


def accuracy_verdicts(rows: list[dict]) -> list[str]:
    """PASS/FAIL per (layout, dtype): every Triton error (out, dQ, dK, dV) <= max(2 x SDPA's, ACCURACY_FLOOR)."""
    out = []
    for r in rows:
        ok = all(t <= max(2 * s, ACCURACY_FLOOR) for t, s in zip(r["triton"], r["sdpa"]))
        worst = max(t / max(s, 1e-12) for t, s in zip(r["triton"], r["sdpa"]))
        out.append(f"accuracy {r['layout']} {r['dtype']}: triton/sdpa error <= {worst:.2f}x {'PASS' if ok else 'FAIL'}")
    return out


def run_verdicts(runs: list[dict]) -> list[str]:
    """PASS/FAIL per training run: finite losses that fall, and under 5% of steps skipped."""
    out = []
    for r in runs:
        if "skipped" in r:
            out.append(f"run {r['name']}: skipped ({r['skipped']})")
            continue
        skipped = r["skipped_steps"]["deepspeed_overflow"] + r["skipped_steps"]["block_scaler"]
        ok = r["finite"] and r["loss_last"] < r["loss_first"] and skipped <= 0.05 * r["steps"]
        out.append(
            f"run {r['name']}: loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}, {skipped} of {r['steps']} "
            f"steps skipped, {r['s_per_step'] * 1e3:.0f} ms/step {'PASS' if ok else 'FAIL'}"
        )
    return out


def vs_references(attention: dict) -> dict:
    """Per layout, triton's forward+backward speed-up over SDPA causal and over flex (same tiles)."""
    rows = {(r["layout"], r["backend"]): r for r in attention.get("rows", []) if "fwd_bwd_ms" in r}
    sdpa = next((r for (_, b), r in rows.items() if b == "sdpa_causal"), None)
    out = {}
    for (layout, backend), r in rows.items():
        if backend != "triton":
            continue
        flex = rows.get((layout, "flex"))
        out[layout] = {
            "triton_fwd_bwd_ms": r["fwd_bwd_ms"],
            "x_vs_sdpa_causal": sdpa["fwd_bwd_ms"] / r["fwd_bwd_ms"] if sdpa else None,
            "x_vs_flex_same_tiles": flex["fwd_bwd_ms"] / r["fwd_bwd_ms"] if flex else None,
        }
    return out


def assemble(
    *, device: dict, phases: dict, accuracy: list | None, runs: list, attention: dict | None, targets: list
) -> dict:
    """The one JSON: inputs as measured plus a `summary` of PASS/FAIL lines and the overall peak memory."""
    peaks = [p.get("peak_memory_bytes") or 0 for p in phases.values()]
    peaks += [r.get("peak_memory_bytes") or 0 for r in runs]
    summary = accuracy_verdicts(accuracy or []) + run_verdicts(runs) + list(targets)
    summary += [f"phase {k}: skipped ({v['skipped']})" for k, v in phases.items() if "skipped" in v]
    return {
        "device": device,
        "phases": phases,
        "accuracy": accuracy,
        "training": runs,
        "attention": attention,
        "attention_vs_references": vs_references(attention or {}),
        "targets": targets,
        "peak_memory_bytes": max(peaks) if peaks else 0,
        "summary": summary,
        "passed": not any(line.endswith("FAIL") for line in summary),
    }


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_info(capability: tuple[int, int]) -> dict:
    return {
        "name": torch.cuda.get_device_name(),
        "capability": list(capability),
        "memory_bytes": torch.cuda.get_device_properties(0).total_memory,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "deepspeed": _version("deepspeed"),
    }


def _phase(name: str, fn: Callable[[], object], phases: dict, deadline: float, log) -> object | None:
    """Run one phase with its wall time and peak GPU memory recorded; skipped once the budget is spent."""
    if time.perf_counter() > deadline:
        phases[name] = {"skipped": "time budget spent"}
        log(f"{name}: skipped, time budget spent")
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    phases[name] = {"seconds": time.perf_counter() - t0, "peak_memory_bytes": torch.cuda.max_memory_allocated()}
    log(f"{name}: {phases[name]['seconds']:.1f} s")
    return out


def run_gpu_check(
    *, steps: int = 300, repeats: int = 10, warmup: int = 3, budget_s: float = 480, layouts=GPU_LAYOUTS, log=print
) -> dict:
    """Every phase on this GPU; the assembled report (see the module docstring)."""
    cap = require_gpu()
    plan = plan_phases(cap, RUNS)
    deadline = time.perf_counter() + budget_s
    phases: dict = {}
    dev = torch.device("cuda")

    accuracy = None
    if plan["triton"] is None:
        accuracy = _phase("accuracy", lambda: bench_gpu.check_accuracy(dev), phases, deadline, log)
    else:
        phases["accuracy"] = {"skipped": plan["triton"]}

    runs = []
    for spec, why in plan["runs"]:
        if why is not None:
            runs.append({"name": spec.name, "skipped": why})
            continue
        with tempfile.TemporaryDirectory() as tmp:
            r = _phase(
                f"train_{spec.name}", lambda s=spec, d=tmp: short_run(s, out_dir=d, steps=steps), phases, deadline, log
            )
        runs.append(r if r is not None else {"name": spec.name, "skipped": "time budget spent"})

    backends = ["dense", "sparse", "sdpa_causal"] + [b for b in ("triton", "flex") if plan[b] is None]
    attention = _phase(
        "attention_timing",
        lambda: bench.bench_attention(
            device="cuda",
            dtype=plan["dtype"],
            layouts=list(layouts),
            backends=backends,
            warmup=warmup,
            repeats=repeats,
            flex_block=bsa.default_block(dev),  # the same tiles as the Triton backend
            log=log,
        ),
        phases,
        deadline,
        log,
    )
    targets = bench_gpu.targets(attention) if attention else []
    return assemble(
        device=device_info(cap), phases=phases, accuracy=accuracy, runs=runs, attention=attention, targets=targets
    )


def finite_json(obj):
    """NaN/inf -> None, so the file is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj
