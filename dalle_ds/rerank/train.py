"""Train the small contrastive image-text model used to rerank samples (`dalle-ds train-clip` runs it).

Reads the same data as the dVAE (any source, filters and counts included) with the prior's preprocessing
(no flip: captions say "left" and "right"). It trains on the images themselves, not on dVAE
reconstructions: a reconstruction keeps its source's caption even where the dVAE drew another shape, and a
reranker trained on them learned to call the dVAE's blobs crosses (measurements: docs/RESULTS.md).
With clip.hard_negatives > 0, that fraction of each batch comes in pairs of items whose captions differ
in one word ("a small red square at the top" / "a small red circle at the top"): a reranker compares
candidates for one caption, and random in-batch negatives rarely teach such fine differences.
Writes out/clip.pt (config + weights + tokenizer) and out/clip_metrics.json. One process, plain PyTorch:
the model is small.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from dalle_ds.config import ExperimentConfig
from dalle_ds.data.sources import image_dataset
from dalle_ds.rerank.contrastive import ContrastiveModel
from dalle_ds.rerank.io import save_clip
from dalle_ds.tokenizer import CaptionTokenizer


def _batch(ds, idx) -> tuple[torch.Tensor, list[str]]:
    items = [ds[int(i)] for i in idx]
    return torch.stack([it["image"] for it in items]).float().div_(255.0), [it["caption"] for it in items]


def neighbour_index(captions: list[str]) -> dict[str, list[int]]:
    """Items whose captions differ in exactly one word share a key: the caption with that word as "*"."""
    index: dict[str, list[int]] = defaultdict(list)
    for i, cap in enumerate(captions):
        words = cap.split()
        for k in range(len(words)):
            index[" ".join(words[:k] + ["*"] + words[k + 1 :])].append(i)
    return index


def neighbour(i: int, captions: list[str], index: dict[str, list[int]], rng: np.random.Generator) -> int | None:
    """An item whose caption differs from item i's in one word (a random word that has such items), or None."""
    words = captions[i].split()
    for k in rng.permutation(len(words)):
        others = [j for j in index[" ".join(words[:k] + ["*"] + words[k + 1 :])] if captions[j] != captions[i]]
        if others:
            return others[rng.integers(len(others))]
    return None


def draw_batch(
    n_items: int,
    bs: int,
    rng: np.random.Generator,
    captions: list[str] | None,
    index: dict[str, list[int]] | None,
    hard_negatives: float,
) -> np.ndarray:
    """bs item indices. With hard negatives, the first pairs (a fraction `hard_negatives` of the batch) are
    an item and a one-word neighbour of it (same colour and place, another shape, ...): in-batch negatives
    of random captions rarely differ in one attribute only, which is all that tells a reranker's candidates
    apart."""
    idx = rng.choice(n_items, size=bs, replace=False)
    if index is None:
        return idx
    for p in range(0, 2 * int(bs * hard_negatives / 2), 2):
        j = neighbour(int(idx[p]), captions, index, rng)
        if j is None:
            continue
        at = np.flatnonzero(idx == j)
        if len(at) and at[0] <= p:  # part of a pair already
            continue
        if len(at):  # later in the batch: move it next to its anchor
            idx[at[0]] = idx[p + 1]
        idx[p + 1] = j
    return idx


@torch.no_grad()
def retrieval_accuracy(model: ContrastiveModel, tok: CaptionTokenizer, ds, *, n: int = 256) -> float:
    """Top-1 image->caption retrieval among n validation pairs (identical captions count as right)."""
    model.eval()
    x, caps = _batch(ds, range(min(n, len(ds))))
    ids = tok.encode_batch(caps, train=False)
    sim = model.encode_image(x) @ model.encode_text(ids).t()
    best = sim.argmax(1)
    return float(np.mean([caps[int(b)] == caps[i] for i, b in enumerate(best)]))


def train_clip(
    cfg: ExperimentConfig, out_dir: str | Path, *, tokenizer_path: str | Path | None = None, progress: bool = True
) -> dict:
    c = cfg.clip
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(c.seed)
    rng = np.random.default_rng(c.seed)
    train_set = image_dataset(cfg.data, "train", purpose="prior")
    val_set = image_dataset(cfg.data, "val", purpose="prior")
    if tokenizer_path is not None:
        tok = CaptionTokenizer.load(tokenizer_path, cfg.tokenizer)
    else:
        caps = [train_set[i]["caption"] for i in range(min(len(train_set), 5000))]
        tok = CaptionTokenizer.train(caps, cfg.tokenizer)
    model = ContrastiveModel(c, tok.vocab_size, tok.text_len)
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / c.steps)))
    )
    history, t0 = [], time.perf_counter()
    bs = min(c.batch_size, len(train_set))
    captions = index = None
    if c.hard_negatives > 0:
        captions = (
            train_set.captions()
            if hasattr(train_set, "captions")
            else [train_set[i]["caption"] for i in range(len(train_set))]
        )
        index = neighbour_index(captions)
    for step in range(c.steps):
        model.train()
        idx = draw_batch(len(train_set), bs, rng, captions, index, c.hard_negatives)
        x, caps = _batch(train_set, idx)
        loss, stats = model(x, tok.encode_batch(caps, train=False))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % c.log_every == 0 or step + 1 == c.steps:
            history.append({"step": step + 1, "loss": loss.detach().item(), **stats})
            if progress:
                print(
                    f"clip step {step + 1}/{c.steps} loss {history[-1]['loss']:.4f} batch acc {stats['acc']:.3f}",
                    flush=True,
                )
    val_acc = retrieval_accuracy(model, tok, val_set)
    save_clip(out_dir / "clip.pt", model.state_dict(), cfg, tok, step=c.steps)
    summary = {
        "step": c.steps,
        "seconds": time.perf_counter() - t0,
        "val_retrieval_top1": val_acc,
        "history": history,
        "path": str(out_dir / "clip.pt"),
    }
    if hasattr(train_set, "report"):
        summary["data_report"] = {"train": train_set.report.as_dict(), "val": val_set.report.as_dict()}
    (out_dir / "clip_metrics.json").write_text(json.dumps(summary, indent=1))
    return summary
