"""Captions -> images: KV-cached decoding of the prior, rendered by the dVAE decoder."""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from dalle_ds.config import SampleConfig
from dalle_ds.sampling.decode import sample_image_tokens


@torch.no_grad()
def generate(
    prior,
    tok,
    dvae,
    captions: list[str],
    scfg: SampleConfig,
    prime: torch.Tensor | None = None,
    *,
    progress: str | None = None,
) -> np.ndarray:
    """uint8 (len(captions) * num_per_caption, H, W, 3); each caption's samples are adjacent.

    prime: optional (m,) image tokens (raster order) every sample starts from (image-to-image).
    progress: a label to show a progress bar (stderr) counting images, e.g. "sampling"; None = no bar.
    Runs where the prior and the dVAE are (placement.place_for_sampling); the random draws come from one CPU
    generator, so a seed draws the same uniforms on every device.
    """
    device = next(prior.parameters()).device
    dvae_device = next(dvae.parameters()).device
    gen = torch.Generator().manual_seed(scfg.seed)
    wanted = [c for c in captions for _ in range(scfg.num_per_caption)]
    out = []
    bar = tqdm(total=len(wanted), desc=progress, unit="img", disable=progress is None, dynamic_ncols=True)
    for s in range(0, len(wanted), scfg.batch_size):
        text = tok.encode_batch(wanted[s : s + scfg.batch_size], train=False).to(device)  # never BPE dropout
        p = None if prime is None else prime.to(device).view(1, -1).expand(text.shape[0], -1)
        grid = sample_image_tokens(
            prior, text, temperature=scfg.temperature, top_k=scfg.top_k, top_p=scfg.top_p, generator=gen, prime=p
        )
        g = prior.cfg.image_grid
        images = dvae.decode(grid.view(-1, g, g).to(dvae_device))  # (B, 3, H, W) in [0, 1]
        out.append((images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
        bar.update(len(out[-1]))
    bar.close()
    return np.concatenate(out)
