"""`dalle-ds sample`: images from captions: KV-cached decoding of the prior, rendered by the dVAE decoder.

    dalle-ds sample --prior runs/prior/prior.pt --dvae runs/dvae/dvae.pt \
        --caption "a small red triangle at the top left" --n 8 --out samples.png

On a GPU by default, the prior in bf16 (fp16 on a V100); --device cpu / --dtype fp32 to choose
(dalle_ds/sampling/placement.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dalle_ds.attention import backend_names
from dalle_ds.cli.common import add_placement_args, argument, existing_path, read_text_lines, run_command
from dalle_ds.config import ConfigError, ExperimentConfig, SampleConfig
from dalle_ds.data.decode import BadInput
from dalle_ds.dvae.io import load_dvae
from dalle_ds.prior.io import WEIGHTS, is_export, load_prior
from dalle_ds.rerank.rerankers import load_reranker, rerank
from dalle_ds.sampling.generate import generate
from dalle_ds.sampling.grid import save_grid
from dalle_ds.sampling.placement import place_for_sampling
from dalle_ds.sampling.prime import load_image, prime_tokens


def sample_config(cfg: ExperimentConfig, args: argparse.Namespace) -> SampleConfig:
    s = cfg.sample
    for name in ("temperature", "top_k", "top_p", "seed", "batch_size"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    s.num_per_caption = args.n
    cfg.validate()
    return s


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad numbers and missing files before any model is loaded."""
    if args.n < 1:
        raise ConfigError(f"--n: samples per caption must be >= 1, got {args.n}")
    if args.backend is not None and args.backend not in backend_names():
        raise ConfigError(f"--backend: unknown backend {args.backend!r}; choose one of {', '.join(backend_names())}")
    for name, path in (("--prior", args.prior), ("--dvae", args.dvae)):
        existing_path(path, name, kind="any" if name == "--prior" else "file")
    if Path(args.prior).is_dir() and not is_export(args.prior):
        raise ConfigError(f"--prior: {args.prior} is a folder without {WEIGHTS} (not a `dalle-ds export` folder)")
    if args.prime_image:
        existing_path(args.prime_image, "--prime-image")


def build_parser() -> argparse.ArgumentParser:
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
    add_placement_args(p)
    p.add_argument("--out", default="samples.png", help="PNG grid to write")
    p.add_argument("--prime-image", default=None, help="image-to-image: prime with the top rows of this image")
    p.add_argument(
        "--prime-rows",
        type=int,
        default=None,
        help="token-grid rows of --prime-image kept (default: 15/32 of the grid, as in the paper)",
    )
    p.add_argument(
        "--candidates",
        type=int,
        default=None,
        help="rerank: generate this many per caption and keep the best --keep (needs --clip)",
    )
    p.add_argument("--keep", type=int, default=1, help="rerank: samples kept per caption")
    p.add_argument("--clip", default=None, help="reranker: clip.pt from `dalle-ds train-clip`")
    p.add_argument(
        "--open-clip",
        dest="open_clip",
        default=None,
        metavar="ARCH:CHECKPOINT",
        help="reranker: an open_clip CLIP model from local files, e.g. ViT-B-32:/models/clip.safetensors "
        "(ARCH may be a config JSON), or a folder with open_clip_config.json + weights",
    )
    return p


def read_captions(p: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """--caption values, then the lines of --captions-file; at least one."""
    captions = list(args.caption)
    if args.captions_file:
        captions += read_text_lines(args.captions_file, "--captions-file")
    if not captions:
        p.error("give at least one --caption or a --captions-file")
    return captions


def prime_from_args(args: argparse.Namespace, cfg: ExperimentConfig, dvae):
    """The token rows of --prime-image to prime with (image-to-image), or None."""
    if not args.prime_image:
        return None
    g = cfg.prior.image_grid
    rows = args.prime_rows if args.prime_rows is not None else max(1, round(g * 15 / 32))
    if not 0 <= rows <= g:
        raise ConfigError(f"--prime-rows: must be in [0, {g}] for this prior's {g}x{g} token grid, got {rows}")
    try:
        image = load_image(args.prime_image, cfg.dvae.image_size)
    except BadInput as e:
        raise ConfigError(f"--prime-image: {args.prime_image} is not a usable image ({e})") from None
    return prime_tokens(dvae, image, rows)


def reranker_from_args(p: argparse.ArgumentParser, args: argparse.Namespace, scfg: SampleConfig, device):
    """The reranker --candidates asks for (then --candidates samples are drawn per caption), or None."""
    if args.candidates is None:
        return None
    if args.candidates < 1 or not 1 <= args.keep <= args.candidates:
        p.error(f"need 1 <= --keep ({args.keep}) <= --candidates ({args.candidates})")
    if (args.clip is None) == (args.open_clip is None):
        p.error("--candidates needs exactly one reranker: --clip FILE or --open-clip ARCH:CHECKPOINT")
    with argument("--clip" if args.clip is not None else "--open-clip"):
        reranker = load_reranker(clip=args.clip, open_clip=args.open_clip, device=device)
    scfg.num_per_caption = args.candidates
    return reranker


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    check_args(args)
    captions = read_captions(p, args)
    if args.prime_rows is not None and not args.prime_image:
        p.error("--prime-rows needs --prime-image")
    with argument("--prior"):
        prior, tok, cfg = load_prior(args.prior, backend=args.backend)
    with argument("--dvae"):
        dvae, _ = load_dvae(args.dvae, cfg)
    device, _ = place_for_sampling(prior, dvae, args.device, args.dtype)
    scfg = sample_config(cfg, args)
    prime = prime_from_args(args, cfg, dvae)
    reranker = reranker_from_args(p, args, scfg, device)
    images = generate(prior, tok, dvae, captions, scfg, prime=prime)
    info = {}
    if reranker is not None:
        images, scores = rerank(reranker, images, captions, args.candidates, args.keep)
        scfg.num_per_caption = args.keep
        info["scores"] = [round(float(x), 4) for x in scores]
    labels = [c for c in captions for _ in range(scfg.num_per_caption)]
    path = save_grid(images, labels, args.out, cols=max(scfg.num_per_caption, 4))
    print(json.dumps({"samples": str(path), "count": len(images), **info}))


if __name__ == "__main__":
    run_command("sample", main)
