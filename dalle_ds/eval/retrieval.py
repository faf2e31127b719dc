"""Caption retrieval: does an image's own caption score best among K captions?

The real-data benchmark's key number (dalle_ds/demo/real.py): a contrastive reranker trained on real
pictures scores each generated picture against its own caption and K - 1 other held-out captions; the
fraction whose own caption ranks first says whether the prior drew the named object. Chance is 1 / K.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def candidate_sets(captions: Sequence[str], k: int = 32, seed: int = 0) -> list[list[str]]:
    """For each caption: itself first, then k - 1 distinct other captions of the pool (never equal to it,
    so a repeated caption cannot be its own distractor)."""
    pool = sorted(set(captions))
    if len(pool) < k:
        raise ValueError(f"need at least {k} distinct captions for {k} candidates, got {len(pool)}")
    rng = np.random.default_rng(seed)
    sets = []
    for cap in captions:
        others = [c for c in pool if c != cap]
        sets.append([cap] + [others[j] for j in rng.choice(len(others), k - 1, replace=False)])
    return sets


def top1_hits(scores: torch.Tensor | np.ndarray) -> torch.Tensor:
    """scores: (N, K) with each row's own caption in column 0. (N,) bool: column 0 is strictly above every
    other column (a tie is not a win)."""
    s = torch.as_tensor(scores)
    return (s[:, :1] > s[:, 1:]).all(dim=1)


def top1(scores: torch.Tensor | np.ndarray) -> float:
    """The fraction of rows of (N, K) scores whose own caption (column 0) wins."""
    return float(top1_hits(scores).float().mean())


def caption_retrieval_hits(
    reranker, images: np.ndarray, captions: Sequence[str], k: int = 32, seed: int = 0
) -> torch.Tensor:
    """(N,) bool: for each uint8 (H, W, 3) image, whether its own caption scores above k - 1 others, scored
    by a `Reranker` (dalle_ds/rerank/rerankers.py)."""
    sets = candidate_sets(captions, k, seed)
    flat = [c for s in sets for c in s]
    return top1_hits(reranker.score(np.repeat(np.asarray(images), k, axis=0), flat).view(len(captions), k))


def caption_retrieval_top1(reranker, images: np.ndarray, captions: Sequence[str], k: int = 32, seed: int = 0) -> float:
    """Top-1 caption retrieval of uint8 (N, H, W, 3) images among k captions (own + k - 1 others)."""
    return float(caption_retrieval_hits(reranker, images, captions, k, seed).float().mean())
