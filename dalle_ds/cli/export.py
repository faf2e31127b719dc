"""`dalle-ds export`: a consolidated model folder that loads and samples without DeepSpeed.

    dalle-ds export --run runs/prior --out runs/prior/export            # latest DeepSpeed checkpoint
    dalle-ds export --run runs/prior --out runs/prior/export-ema --ema  # the EMA weights (from prior.pt)

Writes `model.safetensors` (fp32, consolidated from the ZeRO shards with DeepSpeed's own zero_to_fp32),
`config.json` (the full experiment config the model was built from) and `tokenizer.json`.
`dalle_ds.prior.io.load_prior(folder)` and `dalle-ds sample --prior folder` read it back.
"""

from __future__ import annotations

import argparse

from dalle_ds.cli.common import existing_path, run_command
from dalle_ds.prior.io import WEIGHTS
from dalle_ds.training.export import export_run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--run", required=True, help="a train-prior --out folder (checkpoints/, config.json, tokenizer.json)"
    )
    p.add_argument("--out", required=True, help="folder to write model.safetensors, config.json, tokenizer.json")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the newest that verifies)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (from the run's prior.pt)")
    args = p.parse_args(argv)
    existing_path(args.run, "--run", kind="dir")
    out = export_run(args.run, args.out, ema=args.ema, tag=args.tag)
    print(f"export: {out}/{WEIGHTS}")


if __name__ == "__main__":
    run_command("export", main)
