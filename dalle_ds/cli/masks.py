"""Write the (T+G², T+G²) boolean attention matrix the model uses (True = may attend; text positions first,
image positions in raster order) as .npy, and/or draw it as .png.

    dalle-ds masks --kind row --text-len 6 --grid 4 --npy row.npy --png row.png
"""

from __future__ import annotations

import argparse

from dalle_ds.attention.masks import KINDS, MaskSpec
from dalle_ds.attention.picture import mask_npy, mask_png
from dalle_ds.cli.common import run_command


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--text-len", type=int, required=True, help="T, text positions before the image")
    p.add_argument("--grid", type=int, required=True, help="G, the image is G x G tokens")
    p.add_argument("--kernel", type=int, default=11, help="conv window K (odd), default 11")
    p.add_argument("--npy", default=None, help="write the boolean matrix here")
    p.add_argument("--png", default=None, help="draw it here")
    args = p.parse_args(argv)
    if args.text_len < 0 or args.grid < 1:
        p.error("--text-len must be >= 0 and --grid >= 1")
    if not (args.npy or args.png):
        p.error("give --npy FILE and/or --png FILE")
    try:
        spec = MaskSpec(args.kind, args.text_len, args.grid, args.kernel)
    except ValueError as e:
        p.error(str(e))
    if args.npy:
        print(f"wrote {mask_npy(spec, args.npy)}")
    if args.png:
        print(f"wrote {mask_png(spec, args.png)}")


if __name__ == "__main__":
    run_command("masks", main)
