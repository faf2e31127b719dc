"""Ahead-of-time compilation of the block-sparse attention kernels for chosen GPUs, without a GPU.

    from dalle_ds.kernels import aot
    rows = aot.compile_all(targets=(90, 80), dtypes=("fp16", "bf16"))

    python -m dalle_ds.kernels.aot [--targets 90,80] [--dtypes fp16,bf16] [--json]

`compile_all` compiles the forward, dK/dV and dQ kernels of `block_sparse_attention` with `triton.compile`
for each compute capability (90: H100/H200, 80: A100) and input dtype ("fp16", "bf16", "fp32" with IEEE
dots, "tf32": fp32 inputs with TF32 dots, see `dot_precision`), all the way to a cubin: Triton
ships its own `ptxas` (triton/backends/nvidia/bin), so no CUDA toolkit or GPU is needed. A compile error
raises. Each row says what ptxas allocated, for a benchmark to record in its JSON:

    {kernel, arch, dtype, n_regs, n_spills, spill_store_bytes, spill_load_bytes, shared_bytes, seconds, config}

`n_regs` and `n_spills` follow Triton's runtime `CompiledKernel.n_regs` / `.n_spills` (registers per thread;
local memory per thread in 4-byte words). Those attributes are only filled when a kernel is loaded on a
GPU, so here they are read from ptxas's verbose log, which Triton prints with TRITON_DUMP_PTXAS_LOG.

One representative config per kernel (`CONFIG`): the paper's head size 64, 64 x 64 layout blocks (the GPU
default) with tile = layout block, 4 warps, 2 stages, and the alignment hints Triton's launcher derives
for such inputs (16-byte aligned pointers, strides that are multiples of 16).
"""

from __future__ import annotations

import contextlib
import io
import re
import time

from . import block_sparse_attention as bsa

KERNELS = ("forward", "backward_dkdv", "backward_dq")  # the order of bsa._jit_kernels
CONFIG = dict(D=64, LB_M=64, LB_N=64, SPLIT_M=1, SPLIT_N=1, num_warps=4, num_stages=2)

_FLOAT_TENSORS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}  # the input dtype
_FP32_TENSORS = {"LSE", "DELTA"}
_FP32_SCALARS = {"qk_scale", "sm_scale"}
_STRIDE = re.compile(r"^s[a-z]+[zhm]$")  # sqz, skm, sdoh, ...: multiples of 16 for D = 64


