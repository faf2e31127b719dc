"""Samples while the prior trains: images for fixed validation captions, rendered by a dVAE, every eval_every.

train_prior hands a SampleGrid to its eval: the same captions and the same random numbers at every eval, so
successive OUT/samples_stepN.png show what the weights learned, not other draws. The weights are gathered
from their ZeRO-3 shards into a plain copy on rank 0 (every rank takes part in the gather), which samples
with the KV cache; the copy never touches the engine or its RNG state.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from dalle_ds.config import ExperimentConfig
from dalle_ds.prior.model import Prior
from dalle_ds.sampling.generate import generate
from dalle_ds.sampling.grid import cell_size, grid_image
from dalle_ds.training import checkpoint as ckpt
from dalle_ds.training.distributed import is_main

SAMPLE_CAPTIONS = 8  # one row of the grid


def fixed_captions(captions: list[str], n: int = SAMPLE_CAPTIONS) -> list[str]:
    """The first n distinct captions, in order."""
    return list(dict.fromkeys(captions))[:n]


class SampleGrid:
    """grid(module) -> uint8 (H, W, 3) on rank 0 (None elsewhere): one sample per caption, captions below."""

    def __init__(self, cfg: ExperimentConfig, tok, dvae: torch.nn.Module, captions: list[str]):
        self.cfg, self.tok, self.dvae, self.captions = cfg, tok, dvae.eval(), captions
        self.scfg = dataclasses.replace(cfg.sample, num_per_caption=1, batch_size=max(1, len(captions)))
        self.copy: Prior | None = None  # built on rank 0 at the first call

    @torch.no_grad()
    def __call__(self, module: torch.nn.Module) -> np.ndarray | None:
        state = ckpt.gathered_state_dict(module)  # collective; the full fp32 weights on rank 0 only
        if not is_main():
            return None
        if self.copy is None:
            self.copy = Prior(self.cfg.prior)
        self.copy.load_state_dict(state)
        images = generate(self.copy.eval(), self.tok, self.dvae, self.captions, self.scfg)  # (N, H, W, 3)
        return grid_image(images, self.captions, cols=len(images), cell=cell_size(images.shape[1]))
