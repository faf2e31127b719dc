"""`dalle-ds bench`: benchmarks that print a table and write JSON.

dalle-ds bench attention [--device cuda] [--json FILE]   masked attention per layout and backend
dalle-ds bench steps [--preset P ...] [--json FILE]      FLOPs, CPU ms and estimated GPU ms of a training step
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dalle_ds import bench_steps
from dalle_ds.attention.bench import BACKENDS, LAYOUTS, bench_attention, format_table
from dalle_ds.cli.common import run_command
from dalle_ds.config import PRESETS


def write_json(result: dict, path: str) -> Path:
    """A benchmark's result as indented JSON at `path` (folders made); the path written."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return out


def attention_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(
        prog="dalle-ds bench attention",
        description="Time masked attention per layout and backend (see dalle_ds/bench.py).",
    )
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 CPU, bf16 GPU)")
    p.add_argument("--heads", type=int, default=None, help="default 8 on CPU, 16 on GPU")
    p.add_argument("--batch", type=int, default=None, help="default 1 on CPU, 4 on GPU")
    p.add_argument("--text-len", type=int, default=256)
    p.add_argument("--grid", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layouts", nargs="+", default=None, choices=list(LAYOUTS))
    p.add_argument("--backends", nargs="+", default=None, choices=list(BACKENDS))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--flex-block", type=int, default=128, help="BLOCK_SIZE of flex's BlockMask")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is visible")
    result = bench_attention(
        device=args.device,
        dtype=args.dtype,
        heads=args.heads,
        batch=args.batch,
        text_len=args.text_len,
        grid=args.grid,
        head_dim=args.head_dim,
        layouts=args.layouts,
        backends=args.backends,
        warmup=args.warmup,
        repeats=args.repeats,
        flex_block=args.flex_block,
    )
    print(format_table(result))
    if args.json:
        print(f"wrote {write_json(result, args.json)}")


def steps_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(
        prog="dalle-ds bench steps",
        description="FLOPs, CPU ms (measured) and GPU ms (estimated) of one training step per preset "
        "(see dalle_ds/bench_steps.py).",
    )
    p.add_argument("--preset", nargs="+", default=None, choices=list(PRESETS), help="default: every preset")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for the timed steps (default 1)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--cpu-max-gflop",
        type=float,
        default=bench_steps.CPU_TIMING_MAX_FLOPS / 1e9,
        help="time a model on CPU only when its step costs at most this (default %(default)g)",
    )
    p.add_argument("--no-cpu", action="store_true", help="count FLOPs only, time nothing")
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--threads and --repeats must be >= 1, --warmup >= 0")
    result = bench_steps.bench_steps(
        args.preset,
        time_cpu=not args.no_cpu,
        threads=args.threads,
        max_cpu_flops=args.cpu_max_gflop * 1e9,
        warmup=args.warmup,
        repeats=args.repeats,
    )
    print(bench_steps.format_table(result))
    if args.json:
        print(f"wrote {write_json(result, args.json)}")


SUBCOMMANDS = {"attention": attention_main, "steps": steps_main}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print("usage: dalle-ds bench {" + ",".join(SUBCOMMANDS) + "} [options]\n\n" + (__doc__ or ""))
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    SUBCOMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    run_command("bench", main)