def signature(fn, dtype: str) -> tuple[dict, dict]:
    """Triton types of `fn`'s arguments for `dtype` inputs ("fp16", "bf16", "fp32", "tf32"): pointers are
    `*<type>`, strides and sizes i32, scales fp32, constexprs "constexpr"; and the divisibility-by-16
    hints (pointers and strides) as ASTSource attrs."""
    sig, attrs = {}, {}
    for i, p in enumerate(fn.params):
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
        elif name in _FLOAT_TENSORS:
            sig[name] = "*fp32" if dtype == "tf32" else f"*{dtype}"
        elif name in _FP32_TENSORS:
            sig[name] = "*fp32"
        elif name == "TILE_MASKS":
            sig[name] = "*i8"
        elif name.endswith(("_INDEX", "_COUNT", "_FULL", "_MASK_ID")):
            sig[name] = "*i32"
        elif name in _FP32_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        if sig[name].startswith("*") or _STRIDE.match(name):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _ptxas_usage(log: str, kernel: str) -> dict:
    """Registers, local memory and spills from ptxas -v output."""
    regs = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or frame is None:
        raise RuntimeError(f"{kernel}: no register/spill report in the ptxas log:\n{log}")
    stack, stores, loads = (int(x) for x in frame.groups())
    return dict(n_regs=int(regs.group(1)), n_spills=stack // 4, spill_store_bytes=stores, spill_load_bytes=loads)


def compile_kernel(fn, kernel: str, arch: int, dtype: str, config: dict = CONFIG) -> dict:
    """Compile one kernel for compute capability `arch` and `dtype` inputs; the row described above."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    D = config["D"]
    constexprs = dict(
        LB_M=config["LB_M"],
        LB_N=config["LB_N"],
        D=D,
        BLOCK_D=max(16, 1 << (D - 1).bit_length()),
        PRECISION="ieee" if dtype == "fp32" else "tf32",  # 16-bit dots ignore it
        SPLIT_M=config["SPLIT_M"],
        SPLIT_N=config["SPLIT_N"],
    )
    sig, attrs = signature(fn, dtype)
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}
    log = io.StringIO()
    start = time.perf_counter()
    with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
        knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v output (captured here)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    seconds = time.perf_counter() - start
    if "cubin" not in compiled.asm:
        raise RuntimeError(f"{kernel} sm{arch} {dtype}: no cubin produced (only {sorted(compiled.asm)})")
    return dict(
        kernel=kernel,
        arch=f"sm{arch}",
        dtype=dtype,
        **_ptxas_usage(log.getvalue(), kernel),
        shared_bytes=compiled.metadata.shared,
        seconds=round(seconds, 3),
        config=dict(config),
    )


def interpreter_process() -> bool:
    """True where nothing can be compiled in this process: TRITON_INTERPRET is set, or was when
    triton.language was imported (its own `@jit` functions, tl.max, tl.sum..., are then interpreter
    functions, which the compiler cannot call)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return bsa.interpreting() or isinstance(tl.standard.max, InterpretedFunction)


def compile_all(targets=(90, 80), dtypes=("fp16", "bf16"), config: dict = CONFIG) -> list[dict]:
    """Compile every kernel for every compute capability in `targets` and dtype in `dtypes`; one row each
    (see the module docstring). In a process that interprets (`interpreter_process`, e.g. a test run
    with TRITON_INTERPRET=1) the compilation runs in a child process without TRITON_INTERPRET."""
    if interpreter_process():
        return _compile_all_in_child(targets, dtypes, config)
    fns = bsa._jit_kernels()
    return [
        compile_kernel(fn, name, arch, dtype, config)
        for arch in targets
        for dtype in dtypes
        for name, fn in zip(KERNELS, fns)
    ]


def _compile_all_in_child(targets, dtypes, config: dict) -> list[dict]:
    """`compile_all` in `python -m dalle_ds.kernels.aot --json` with TRITON_INTERPRET unset."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", __name__, "--json", "--targets", ",".join(map(str, targets))]
    cmd += ["--dtypes", ",".join(dtypes), "--config", json.dumps(config)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ahead-of-time compilation failed ({' '.join(cmd)}):\n{proc.stderr[-5000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict]) -> str:
    """The rows as a plain-text table."""
    head = f"{'kernel':14s} {'arch':5s} {'dtype':5s} {'regs':>4s} {'spills':>6s} {'smem':>6s} {'sec':>5s}"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['kernel']:14s} {r['arch']:5s} {r['dtype']:5s} {r['n_regs']:4d} {r['n_spills']:6d} "
            f"{r['shared_bytes']:6d} {r['seconds']:5.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    p = argparse.ArgumentParser(description="Compile the block-sparse attention kernels ahead of time.")
    p.add_argument("--targets", default="90,80", help="compute capabilities, comma-separated")
    p.add_argument("--dtypes", default="fp16,bf16", help="input dtypes, comma-separated")
    p.add_argument("--config", default=json.dumps(CONFIG), help="JSON config (see CONFIG)")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON line instead of a table")
    args = p.parse_args(argv)
    rows = compile_all(
        tuple(int(t) for t in args.targets.split(",")), tuple(args.dtypes.split(",")), json.loads(args.config)
    )
    print(json.dumps(rows) if args.json else format_table(rows))


if __name__ == "__main__":
    main()
