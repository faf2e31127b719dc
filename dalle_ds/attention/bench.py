"""Benchmarks. `dalle-ds bench attention` times masked attention per layout and backend at the paper shape.

    dalle-ds bench attention --json bench_results/attention_cpu.json              # CPU: 8 heads, batch 1, fp32
    dalle-ds bench attention --device cuda --json bench_results/attention_gpu.json  # GPU: 16 heads, batch 4, bf16

Layouts: row, column (raster order, as the mask is written), column_t (the paper's transposed column
layer: column-major order, block-diagonal), conv, causal (the dense-causal pattern through the same mask
machinery). Backends: dense (SDPA with the boolean mask, the reference), sparse (PyTorch block-gather),
triton (compiled kernels: GPU only; the interpreter is for tests), flex (torch FlexAttention with a
BlockMask built from `masks.mask_mod`: GPU only, it has no CPU backward) and sdpa_causal (SDPA
`is_causal=True`, FlashAttention on a GPU; it computes plain causal attention, a speed reference).

Every row reports forward and forward+backward milliseconds (median of --repeats; every pair is timed once
per round, interleaved, so a machine that changes speed mid-run moves all of them alike), TFLOP/s that count
only the allowed (query, key) pairs of the mask ("density-scaled": 4*B*H*D*pairs for the forward,
3.5x that for forward+backward), and the speed-up over `dense` on the same layout. sdpa_causal's
TFLOP/s count the causal pairs (its own dense work). The max |out - dense out| is reported too.

Against sdpa_causal every row reports its speed-up (fwd and fwd+bwd) and the *block-density limit*: the
speed-up a block-sparse kernel would reach if each computed 32 x 32 tile cost what a causal tile costs,
i.e. tile_density_32(causal) / tile_density_32(layout) (conv at the paper shape: 51.2% / 30.9% = 1.66x),
and the fraction of that limit reached ("% lim"). The sparse path may use other tiles (its note says which);
the limit stays defined on 32 x 32 tiles.

Where triton is among the backends, `kernel_compile` records what ptxas allocated for each Triton kernel
(registers, spills, shared memory; `kernels/aot.py`, no GPU needed): on a GPU for its own architecture in the
benchmark's dtype, on a CPU for sm90 and sm80 in bf16 (the GPU default).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dalle_ds import attention
from dalle_ds.attention import masks, sparse
from dalle_ds.attention import triton_kernels as bsa
from dalle_ds.attention.layout import block_layout, layout_on, run_in_layout_order
from dalle_ds.attention.masks import MaskSpec, dense_mask

aot = None if bsa is None else importlib.import_module("dalle_ds.kernels.aot")  # imports triton only when used

LAYOUTS = {  # name -> (mask kind, run in column-major order)
    "row": ("row", False),
    "column": ("column", False),
    "column_t": ("column", True),
    "conv": ("conv", False),
    "causal": ("causal", False),
}
BACKENDS = ("dense", "sparse", "triton", "flex", "sdpa_causal")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: list[Callable[[], None]], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Median wall time in milliseconds of each fn, timed in rounds (one call of each per round), so a
    machine that slows down or speeds up mid-run shifts every fn alike and their ratios stay fair."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    _sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            t.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def _timed_fns(fn, q0, k0, v0, g0) -> tuple[Callable[[], None], Callable[[], None]]:
    """(forward without grad, forward + backward) of fn on its own leaf copies of q, k, v."""
    q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))

    def fwd():
        with torch.no_grad():
            fn(q, k, v)

    def fwd_bwd():
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(g0)

    return fwd, fwd_bwd


def time_ms(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of fn() in milliseconds (CUDA-synchronised on a GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def flex_mask_mod(spec, permuted: bool, device: torch.device | str = "cpu"):
    """FlexAttention `mask_mod` from masks.py's definition; for the transposed column layer the same
    function over column-major positions (entry (i, j) = allowed(perm[i], perm[j]))."""
    if not permuted:
        return masks.mask_mod(spec)
    perm = masks.column_major_perm(spec.text_len, spec.grid).to(device)

    def mask_mod(b, h, q_idx, kv_idx):  # noqa: ARG001
        return masks.allowed(spec, perm[q_idx], perm[kv_idx])

    return mask_mod


def _flex_fn(spec, permuted: bool, L: int, device: torch.device, block: int):
    """A compiled flex_attention call with a BlockMask built from masks.mask_mod. None when unavailable."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: PLC0415 - optional
    except ImportError:
        return None
    block_mask = create_block_mask(
        flex_mask_mod(spec, permuted, device), B=None, H=None, Q_LEN=L, KV_LEN=L, device=device, BLOCK_SIZE=block
    )
    if block >= 128:
        compiled = torch.compile(flex_attention, dynamic=False)
        return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)
    # A BlockMask finer than 128 (the Triton backend's 64, for the same tiles): Inductor (torch 2.13) refuses a
    # mask block its kernel tile does not divide. Its default forward tile is 128 rows on A100/H100 (set 64
    # here); its one default backward config at head size 64 on H100 has 128-wide tiles, so only max-autotune,
    # which also offers 32/64 tiles, has a backward kernel for it (slower to compile).
    compiled = torch.compile(flex_attention, dynamic=False, mode="max-autotune-no-cudagraphs")
    opts = {"fwd_BLOCK_M": block, "fwd_BLOCK_N": block}
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask, kernel_options=opts)


