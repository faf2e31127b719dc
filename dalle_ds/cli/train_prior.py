"""`dalle-ds train-prior`: stage 2, the sparse-attention transformer prior over [text | image tokens] under
DeepSpeed.

dalle-ds train-prior --preset shapes --data runs/tokens --out runs/prior
deepspeed --num_gpus 2 dalle_ds/train_prior.py --preset tiny --ds-config ds_configs/cpu_zero3_fp32.json ...
deepspeed --hostfile hostfiles/v100 dalle_ds/train_prior.py --preset 12b --ds-config ds_configs/... ...
"""

from __future__ import annotations

import argparse

from dalle_ds.cli.common import add_config_args, existing_path, run_command, training_config
from dalle_ds.prior.train import train_prior
from dalle_ds.training.distributed import is_main, shutdown_distributed
from dalle_ds.training.loop import exit_if_interrupted


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, ds_default="device")
    p.add_argument("--data", required=True, help="encoded dataset folder from `dalle-ds encode`")
    p.add_argument("--out", required=True, help="run folder: checkpoints/, metrics.jsonl, tokenizer.json, prior.pt")
    p.add_argument("--tokenizer", default=None, help="use this tokenizer.json instead of training one")
    p.add_argument(
        "--dvae",
        default=None,
        help="dvae.pt the tokens were encoded with: write OUT/samples_stepN.png for fixed val captions every "
        "prior_train.eval_every steps (without it, no pictures while training)",
    )
    p.add_argument("--no-resume", action="store_true", help="start over even if out/checkpoints exists")
    p.add_argument("--stop-at", type=int, default=None, help="save and exit after this step (resume later)")
    args = p.parse_args(argv)
    cfg = training_config(args)
    existing_path(args.data, "--data", kind="dir")
    if args.tokenizer is not None:
        existing_path(args.tokenizer, "--tokenizer")
    if args.dvae is not None:
        existing_path(args.dvae, "--dvae")
    s = train_prior(
        cfg,
        ds_config=args.ds_config,
        data_dir=args.data,
        out_dir=args.out,
        tokenizer_path=args.tokenizer,
        resume=not args.no_resume,
        stop_at=args.stop_at,
        dvae_path=args.dvae,
    )
    exit_if_interrupted(s, "prior")
    if is_main():
        print(
            f"prior: {s['step']} steps, val loss text {s['val_loss_text']:.4f} image {s['val_loss_image']:.4f}"
            f" -> {s['path']}"
        )
    shutdown_distributed()


if __name__ == "__main__":
    run_command("train-prior", main)
