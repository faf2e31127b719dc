"""`dalle-ds`: one command with a subcommand per job."""
from __future__ import annotations

import argparse
import sys

from dalle_ds.config import ConfigError

COMMANDS = {
    "train-dvae": ("dalle_ds.train_dvae", "stage 1: train the discrete VAE"),
    "encode": ("dalle_ds.encode", "images -> dVAE token grids (a `datasets` dataset)"),
    "train-prior": ("dalle_ds.train_prior", "stage 2: train the transformer prior"),
    "sample": ("dalle_ds.sample", "captions -> PNG grid of generated images (--candidates/--keep rerank, "
                                  "--prime-image image-to-image)"),
    "train-clip": ("dalle_ds.train_clip", "train the small contrastive image-text model used for reranking"),
    "eval": ("dalle_ds.evaluate", "FID at blur radii 0-8, contrastive score, shapes composition accuracy"),
    "demo": ("dalle_ds.demo", "the whole pipeline on the built-in shapes data"),
    "masks": ("dalle_ds.masks_cli", "write an attention mask as .npy and/or draw it as .png"),
    "export": ("dalle_ds.export", "consolidated model folder (model.safetensors + config.json + tokenizer.json) from a train-prior run"),
    "plan": ("dalle_ds.plan", "parameter count, per-GPU memory and inter-node traffic of a preset on a hostfile"),
    "bench": ("dalle_ds.bench", "benchmarks: `bench attention --json FILE` times attention per layout and backend"),
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="dalle-ds", description="DALL·E training stack on DeepSpeed.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(f"  {k:12s} {v[1]}" for k, v in COMMANDS.items()))
    p.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    if not argv or argv[0] in ("-h", "--help"):
        p.print_help()
        sys.exit(0 if argv else 2)
    args = p.parse_args(argv[:1])
    import importlib  # noqa: PLC0415

    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        module.main(argv[1:])
    except ConfigError as e:
        print(f"dalle-ds {args.command}: config error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
