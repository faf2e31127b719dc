"""Sample images from captions: KV-cached decoding of the prior, rendered by the dVAE decoder.

    python -m dalle_ds.sample --prior runs/prior/prior.pt --dvae runs/dvae/dvae.pt \
        --caption "a small red triangle at the top left" --n 8 --out samples.png
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import the package, not siblings
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import json

import numpy as np
import torch

from dalle_ds.config import ExperimentConfig, SampleConfig
from dalle_ds.sampling.decode import sample_image_tokens
from dalle_ds.sampling.grid import save_grid


@torch.no_grad()
def generate(prior, tok, dvae, captions: list[str], scfg: SampleConfig) -> np.ndarray:
    """uint8 (len(captions) * num_per_caption, H, W, 3); each caption's samples are adjacent."""
    gen = torch.Generator().manual_seed(scfg.seed)
    wanted = [c for c in captions for _ in range(scfg.num_per_caption)]
    out = []
    for s in range(0, len(wanted), scfg.batch_size):
        text = tok.encode_batch(wanted[s:s + scfg.batch_size], train=False)  # never BPE dropout here
        grid = sample_image_tokens(prior, text, temperature=scfg.temperature, top_k=scfg.top_k,
                                   top_p=scfg.top_p, generator=gen)
        g = prior.cfg.image_grid
        images = dvae.decode(grid.view(-1, g, g))  # (B, 3, H, W) in [0, 1]
        out.append((images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def sample_config(cfg: ExperimentConfig, args: argparse.Namespace) -> SampleConfig:
    s = cfg.sample
    for name in ("temperature", "top_k", "top_p", "seed", "batch_size"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    s.num_per_caption = args.n
    cfg.validate()
    return s


def main(argv: list[str] | None = None) -> None:
    from dalle_ds.train_dvae import load_dvae  # noqa: PLC0415
    from dalle_ds.train_prior import load_prior  # noqa: PLC0415

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prior", required=True, help="prior.pt exported by train_prior")
    p.add_argument("--dvae", required=True, help="dvae.pt exported by train_dvae")
    p.add_argument("--caption", action="append", default=[], help="a caption (repeatable)")
    p.add_argument("--captions-file", default=None, help="a text file with one caption per line")
    p.add_argument("--n", type=int, default=4, help="samples per caption")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", dest="top_k", type=int, default=None, help="0 = off")
    p.add_argument("--top-p", dest="top_p", type=float, default=None, help="1.0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None)
    p.add_argument("--backend", default=None, help="attention backend for sampling (dense | sparse | triton)")
    p.add_argument("--out", default="samples.png", help="PNG grid to write")
    args = p.parse_args(argv)
    captions = list(args.caption)
    if args.captions_file:
        captions += [line.strip() for line in Path(args.captions_file).read_text().splitlines() if line.strip()]
    if not captions:
        p.error("give at least one --caption or a --captions-file")
    prior, tok, cfg = load_prior(args.prior, backend=args.backend)
    dvae, _ = load_dvae(args.dvae, cfg)
    scfg = sample_config(cfg, args)
    images = generate(prior, tok, dvae, captions, scfg)
    labels = [c for c in captions for _ in range(scfg.num_per_caption)]
    path = save_grid(images, labels, args.out, cols=max(scfg.num_per_caption, 4))
    print(json.dumps({"samples": str(path), "count": len(images)}))


if __name__ == "__main__":
    main()
