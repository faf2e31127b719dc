"""A PNG grid of generated images with their captions underneath, for a human to look at."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def save_grid(images: np.ndarray, captions: list[str], path: str | Path, *, cols: int = 8, cell: int = 128) -> Path:
    """images: uint8 (N, H, W, 3). Each image is upscaled to `cell` px (nearest) above its caption."""
    n = len(images)
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    font = ImageFont.load_default()
    line_h, lines = 11, 4
    text_h = line_h * lines + 4
    sheet = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    wrap = max(8, cell // 6)
    for i, (img, cap) in enumerate(zip(images, captions)):
        r, c = divmod(i, cols)
        x, y = c * cell, r * (cell + text_h)
        sheet.paste(Image.fromarray(img).resize((cell, cell), Image.NEAREST), (x, y))
        for j, line in enumerate(textwrap.wrap(cap, wrap)[:lines]):
            draw.text((x + 2, y + cell + 2 + j * line_h), line, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