def _backend_fn(backend: str, layout: str, spec, device: torch.device, L: int, flex_block: int):
    """(fn(q, k, v) -> out in raster order, note) or (None, reason)."""
    _, permuted = LAYOUTS[layout]
    if backend == "dense":
        return (lambda q, k, v: attention.attend(q, k, v, spec, backend="dense")), ""
    if backend == "sdpa_causal":
        return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)), "plain causal"
    if backend == "sparse":
        plan = sparse.get_plan(spec, device, permuted=permuted)
        note = f"tiles {plan.layout.block_q}x{plan.layout.block_k}"
        return _in_order(plan.layout, lambda q, k, v: sparse.block_sparse_attention(q, k, v, plan)), note
    if backend == "triton":
        if device.type != "cuda":
            return None, "compiled Triton needs a GPU (the interpreter is for tests)"
        if bsa is None or not bsa.usable():
            return None, "triton cannot run here" if bsa is None else bsa.unavailable_reason()
        lay = layout_on(spec, device, bsa.default_block(device), permuted=permuted)
        return _in_order(lay, lambda q, k, v: bsa.block_sparse_attention(q, k, v, lay)), ""
    if backend == "flex":
        if device.type != "cuda":
            return None, "FlexAttention has no backward on CPU"
        fn = _flex_fn(spec, permuted, L, device, flex_block)
        if fn is None:
            return None, "torch.nn.attention.flex_attention is unavailable"
        lay = layout_on(spec, device, 32, permuted=permuted)  # only for its permutation
        return _in_order(lay, fn), f"BlockMask {flex_block}"
    raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")


def _in_order(lay, fn):
    """fn(q, k, v) in the layout's order, wrapped to take and return raster order (the permutation is part of
    the transposed column layer's cost)."""
    return lambda q, k, v: run_in_layout_order(lay, fn, q, k, v)


