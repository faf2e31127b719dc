"""Image-to-image priming (PAPER §6): the top rows of an image's token grid plus a caption; the prior
completes the rest (the paper primes with 15 of 32 rows).

The image is read with the robust decoder (any mode is converted to RGB), centre-cropped to a square and
resized to the dVAE's resolution (the release notebook's inference preprocessing, with area resampling),
then encoded by argmax like the training data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dalle_ds.data.decode import decode_image


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """A file -> uint8 (3, size, size): centre square crop, area resize (bilinear when upsampling)."""
    pixels, _ = decode_image(Path(path).read_bytes())
    h, w = pixels.shape[:2]
    s = min(h, w)
    y, x = (h - s) // 2, (w - s) // 2
    sq = torch.from_numpy(np.array(pixels[y : y + s, x : x + s])).permute(2, 0, 1)[None].float()
    mode = {"mode": "area"} if s >= size else {"mode": "bilinear", "align_corners": False, "antialias": True}
    out = F.interpolate(sq, size=(size, size), **mode)
    return out[0].round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def prime_tokens(dvae: torch.nn.Module, image: torch.Tensor, rows: int) -> torch.Tensor:
    """uint8 (3, H, W) -> the first `rows` rows of its argmax token grid, raster order: (rows * G,) long."""
    w = next(dvae.parameters())
    grid = dvae.encode(image[None].float().div(255.0).to(w.device, w.dtype))[0].cpu()  # (G, G)
    g = grid.shape[-1]
    if not 0 <= rows <= g:
        raise ValueError(f"--prime-rows must be in [0, {g}] for a {g}x{g} token grid, got {rows}")
    return grid[:rows].reshape(-1).long()
