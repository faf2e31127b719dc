"""`dalle-ds eval`: judge a trained model (PAPER §7): FID at Gaussian blur radii 0, 1, 2, 4, 8 (applied to
both sides), the mean contrastive score, and for "shapes" the held-out composition accuracy with and without
reranking. Writes OUT/eval.json and OUT/fid_blur.png.

    python -m dalle_ds.evaluate --prior runs/prior/prior.pt --dvae runs/dvae/dvae.pt --clip runs/clip/clip.pt \
        --n 256 --candidates 8 --out runs/eval
    python -m dalle_ds.evaluate --real-dir real/ --fake-dir generated/ --out runs/eval   # FID of two folders

Generated images are sampled for the captions of the first --n validation pairs of the model's data; the real
side is those same validation images (the prior's preprocessing: near-centre crop, no flip).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def _hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy()


def load_folder(path: str | Path, size: int) -> np.ndarray:
    """Every decodable image in a folder (recursively), centre-cropped and resized to size: uint8 (N, s, s, 3)."""
    from dalle_ds.data.decode import BadInput  # noqa: PLC0415
    from dalle_ds.data.records import IMAGE_EXTS  # noqa: PLC0415
    from dalle_ds.sampling.prime import load_image  # noqa: PLC0415

    out = []
    for p in sorted(Path(path).rglob("*")):
        if p.suffix.lower() in IMAGE_EXTS:
            try:
                out.append(_hwc(load_image(p, size)))
            except BadInput:
                continue
    if not out:
        raise ValueError(f"{path}: no decodable images")
    return np.stack(out)


def composition_with_rerank(prior, tok, dvae, reranker, cfg, *, captions: list[str], candidates: int) -> dict:
    """Held-out composition accuracy of all N candidates (= an unreranked sample) and of the reranker's top-1."""
    from dalle_ds.eval.composition import composition_accuracy  # noqa: PLC0415
    from dalle_ds.sample import generate  # noqa: PLC0415
    from dalle_ds.sampling.rerank import rerank  # noqa: PLC0415

    cfg.sample.num_per_caption = candidates
    images = generate(prior, tok, dvae, captions, cfg.sample)
    labels = [c for c in captions for _ in range(candidates)]
    out = {"captions": len(captions), "candidates": candidates,
           "unreranked": composition_accuracy(list(images), labels)}
    if reranker is not None:
        top, _ = rerank(reranker, images, captions, candidates, 1)
        out["reranked_top1"] = composition_accuracy(list(top), captions)
        rnd = images[np.arange(len(captions)) * candidates]  # the first candidate: a fair single sample
        out["first_candidate"] = composition_accuracy(list(rnd), captions)
    return out


def evaluate(args) -> dict:
    from dalle_ds.eval.fid import BLUR_RADII, InceptionFeatures, fid, plot_fid  # noqa: PLC0415

    radii = tuple(float(r) if "." in r else int(r) for r in args.radii.split(",")) if args.radii else BLUR_RADII
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"radii": list(radii)}
    t0 = time.perf_counter()
    feats = InceptionFeatures(batch=32)
    if args.real_dir or args.fake_dir:
        if not (args.real_dir and args.fake_dir):
            raise SystemExit("give both --real-dir and --fake-dir")
        real, fake = load_folder(args.real_dir, args.size), load_folder(args.fake_dir, args.size)
        result.update(n_real=len(real), n_fake=len(fake))
    else:
        from dalle_ds.data.sources import image_dataset  # noqa: PLC0415
        from dalle_ds.sample import generate  # noqa: PLC0415
        from dalle_ds.train_dvae import load_dvae  # noqa: PLC0415
        from dalle_ds.train_prior import load_prior  # noqa: PLC0415

        prior, tok, cfg = load_prior(args.prior)
        dvae, _ = load_dvae(args.dvae, cfg)
        cfg.sample.seed = args.seed
        val = image_dataset(cfg.data, "val", purpose="prior")
        n = min(args.n, len(val))
        items = [val[i] for i in range(n)]
        captions = [it["caption"] for it in items]
        real = np.stack([_hwc(it["image"]) for it in items])
        cfg.sample.num_per_caption = 1
        torch.manual_seed(args.seed)
        fake = generate(prior, tok, dvae, captions, cfg.sample)
        result.update(n_real=len(real), n_fake=len(fake))
        reranker = None
        if args.clip:
            from dalle_ds.sampling.rerank import load_reranker  # noqa: PLC0415

            reranker = load_reranker(clip=args.clip)
            result["mean_contrastive_score"] = float(reranker.score(fake, captions).mean())
            result["mean_contrastive_score_real"] = float(reranker.score(real, captions).mean())
        if cfg.data.dataset == "shapes" and args.heldout > 0:
            from dalle_ds.data.shapes import heldout_captions  # noqa: PLC0415

            result["heldout_composition"] = composition_with_rerank(
                prior, tok, dvae, reranker, cfg, captions=heldout_captions(args.heldout, seed=cfg.data.seed),
                candidates=args.candidates)
    scores = fid(real, fake, radii=radii, features=feats)
    result["fid"] = {str(r): v for r, v in scores.items()}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    plot_fid(list(scores), list(scores.values()), out_dir / "fid_blur.png",
             title=f"FID vs Gaussian blur radius (n={len(fake)})")
    (out_dir / "eval.json").write_text(json.dumps(result, indent=1))
    return result


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
    args = p.parse_args(argv)
    if not (args.real_dir or args.fake_dir) and not (args.prior and args.dvae):
        p.error("give --prior and --dvae, or --real-dir and --fake-dir")
    r = evaluate(args)
    print(json.dumps(r))


if __name__ == "__main__":
    main()
