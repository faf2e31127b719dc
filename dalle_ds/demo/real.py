"""The real-data benchmark: dVAE + prior + reranker on a captioned image folder (the emoji set of
dalle_ds/data/prepare_emoji.py in `make realdata`), judged on the held-out (val) captions.

The key number is `generated_retrieval_top1`: one sample per held-out caption, no reranking, scored by the
contrastive reranker trained on the real training pictures against its own caption and 31 other held-out
captions; the fraction whose own caption wins (chance 1/32). The same pipeline with the training captions
shuffled among the pictures (a prior that cannot learn what a caption names) gives the baseline
`shuffled_generated_retrieval_top1`; the reranker on the real held-out pictures gives the ceiling
`real_retrieval_top1`. FID against the held-out pictures at blur radii 0/1/2/4/8 (PAPER §7.1).

    dalle-ds demo --data FOLDER [--preset real32] --out realdata_out
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from dalle_ds.config import ExperimentConfig
from dalle_ds.data.encode_grids import encode_to_disk
from dalle_ds.data.sources import image_dataset
from dalle_ds.dvae.io import load_dvae
from dalle_ds.dvae.train import train_dvae
from dalle_ds.eval.fid import BLUR_RADII, InceptionFeatures, blur, frechet_distance, statistics
from dalle_ds.eval.retrieval import caption_retrieval_hits
from dalle_ds.prior.io import load_prior
from dalle_ds.prior.train import train_prior
from dalle_ds.rerank.io import load_clip
from dalle_ds.rerank.rerankers import ContrastiveReranker
from dalle_ds.rerank.train import train_clip
from dalle_ds.resources import DS_CONFIGS
from dalle_ds.sampling.generate import generate
from dalle_ds.sampling.grid import save_grid
from dalle_ds.training.loop import exit_if_interrupted

CANDIDATE_CAPTIONS = 32  # own caption + 31 other held-out captions: chance 1/32


def train_captions(tokens_dir: Path) -> set[str]:
    """The distinct captions of an encoded token set's train split."""
    import datasets  # noqa: PLC0415

    return set(datasets.load_from_disk(str(tokens_dir / "dataset"))["train"]["caption"])


def retrieval_by_group(reranker, images: np.ndarray, captions: list[str], seen: np.ndarray, k: int, seed: int):
    """(top-1 over all, over held-out items whose caption is also a train caption, over the rest). On the
    emoji set a seen caption is the same object in the other style: the prior may have learned it; an
    unseen one it can only compose from words."""
    hits = caption_retrieval_hits(reranker, images, captions, k, seed).numpy()

    def part(m: np.ndarray) -> float | None:
        return round(float(hits[m].mean()), 4) if m.any() else None

    return round(float(hits.mean()), 4), part(seen), part(~seen)


def shuffled_tokens(src: Path, dst: Path, seed: int) -> Path:
    """A copy of an encoded token set whose train captions are permuted among the pictures (val untouched)."""
    import datasets  # noqa: PLC0415

    dd = datasets.load_from_disk(str(src / "dataset"))
    caps = list(dd["train"]["caption"])
    perm = np.random.default_rng(seed).permutation(len(caps))
    train = dd["train"].remove_columns("caption").add_column("caption", [caps[i] for i in perm])
    datasets.DatasetDict({"train": train, "val": dd["val"]}).save_to_disk(str(dst / "dataset"))
    return dst


def held_out(cfg: ExperimentConfig, n: int) -> tuple[np.ndarray, list[str]]:
    """The first n val pictures as uint8 (N, H, W, 3) and their captions (prior preprocessing: centre crop)."""
    ds = image_dataset(cfg.data, "val", purpose="prior")
    items = [ds[i] for i in range(min(n, len(ds)))]
    return np.stack([it["image"].permute(1, 2, 0).numpy() for it in items]), [it["caption"] for it in items]


@torch.no_grad()
def save_recon(dvae, images: np.ndarray, captions: list[str], path: Path, cols: int = 8) -> None:
    """Rows of originals, each above the same pictures' encode -> decode reconstructions."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    rec = (dvae.decode(dvae.encode(x)).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    tiles, labels = [], []
    for s in range(0, len(images), cols):
        tiles += [*images[s : s + cols], *rec[s : s + cols]]
        labels += [*captions[s : s + cols], *["(reconstruction)"] * len(rec[s : s + cols])]
    save_grid(np.stack(tiles), labels, path, cols=cols, cell=96)


def fid_by_radius(features: InceptionFeatures, real: np.ndarray, fakes: dict[str, np.ndarray]) -> dict:
    """{name: {radius: FID}}; the real pictures' statistics are computed once per radius."""
    out: dict[str, dict] = {name: {} for name in fakes}
    for r in BLUR_RADII:
        ref = statistics(features(blur(real, r)))
        for name, fake in fakes.items():
            out[name][str(r)] = round(frechet_distance(*ref, *statistics(features(blur(fake, r)))), 2)
    return out


