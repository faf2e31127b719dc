"""What a person looks at to judge a dVAE: originals above their argmax-token reconstructions (the path the
prior sees: encode -> decode, no gumbel noise). train_dvae writes one as OUT/recon_stepN.png every eval_every."""

from __future__ import annotations

import numpy as np
import torch

from dalle_ds.sampling.grid import cell_size, grid_image

RECON_IMAGES = 8  # fixed validation images per grid: one row of originals, one of reconstructions


@torch.no_grad()
def reconstruct(dvae: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> uint8 (B, 3, H, W) through the argmax tokens."""
    dvae.eval()
    dtype = next(dvae.parameters()).dtype
    x = images.to(next(dvae.parameters()).device, dtype).div(255.0)
    return (dvae.decode(dvae.encode(x)).float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def recon_grid(dvae: torch.nn.Module, images: torch.Tensor, captions: list[str]) -> np.ndarray:
    """uint8 (H, W, 3): the images (uint8 (B, 3, h, w), B <= 8) in the top row above their captions, their
    reconstructions in the row below; each cell a whole multiple of h px (nearest upscaling)."""
    rec = reconstruct(dvae, images)
    hwc = [t.permute(0, 2, 3, 1).numpy() for t in (images.cpu(), rec)]
    return grid_image(
        np.concatenate(hwc),
        [*captions, *["(reconstruction)"] * len(rec)],
        cols=len(images),
        cell=cell_size(images.shape[-1]),
    )
