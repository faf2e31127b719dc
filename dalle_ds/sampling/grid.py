"""A PNG grid of generated images with their captions underneath, for a human to look at."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def save_grid(images: np.ndarray, captions: list[str], path: str | Path, *, cols: int = 8, cell: int = 128) -> Path:
    """images: uint8 (N, H, W, 3). Each image is upscaled to `cell` px (nearest) above its caption."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid_image(images, captions, cols=cols, cell=cell)).save(path)
    return path


def grid_image(images: np.ndarray, captions: list[str], *, cols: int = 8, cell: int = 128) -> np.ndarray:
    """save_grid's picture as uint8 (H, W, 3): image i at row i // cols, column i % cols, its top left corner
    at (row * (cell + text height), column * cell), caption lines below it."""
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
    return np.asarray(sheet)


def cell_size(image_size: int, at_least: int = 96) -> int:
    """A whole multiple of image_size of at least `at_least` px (when smaller): nearest upscaling copies pixels."""
    return image_size * max(1, -(-at_least // image_size))