def run_real(
    cfg: ExperimentConfig,
    out_dir: str | Path,
    *,
    num_eval: int = 256,
    dvae_ds: str | Path = DS_CONFIGS / "demo_dvae.json",
    prior_ds: str | Path = DS_CONFIGS / "demo_prior.json",
    shuffled_baseline: bool = True,
    fid: bool = True,
    shuffled_fid: bool = False,
    progress: bool = True,
) -> dict:
    """The whole benchmark; writes OUT/{recon,samples,samples_shuffled}.png and OUT/metrics.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    times: dict[str, float] = {}
    cpu0 = time.process_time()  # with wall time: the machine may be shared

    t = time.perf_counter()
    dvae_summary = train_dvae(cfg, ds_config=dvae_ds, out_dir=out / "dvae", progress=progress)
    exit_if_interrupted(dvae_summary, "demo dVAE")
    dvae, _ = load_dvae(out / "dvae" / "dvae.pt", cfg)
    times["dvae_train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    real, captions = held_out(cfg, num_eval)
    save_recon(dvae, real[:16], captions[:16], out / "recon.png")
    encode_to_disk(dvae, cfg, out / "tokens")
    with torch.no_grad():  # how many codes the prior gets to see: a dVAE that uses few draws few objects
        codes = dvae.encode(torch.from_numpy(real).permute(0, 3, 1, 2).float() / 255)
    times["encode_s"] = time.perf_counter() - t

    runs = {"": out / "tokens"}
    if shuffled_baseline:
        runs["shuffled_"] = shuffled_tokens(out / "tokens", out / "tokens_shuffled", cfg.data.seed)
    priors = {}
    for tag, data_dir in runs.items():
        t = time.perf_counter()
        tok_path = None if not tag else out / "prior" / "tokenizer.json"  # one tokenizer for both
        (out / f"{tag}prior").mkdir(exist_ok=True)  # train_prior writes config.json there first
        priors[tag] = train_prior(
            cfg,
            ds_config=prior_ds,
            data_dir=data_dir,
            out_dir=out / f"{tag}prior",
            tokenizer_path=tok_path,
            progress=progress,
        )
        exit_if_interrupted(priors[tag], "demo prior")
        times[f"{tag}prior_train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    clip_summary = train_clip(cfg, out / "clip", tokenizer_path=out / "prior" / "tokenizer.json", progress=progress)
    model, ctok, _ = load_clip(out / "clip" / "clip.pt")
    reranker = ContrastiveReranker(model, ctok, cfg.data.image_size)
    times["clip_train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    cfg.sample.num_per_caption = 1
    generated = {}
    for tag in runs:
        prior, tok, _ = load_prior(out / f"{tag}prior" / "prior.pt", cfg)
        torch.manual_seed(cfg.sample.seed)
        generated[tag] = generate(prior, tok, dvae, captions, cfg.sample)
        save_grid(generated[tag][:48], captions[:48], out / f"samples{'_' + tag.rstrip('_') if tag else ''}.png")
    times["sample_s"] = time.perf_counter() - t

    t = time.perf_counter()
    k, seed = CANDIDATE_CAPTIONS, cfg.sample.seed
    train_caps = train_captions(out / "tokens")
    seen = np.array([c in train_caps for c in captions])
    metrics = {"retrieval_candidates": k, "chance_retrieval_top1": 1 / k, "heldout_images": len(real)}
    metrics["heldout_caption_in_train"] = int(seen.sum())
    groups = {"real": real} | {f"{tag}generated": generated[tag] for tag in runs}  # real, generated, shuffled_...
    for name, images in groups.items():
        all_, in_train, not_in_train = retrieval_by_group(reranker, images, captions, seen, k, seed)
        metrics[f"{name}_retrieval_top1"] = all_
        metrics[f"{name}_retrieval_top1_caption_in_train"] = in_train
        metrics[f"{name}_retrieval_top1_caption_not_in_train"] = not_in_train
    metrics |= {
        "clip_val_retrieval_top1_among_val": clip_summary["val_retrieval_top1"],
        "dvae_recon_psnr": dvae_summary["recon_psnr"],
        "dvae_codes_used_heldout": int(torch.unique(codes).numel()),
        "dvae_vocab_size": cfg.dvae.vocab_size,
        "prior_val_loss_text": priors[""]["val_loss_text"],
        "prior_val_loss_image": priors[""]["val_loss_image"],
        "dvae_steps": dvae_summary["step"],
        "prior_steps": priors[""]["step"],
        "clip_steps": clip_summary["step"],
    }
    if shuffled_baseline:
        metrics["shuffled_prior_val_loss_text"] = priors["shuffled_"]["val_loss_text"]
        metrics["shuffled_prior_val_loss_image"] = priors["shuffled_"]["val_loss_image"]
    times["retrieval_s"] = time.perf_counter() - t
    if fid:
        t = time.perf_counter()
        # Inception runs at 299 px: ~0.2 CPU s per picture, 2 x 5 x 256 of them; the baseline's FID is optional
        fakes = {"generated": generated[""]} | ({"shuffled_": generated["shuffled_"]} if shuffled_fid else {})
        fids = fid_by_radius(InceptionFeatures(), real, fakes)
        metrics["fid_by_blur_radius"] = fids["generated"]
        if "shuffled_" in fids:
            metrics["shuffled_fid_by_blur_radius"] = fids["shuffled_"]
        times["fid_s"] = time.perf_counter() - t
    metrics["wall_seconds"] = {**{k: round(v, 1) for k, v in times.items()}, "total_s": round(sum(times.values()), 1)}
    metrics["process_cpu_seconds"] = round(time.process_time() - cpu0, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
