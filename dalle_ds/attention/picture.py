"""Drawing an attention mask for a human: allowed entries dark, text/image segment borders in red."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dalle_ds.attention.masks import MaskSpec, dense_mask


def mask_png(spec: MaskSpec, path: str | Path, *, max_px: int = 1400) -> Path:
    m = dense_mask(spec).numpy()  # (L, L) bool
    rgb = np.where(m[..., None], np.array([30, 30, 30], np.uint8), np.array([245, 245, 245], np.uint8))
    t = spec.text_len
    if 0 < t < m.shape[0]:
        rgb[t, :] = rgb[:, t] = (220, 40, 40)  # where the image segment starts
    scale = max(1, max_px // m.shape[0])
    img = Image.fromarray(rgb.astype(np.uint8)).resize((m.shape[1] * scale, m.shape[0] * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def mask_npy(spec: MaskSpec, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, dense_mask(spec).numpy())
    return path
