"""`dalle-ds demo`: the whole pipeline (dVAE, prior, reranker) on the built-in shapes data, judged on captions
whose colour-shape pairs the models never saw. Writes OUT/samples.png and OUT/metrics.json.
With --data FOLDER (a captioned image folder with train/ and val/, e.g. the emoji set of `make realdata`) it
runs the real-data benchmark instead (dalle_ds/demo/real.py; preset real32 unless --preset is given) and
writes OUT/recon.png, OUT/samples.png, OUT/samples_shuffled.png and OUT/metrics.json.

    dalle-ds demo --out demo_out
    dalle-ds demo --data .cache/emoji/data32 --out realdata_out
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dalle_ds.cli.common import add_config_args, config_from_args, run_command
from dalle_ds.demo.real import run_real
from dalle_ds.demo.shapes import CANDIDATES, run_demo
from dalle_ds.training.distributed import is_main


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument(
        "--captions",
        type=int,
        default=108,
        help="held-out captions to sample (108: every held-out pair, size and position once)",
    )
    p.add_argument("--candidates", type=int, default=CANDIDATES, help="samples drawn per caption for the reranker")
    p.add_argument("--per-caption", type=int, default=1, help="samples per caption the reranker keeps")
    p.add_argument("--dvae", default=None, help="reuse this dvae.pt (same config) instead of training stage 1")
    p.add_argument("--data", default=None, help="captioned image folder: run the real-data benchmark on it")
    p.add_argument("--eval-images", type=int, default=256, help="--data: held-out pictures generated and scored")
    p.set_defaults(preset=None)  # shapes, or real32 with --data
    args = p.parse_args(argv)
    if args.data is not None:
        args.preset = args.preset or "real32"
        args.overrides = ["data.dataset=folder", f"data.path={args.data}", *args.overrides]
        metrics = run_real(config_from_args(args), args.out, num_eval=args.eval_images)
        if is_main():
            print(json.dumps(metrics, indent=2))
            print(f"\nsamples: {Path(args.out).resolve() / 'samples.png'}")
        return
    args.preset = args.preset or "shapes"
    metrics = run_demo(
        config_from_args(args),
        args.out,
        num_captions=args.captions,
        per_caption=args.per_caption,
        candidates=args.candidates,
        dvae_path=args.dvae,
    )
    if is_main():
        out = Path(args.out).resolve()
        print(json.dumps(metrics, indent=2))
        print(f"\nsamples: {out / 'samples.png'}\nmetrics: {out / 'metrics.json'}")


if __name__ == "__main__":
    run_command("demo", main)
