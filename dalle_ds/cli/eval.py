"""`dalle-ds eval`: judge a trained model (PAPER §7): FID at Gaussian blur radii 0, 1, 2, 4, 8 (applied to
both sides), the mean contrastive score, and for "shapes" the held-out composition accuracy with and without
reranking. Writes OUT/eval.json and OUT/fid_blur.png.

    dalle-ds eval --prior runs/prior/prior.pt --dvae runs/dvae/dvae.pt --clip runs/clip/clip.pt \
        --n 256 --candidates 8 --out runs/eval
    dalle-ds eval --real-dir real/ --fake-dir generated/ --out runs/eval   # FID of two folders

Generated images are sampled for the captions of the first --n validation pairs of the model's data; the real
side is those same validation images (the prior's preprocessing: near-centre crop, no flip).
"""

from __future__ import annotations

import argparse
import json

from dalle_ds.cli.common import add_placement_args, existing_path, run_command
from dalle_ds.config import ConfigError
from dalle_ds.eval.fid import BLUR_RADII
from dalle_ds.eval.run import evaluate


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prior", help="prior.pt")
    p.add_argument("--dvae", help="dvae.pt")
    p.add_argument("--clip", default=None, help="clip.pt: mean contrastive score and reranked composition accuracy")
    p.add_argument("--n", type=int, default=256, help="validation captions sampled for FID")
    p.add_argument("--heldout", type=int, default=64, help="shapes: held-out captions for composition accuracy")
    p.add_argument("--candidates", type=int, default=8, help="shapes: samples per held-out caption (reranked top-1)")
    p.add_argument("--radii", default=None, help="comma-separated blur radii (default 0,1,2,4,8)")
    p.add_argument("--real-dir", default=None, help="FID between two folders of images instead of a model")
    p.add_argument("--fake-dir", default=None)
    p.add_argument("--size", type=int, default=256, help="folder mode: images are centre-cropped and resized to this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for eval.json and fid_blur.png")
    add_placement_args(p)
    args = p.parse_args(argv)
    if not (args.real_dir or args.fake_dir) and not (args.prior and args.dvae):
        p.error("give --prior and --dvae, or --real-dir and --fake-dir")
    if bool(args.real_dir) != bool(args.fake_dir):
        p.error("give both --real-dir and --fake-dir")
    for name in ("n", "heldout", "candidates", "size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name}: must be >= 1, got {getattr(args, name)}")
    for name in ("prior", "dvae", "clip", "real_dir", "fake_dir"):
        if getattr(args, name):
            kind = "dir" if name.endswith("_dir") else "any" if name == "prior" else "file"
            existing_path(getattr(args, name), "--" + name.replace("_", "-"), kind=kind)
    radii = tuple(float(r) if "." in r else int(r) for r in args.radii.split(",")) if args.radii else BLUR_RADII
    r = evaluate(
        args.out,
        prior=args.prior,
        dvae=args.dvae,
        clip=args.clip,
        real_dir=args.real_dir,
        fake_dir=args.fake_dir,
        n=args.n,
        heldout=args.heldout,
        candidates=args.candidates,
        radii=radii,
        size=args.size,
        seed=args.seed,
        progress=True,
        device=args.device,
        dtype=args.dtype,
    )
    print(json.dumps(r))


if __name__ == "__main__":
    run_command("eval", main)
