"""`dalle-ds gpu-check` (`make gpu-check`): kernel accuracy, two short training runs and attention timing on
one GPU in about 8 minutes, written to one JSON (what runs and why: dalle_ds/gpu_check.py). Without a CUDA
GPU it refuses with one line and exit code 2.

    dalle-ds gpu-check [--json bench_results/gpu_check.json] [--steps 300] [--budget-s 480]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dalle_ds.cli.common import run_command
from dalle_ds.gpu_check import GPU_LAYOUTS, finite_json, require_gpu, run_gpu_check


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=str(Path("bench_results") / "gpu_check.json"), help="where the report goes")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of each training run (default 300)")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per attention measurement")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=480, help="skip the phases left once this many s have passed")
    p.add_argument("--layouts", nargs="+", default=list(GPU_LAYOUTS), choices=list(GPU_LAYOUTS))
    args = p.parse_args(argv)
    require_gpu()  # before anything is imported or compiled
    report = run_gpu_check(
        steps=args.steps, repeats=args.repeats, warmup=args.warmup, budget_s=args.budget_s, layouts=args.layouts
    )
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(finite_json(report), indent=1))
    print("\n".join(report["summary"]))
    print(f"{'PASSED' if report['passed'] else 'FAILED'}; wrote {path}")


if __name__ == "__main__":
    run_command("gpu-check", main)
