"""The paper's image preprocessing (PAPER §1.4, Listings 1 and 2), at target resolution R = data.image_size.

dVAE (Listing 1): random s x s crop (s = short side); area-resize to t x t with t drawn from
[min(s, 9R/8), min(s, 3R/2)]; round/clip to uint8; random R x R crop; random horizontal flip.
Prior (Listing 2): s x s crop near the centre (offset in [floor(3d/8), max(floor(3d/8)+1, floor(5d/8))) along
each axis with slack d); t from [R, min(s, 9R/8)]; round/clip; random R crop; NO flip (captions say
"left" and "right").
Images whose short side is below R are upsampled to R (bilinear, antialiased); the paper rejects them at
inference instead, but a training set with a few small images should not fail.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _resize(square: np.ndarray, t: int) -> np.ndarray:
    """uint8 (s, s, 3) -> uint8 (t, t, 3); area resize when shrinking."""
    s = square.shape[0]
    if t == s:
        return square
    x = torch.from_numpy(np.array(square)).permute(2, 0, 1)[None].float()
    if t < s:
        y = F.interpolate(x, size=(t, t), mode="area")
    else:
        y = F.interpolate(x, size=(t, t), mode="bilinear", align_corners=False, antialias=True)
    return y[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def _random_crop(a: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    h, w = a.shape[:2]
    y = int(rng.integers(0, h - size + 1))
    x = int(rng.integers(0, w - size + 1))
    return a[y : y + size, x : x + size]


def _centre_offset(d: int, rng: np.random.Generator) -> int:
    lo = (3 * d) // 8
    hi = max(lo + 1, (5 * d) // 8)
    return int(rng.integers(lo, hi))


def _draw_t(lo: int, hi: int, R: int, rng: np.random.Generator) -> int:
    lo, hi = max(R, lo), max(R, hi)
    return int(rng.integers(lo, hi + 1))


def preprocess_dvae(image: np.ndarray, R: int, rng: np.random.Generator) -> torch.Tensor:
    """uint8 (H, W, 3) -> uint8 (3, R, R), Listing 1."""
    h, w = image.shape[:2]
    s = min(h, w)
    square = _random_crop(image, s, rng)
    t = _draw_t(min(s, (9 * R) // 8), min(s, (12 * R) // 8), R, rng)
    out = _random_crop(_resize(square, t), R, rng)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1).contiguous()


def preprocess_prior(image: np.ndarray, R: int, rng: np.random.Generator) -> torch.Tensor:
    """uint8 (H, W, 3) -> uint8 (3, R, R), Listing 2 (no flip)."""
    h, w = image.shape[:2]
    s = min(h, w)
    y, x = _centre_offset(h - s, rng), _centre_offset(w - s, rng)
    square = image[y : y + s, x : x + s]
    t = _draw_t(R, min(s, (9 * R) // 8), R, rng)
    out = _random_crop(_resize(square, t), R, rng)
    return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1).contiguous()


PREPROCESS = {"dvae": preprocess_dvae, "prior": preprocess_prior}
