"""clip.augment: the reranker's random zoom and shift (rerank/augment.py), against a plain numpy shift with
white fill, and its place in training (training pictures only)."""

import numpy as np
import pytest
import torch

from dalle_ds.config import load_config
from dalle_ds.rerank.augment import random_zoom_shift
from dalle_ds.rerank.train import train_clip
from dalle_ds.safe_load import load_plain


class FixedDraws:
    """Stands in for the generator's uniform draws only: (scale, dx, dy) per picture, in that order."""

    def __init__(self, draws):
        self.draws = np.asarray(draws, dtype=np.float64)

    def uniform(self, low, high, size):
        assert size == self.draws.shape and (self.draws >= low).all() and (self.draws <= high).all()
        return self.draws


def shifted_white(x: np.ndarray, kx: int, ky: int) -> np.ndarray:
    """Reference: out[..., i, j] = x[..., i + ky, j + kx], white (1.0) where that falls outside."""
    out = np.ones_like(x)
    h, w = x.shape[-2:]
    for i in range(h):
        for j in range(w):
            if 0 <= i + ky < h and 0 <= j + kx < w:
                out[..., i, j] = x[..., i + ky, j + kx]
    return out


@pytest.mark.parametrize("h, w, kx, ky", [(13, 13, 2, -3), (10, 14, -5, 1), (7, 9, 0, 0)])
def test_a_whole_pixel_shift_moves_the_picture_and_fills_white(h, w, kx, ky):
    x = torch.rand(2, 3, h, w, dtype=torch.float64)
    # in grid_sample's coordinates (align_corners=False) one pixel is 2 / size
    draws = [[0.0, 2 * kx / w, 2 * ky / h], [0.0, 0.0, 0.0]]
    out = random_zoom_shift(x, 0.9, FixedDraws(draws))
    np.testing.assert_allclose(out[0].numpy(), shifted_white(x[0].numpy(), kx, ky), atol=1e-12)
    np.testing.assert_allclose(out[1].numpy(), x[1].numpy(), atol=1e-12)


def test_zooming_out_keeps_the_centre_and_whitens_the_border():
    """Scale 1 + 0.5 on a 12x12 picture: the output samples 1.5x the picture, so the outer ring is white
    and the centre pixel's neighbourhood still holds the picture's colours (no clamp to the edge)."""
    x = torch.zeros(1, 3, 12, 12, dtype=torch.float64)  # a black picture
    out = random_zoom_shift(x, 0.5, FixedDraws([[0.5, 0.0, 0.0]]))
    assert torch.all(out[..., 0, :] == 1) and torch.all(out[..., :, -1] == 1)
    assert torch.all(out[..., 5:7, 5:7] == 0)


def test_strength_zero_returns_the_input_and_draws_nothing():
    x = torch.rand(3, 3, 8, 8)
    rng = np.random.default_rng(0)
    assert random_zoom_shift(x, 0.0, rng) is x
    assert rng.bit_generator.state == np.random.default_rng(0).bit_generator.state


def test_training_sees_the_augmented_pictures(tmp_path, one_thread):
    """Same seed, augment 0 vs 0.3: the weights differ, so the training step used the moved pictures."""
    for aug in (0.0, 0.3):
        cfg = load_config("tiny", overrides=["clip.steps=6", f"clip.augment={aug}"])
        train_clip(cfg, tmp_path / f"a{aug}", progress=False)
    w0 = load_plain(tmp_path / "a0.0" / "clip.pt", what="clip.pt")["state_dict"]
    w3 = load_plain(tmp_path / "a0.3" / "clip.pt", what="clip.pt")["state_dict"]
    assert any(not torch.equal(w0[k], w3[k]) for k in w0)