def bench_attention(
    *,
    device: str = "cpu",
    dtype: str | None = None,
    heads: int | None = None,
    batch: int | None = None,
    text_len: int = 256,
    grid: int = 32,
    head_dim: int = 64,
    conv_kernel: int = 11,
    layouts: list[str] | None = None,
    backends: list[str] | None = None,
    warmup: int = 2,
    repeats: int = 5,
    flex_block: int = 128,
    log=print,
) -> dict:
    """Time every (layout, backend) pair; returns the JSON-able result (see the module docstring)."""
    dev = torch.device(device)
    on_gpu = dev.type == "cuda"
    heads = heads or (16 if on_gpu else 8)
    batch = batch or (4 if on_gpu else 1)
    dt = getattr(torch, dtype) if dtype else (torch.bfloat16 if on_gpu else torch.float32)
    layouts = layouts or list(LAYOUTS)
    backends = backends or list(BACKENDS)
    L = text_len + grid * grid
    gen = torch.Generator().manual_seed(0)
    q0, k0, v0, g0 = (torch.randn(batch, heads, L, head_dim, generator=gen).to(dev, dt) for _ in range(4))
    causal_pairs = L * (L + 1) // 2

    rows, timed = [], []  # timed: (row, fwd, fwd_bwd) of every pair that runs here
    sdpa_causal_row = None
    for name in layouts:
        kind, permuted = LAYOUTS[name]
        spec = MaskSpec(kind, text_len, grid, conv_kernel)
        pairs = int(dense_mask(spec).sum())
        tile_density = block_layout(spec, 32, permuted=permuted).density
        ref_out = None
        for backend in backends:
            if backend == "sdpa_causal" and sdpa_causal_row is not None:
                continue  # independent of the layout: timed once
            fn, note = _backend_fn(backend, name, spec, dev, L, flex_block)
            if fn is None:
                rows.append({"layout": name, "backend": backend, "skipped": note})
                continue
            with torch.no_grad():
                out = fn(q0, k0, v0)
            row = {
                "layout": "causal(is_causal)" if backend == "sdpa_causal" else name,
                "backend": backend,
                "note": note,
                "pairs": causal_pairs if backend == "sdpa_causal" else pairs,
                "tile_density_32": (
                    block_layout(MaskSpec("causal", text_len, grid, conv_kernel), 32).density
                    if backend == "sdpa_causal"
                    else tile_density
                ),
            }
            if backend == "dense":
                ref_out = out.float()
            if ref_out is not None and backend != "sdpa_causal":
                row["max_abs_diff_vs_dense"] = (out.float() - ref_out).abs().max().item()
            if backend == "sdpa_causal":
                sdpa_causal_row = row
            rows.append(row)
            timed.append((row, *_timed_fns(fn, q0, k0, v0, g0)))
    log(f"  timing {len(timed)} (layout, backend) pairs, interleaved: {warmup} warm-up + {repeats} rounds")
    fwd_ms = time_interleaved([f for _, f, _ in timed], dev, warmup, repeats)
    fb_ms = time_interleaved([fb for _, _, fb in timed], dev, warmup, repeats)
    for (row, _, _), f, fb in zip(timed, fwd_ms, fb_ms):
        n_pairs = row.pop("pairs")
        flops = 4.0 * batch * heads * head_dim * n_pairs
        row.update(
            fwd_ms=f,
            fwd_bwd_ms=fb,
            fwd_tflops=flops / f / 1e9,
            fwd_bwd_tflops=3.5 * flops / fb / 1e9,
            element_density=n_pairs / (L * L),
        )
        log(f"  {row['layout']:10s} {row['backend']:12s} fwd {f:9.2f} ms   fwd+bwd {fb:9.2f} ms")
    dense_rows = {r["layout"]: r for r in rows if r["backend"] == "dense" and "fwd_ms" in r}
    for r in rows:
        dense = dense_rows.get(r["layout"])
        if dense is not None and "fwd_ms" in r:
            r["speedup_fwd_vs_dense"] = dense["fwd_ms"] / r["fwd_ms"]
            r["speedup_fwd_bwd_vs_dense"] = dense["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    for r in rows:
        if "fwd_ms" in r and sdpa_causal_row is not None:
            r["speedup_fwd_vs_sdpa_causal"] = sdpa_causal_row["fwd_ms"] / r["fwd_ms"]
            r["speedup_fwd_bwd_vs_sdpa_causal"] = sdpa_causal_row["fwd_bwd_ms"] / r["fwd_bwd_ms"]
            # block-density limit vs sdpa_causal and the fraction of it reached (module docstring)
            limit = sdpa_causal_row["tile_density_32"] / r["tile_density_32"]
            r["density_limit_vs_sdpa_causal"] = limit
            r["fraction_of_limit_fwd"] = r["speedup_fwd_vs_sdpa_causal"] / limit
            r["fraction_of_limit_fwd_bwd"] = r["speedup_fwd_bwd_vs_sdpa_causal"] / limit
    return {
        "shape": {
            "batch": batch,
            "heads": heads,
            "text_len": text_len,
            "grid": grid,
            "seq_len": L,
            "head_dim": head_dim,
            "dtype": str(dt).replace("torch.", ""),
            "conv_kernel": conv_kernel,
        },
        "device": torch.cuda.get_device_name(dev) if on_gpu else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "warmup": warmup,
        "repeats": repeats,
        "flops_note": "TFLOP/s count only allowed (query, key) pairs: fwd 4*B*H*D*pairs, fwd+bwd 3.5x that",
        "rows": rows,
        "kernel_compile": kernel_compile_report(dev, dt) if "triton" in backends else None,
    }


def kernel_compile_report(dev: torch.device, dt: torch.dtype) -> dict:
    """{"targets", "dtype", "rows": kernels/aot.py rows} for the kernels this benchmark times (module
    docstring), or {"skipped": why} / {"error": the compile error}."""
    if bsa is None:
        return {"skipped": "dalle_ds.kernels cannot be imported (pip install -e .)"}
    if importlib.util.find_spec("triton") is None:
        return {"skipped": "the triton package is not installed"}
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        targets = (major * 10 + minor,)
        name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dt) or (
            "tf32" if bsa.dot_precision(dt) == "tf32" else "fp32"
        )
    else:
        targets, name = (90, 80), "bf16"
    try:
        rows = aot.compile_all(targets, (name,))
    except Exception as e:  # a compile error is recorded; the timings above still get written
        return {"targets": targets, "dtype": name, "error": f"{type(e).__name__}: {e}"}
    return {"targets": targets, "dtype": name, "rows": rows}


