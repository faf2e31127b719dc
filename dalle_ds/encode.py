"""Pre-encode a dataset to dVAE token grids for prior training.

    python -m dalle_ds.encode --dvae runs/dvae/dvae.pt --out runs/tokens
"""
from __future__ import annotations

import argparse

from dalle_ds.config import apply_overrides


def main(argv: list[str] | None = None) -> None:
    from dalle_ds.data.encode import encode_to_disk  # noqa: PLC0415
    from dalle_ds.train_dvae import load_dvae  # noqa: PLC0415

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dvae", required=True, help="dvae.pt exported by train_dvae (its config names the data)")
    p.add_argument("--out", required=True, help="folder for the encoded `datasets` DatasetDict (train, val)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="data.FIELD=VALUE",
                   help="change the data section, e.g. --set data.num_train=50000")
    args = p.parse_args(argv)
    dvae, cfg = load_dvae(args.dvae)
    if any(not o.startswith("data.") for o in args.overrides):
        p.error("encode only takes data.* overrides; the dVAE comes from its checkpoint")
    apply_overrides(cfg, args.overrides).validate()
    path = encode_to_disk(dvae, cfg, args.out)
    print(f"encoded token grids -> {path}")


if __name__ == "__main__":
    main()
