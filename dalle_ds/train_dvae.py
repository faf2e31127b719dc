"""Launcher path: `deepspeed [--hostfile F] dalle_ds/train_dvae.py ...` runs `dalle-ds train-dvae`."""

from dalle_ds.cli.common import run_command
from dalle_ds.cli.train_dvae import main

if __name__ == "__main__":
    run_command("train-dvae", main)
