"""`dalle-ds train-clip`: train the small contrastive image-text model used to rerank samples.

    dalle-ds train-clip --preset shapes --out runs/clip

Writes out/clip.pt (config + weights + tokenizer) and out/clip_metrics.json, with a progress bar. Every
clip.save_every steps it checkpoints to out/clip_ckpt/; SIGTERM or Ctrl-C saves the current step there and
exits 128 + the signal number; rerunning the same command continues exactly where it stopped.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from dalle_ds.cli.common import add_config_args, config_from_args, existing_path, run_command
from dalle_ds.rerank.train import train_clip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--out", required=True, help="run folder: clip.pt, clip_metrics.json")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json to use instead of training one")
    p.add_argument("--no-resume", action="store_true", help="start over even if out/clip_ckpt/ holds a checkpoint")
    p.add_argument("--stop-at", type=int, default=None, help="end after this step (a rerun with more continues)")
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU if visible; bf16 on sm80+) | cpu | cuda[:N]")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    if args.tokenizer is not None:
        existing_path(args.tokenizer, "--tokenizer")
    s = train_clip(
        cfg,
        args.out,
        tokenizer_path=args.tokenizer,
        resume=not args.no_resume,
        stop_at=args.stop_at,
        device=args.device,
    )
    if s.get("interrupted"):  # SIGTERM or Ctrl-C: the checkpoint is saved, clip.pt is not written
        name = signal.Signals(s["interrupted"]).name
        print(
            f"clip: {name}, checkpoint saved at step {s['step']} in {s['checkpoint']}; rerun the same command to "
            "resume",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(128 + s["interrupted"])
    print(json.dumps({k: v for k, v in s.items() if k != "history"}))


if __name__ == "__main__":
    run_command("train-clip", main)
