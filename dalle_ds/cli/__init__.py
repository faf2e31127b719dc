"""`dalle-ds`: one command with a subcommand per job."""

from __future__ import annotations

import argparse
import importlib
import sys

from dalle_ds.cli.common import DEBUG_FLAG, run_command

# command -> (module in dalle_ds.cli, one-line help); a module is imported only when its command runs
COMMANDS = {
    "train-dvae": ("train_dvae", "stage 1: train the discrete VAE"),
    "import-dvae": ("import_dvae", "OpenAI's released dVAE (encoder.pkl, decoder.pkl) -> dvae.pt, skipping stage 1"),
    "encode": ("encode", "images -> dVAE token grids (a `datasets` dataset)"),
    "train-prior": ("train_prior", "stage 2: train the transformer prior"),
    "sample": (
        "sample",
        "captions -> PNG grid of generated images (--candidates/--keep rerank, --prime-image image-to-image)",
    ),
    "train-clip": ("train_clip", "train the small contrastive image-text model used for reranking"),
    "eval": ("eval", "FID at blur radii 0-8, contrastive score, shapes composition accuracy"),
    "demo": ("demo", "the whole pipeline on the built-in shapes data"),
    "masks": ("masks", "write an attention mask as .npy and/or draw it as .png"),
    "export": (
        "export",
        "consolidated model folder (model.safetensors + config.json + tokenizer.json) from a train-prior run",
    ),
    "plan": ("plan", "parameter count, per-GPU memory and inter-node traffic of a preset on a hostfile"),
    "bench": ("bench", "benchmarks: `bench attention --json FILE` times attention per layout and backend"),
    "gpu-check": ("gpu_check", "on one GPU: kernel accuracy, fp16/bf16 training runs, attention timing -> one JSON"),
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if DEBUG_FLAG in argv[:1]:  # `dalle-ds --debug COMMAND ...`: run_command reads it from the command's args
        argv = argv[1:] + [DEBUG_FLAG]
    p = argparse.ArgumentParser(
        prog="dalle-ds",
        description="DALL·E training stack on DeepSpeed. A bad argument or input file prints one line and exits 2;"
        f" {DEBUG_FLAG} shows the traceback.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(f"  {k:12s} {v[1]}" for k, v in COMMANDS.items()),
    )
    p.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    if not argv or argv[0] in ("-h", "--help"):
        p.print_help()
        sys.exit(0 if argv else 2)
    args = p.parse_args(argv[:1])
    module = importlib.import_module(f"dalle_ds.cli.{COMMANDS[args.command][0]}")
    run_command(args.command, module.main, argv[1:])


if __name__ == "__main__":
    main()
