"""`dalle-ds train-dvae`: stage 1, the discrete VAE under a DeepSpeed engine (PAPER §1).

    dalle-ds train-dvae --preset shapes --out runs/dvae
    dalle-ds train-dvae --preset small --out runs/dvae --set data.dataset=webdataset \
        --set "data.path=/data/shards/*.tar" --set data.streaming=true   # larger than memory, resumable
    deepspeed --num_gpus 2 dalle_ds/train_dvae.py --preset small --ds-config ds_configs/cpu_zero3_fp32.json \
        --out runs/dvae
"""

from __future__ import annotations

import argparse

from dalle_ds.cli.common import add_config_args, run_command, training_config
from dalle_ds.dvae.train import train_dvae
from dalle_ds.training.distributed import is_main, shutdown_distributed
from dalle_ds.training.loop import exit_if_interrupted


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, ds_default="device")
    p.add_argument("--out", required=True, help="run folder: checkpoints/, metrics.jsonl, dvae.pt")
    p.add_argument("--no-resume", action="store_true", help="start over even if out/checkpoints exists")
    p.add_argument("--stop-at", type=int, default=None, help="save and exit after this step (resume later)")
    args = p.parse_args(argv)
    cfg = training_config(args)
    summary = train_dvae(
        cfg,
        ds_config=args.ds_config,
        out_dir=args.out,
        resume=not args.no_resume,
        stop_at=args.stop_at,
    )
    exit_if_interrupted(summary, "dVAE")
    if is_main():
        print(f"dVAE: {summary['step']} steps, recon PSNR {summary['recon_psnr']:.2f} dB -> {summary['path']}")
    shutdown_distributed()


if __name__ == "__main__":
    run_command("train-dvae", main)
