"""Pre-encode a dataset (any source in the config's data section) to dVAE token grids for prior training.

    dalle-ds encode --dvae runs/dvae/dvae.pt --out runs/tokens
    dalle-ds encode --dvae runs/dvae/dvae.pt --out runs/tokens \
        --set data.dataset=webdataset --set "data.path=/data/shards/*.tar" --set data.streaming=true
    # across ranks (separate processes or jobs; each resumes from its own progress file):
    RANK=0 WORLD_SIZE=2 dalle-ds encode ... & RANK=1 WORLD_SIZE=2 dalle-ds encode ...
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from dalle_ds.cli.common import argument, existing_path, run_command
from dalle_ds.config import ConfigError, apply_overrides
from dalle_ds.data.encode_grids import encode_to_disk
from dalle_ds.dvae.io import load_dvae


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dvae", required=True, help="dvae.pt exported by train_dvae (its config names the data)")
    p.add_argument("--out", required=True, help="folder for the encoded `datasets` DatasetDict (train, val)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="data.FIELD=VALUE",
        help="change the data section, e.g. --set data.num_train=50000",
    )
    p.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)), help="this rank (default $RANK)")
    p.add_argument(
        "--world", type=int, default=int(os.environ.get("WORLD_SIZE", 1)), help="number of ranks (default $WORLD_SIZE)"
    )
    p.add_argument("--chunk", type=int, default=4096, help="items per resumable parquet chunk")
    p.add_argument("--batch", type=int, default=256, help="images per dVAE forward")
    p.add_argument("--splits", default="train,val", help="comma-separated splits to encode")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("chunk", "batch"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name}: must be >= 1, got {getattr(args, name)}")
    with argument("--dvae"):
        dvae, cfg = load_dvae(existing_path(args.dvae, "--dvae"))
    if any(not o.startswith("data.") for o in args.overrides):
        p.error("encode only takes data.* overrides; the dVAE comes from its checkpoint")
    apply_overrides(cfg, args.overrides).validate()
    if not 0 <= args.rank < args.world:
        p.error(f"--rank {args.rank} must lie in [0, --world {args.world})")
    splits = tuple(s for s in args.splits.split(",") if s)
    path = encode_to_disk(
        dvae, cfg, args.out, splits, rank=args.rank, world=args.world, chunk=args.chunk, batch=args.batch, progress=True
    )
    report = Path(path) / "encode_report.json"
    summary = {"out": str(path), "rank": args.rank, "merged": report.exists()}
    if report.exists():
        summary["report"] = json.loads(report.read_text())
    print(json.dumps(summary))


if __name__ == "__main__":
    run_command("encode", main)
