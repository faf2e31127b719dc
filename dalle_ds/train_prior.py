"""Launcher path: `deepspeed [--hostfile F] dalle_ds/train_prior.py ...` runs `dalle-ds train-prior`."""

from dalle_ds.cli.common import run_command
from dalle_ds.cli.train_prior import main

if __name__ == "__main__":
    run_command("train-prior", main)