def format_table(result: dict) -> str:
    s = result["shape"]
    head = (
        f"attention at B={s['batch']} H={s['heads']} L={s['seq_len']} (T={s['text_len']} + {s['grid']}x"
        f"{s['grid']}) D={s['head_dim']} {s['dtype']} on {result['device']}, {result['threads']} threads"
    )
    cols = (
        f"{'layout':17s} {'backend':12s} {'tiles':>6s} {'fwd ms':>9s} {'f+b ms':>9s} {'fwd TF/s':>9s} "
        f"{'f+b TF/s':>9s} {'x dense':>8s} {'x dense':>8s} {'x causal':>8s} {'x causal':>8s} {'limit':>6s} "
        f"{'% lim':>6s} {'% lim':>6s} {'max|diff|':>10s}"
    )
    sub = (
        f"{'':17s} {'':12s} {'@32':>6s} {'':>9s} {'':>9s} {'':>9s} {'':>9s} {'fwd':>8s} {'f+b':>8s} {'fwd':>8s} "
        f"{'f+b':>8s} {'':>6s} {'fwd':>6s} {'f+b':>6s}"
    )
    lines = [head, cols, sub]
    for r in result["rows"]:
        if "fwd_ms" not in r:
            lines.append(f"{r['layout']:17s} {r['backend']:12s} skipped: {r['skipped']}")
            continue
        diff = r.get("max_abs_diff_vs_dense")
        lines.append(
            f"{r['layout']:17s} {r['backend']:12s} {r['tile_density_32']:6.1%} {r['fwd_ms']:9.2f} "
            f"{r['fwd_bwd_ms']:9.2f} {r['fwd_tflops']:9.4f} {r['fwd_bwd_tflops']:9.4f} "
            f"{r.get('speedup_fwd_vs_dense', math.nan):8.2f} {r.get('speedup_fwd_bwd_vs_dense', math.nan):8.2f} "
            f"{r.get('speedup_fwd_vs_sdpa_causal', math.nan):8.2f} "
            f"{r.get('speedup_fwd_bwd_vs_sdpa_causal', math.nan):8.2f} "
            f"{r.get('density_limit_vs_sdpa_causal', math.nan):6.2f} {r.get('fraction_of_limit_fwd', math.nan):6.0%} "
            f"{r.get('fraction_of_limit_fwd_bwd', math.nan):6.0%} {'' if diff is None else f'{diff:10.1e}'}"
        )
    compiled = result.get("kernel_compile")
    if compiled:
        lines.append("Triton kernels as compiled (kernels/aot.py):")
        lines.append(aot.format_table(compiled["rows"]) if "rows" in compiled else str(compiled))
    return "\n".join(lines)
