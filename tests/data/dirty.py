"""Builders of small dirty image-text folders for the data tests (no downloads)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

GOOD = "a small red triangle at the top left"


def png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def rgb(w: int = 40, h: int = 40, seed: int = 0) -> Image.Image:
    a = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(a, "RGB")


def put(root: Path, name: str, image: bytes | None, caption: bytes | None) -> None:
    if image is not None:
        (root / name).write_bytes(image)
    if caption is not None:
        (root / name).with_suffix(".txt").write_bytes(caption)


def make_dirty_folder(root: Path, n_good: int = 6) -> dict:
    """A folder with `n_good` clean pairs and one (or more) of every defect; returns the expected counts."""
    root.mkdir(parents=True, exist_ok=True)
    cap = GOOD.encode()
    for i in range(n_good):
        put(root, f"good_{i}.png", png(rgb(seed=i)), cap)
    # refused
    put(root, "zero.jpg", b"", cap)
    put(root, "notimage.jpg", b"this is plain text, not a jpeg\n" * 20, cap)
    put(root, "htmlimage.png", b"<html><body>404 not found</body></html>", cap)
    full = png(rgb(64, 64, seed=9), "JPEG")
    put(root, "truncated.jpg", full[: len(full) // 2], cap)
    whole = png(rgb(64, 64, seed=10))
    put(root, "corrupt.png", whole[:60] + bytes(200) + whole[260:], cap)
    put(root, "bomb.png", png(Image.new("L", (12000, 12000))), cap)  # 144 Mpx > the 89 Mpx default, tiny file
    put(root, "nocaption.png", png(rgb(seed=11)), None)
    put(root, "emptycaption.png", png(rgb(seed=12)), b"  \n\t\n")
    # converted
    put(root, "gray.png", png(rgb(seed=13).convert("L")), cap)
    put(root, "cmyk.jpg", png(rgb(seed=14).convert("CMYK"), "JPEG"), cap)
    put(root, "rgba.png", png(rgb(seed=15).convert("RGBA")), cap)
    put(root, "palette.png", png(rgb(seed=16).convert("P")), cap)
    a16 = (np.random.default_rng(17).integers(0, 65536, size=(40, 40))).astype(np.uint16)
    put(root, "sixteen.png", png(Image.fromarray(a16)), cap)
    put(root, "latin1.png", png(rgb(seed=18)), "a small café at the top left".encode("latin-1"))
    # filtered
    put(root, "short.png", png(rgb(seed=19)), b"logo")  # one word, and not boilerplate ("untitled" is)
    put(root, "french.png", png(rgb(seed=20)), b"une petite voiture rouge sur la route")
    put(root, "cyrillic.png", png(rgb(seed=21)), "маленький красный треугольник слева".encode())
    put(root, "boiler.png", png(rgb(seed=22)), b"IMG_1234.JPG photographed on 2014-06-03")
    put(root, "wide.png", png(rgb(90, 40, seed=23)), cap)
    put(root, "tall.png", png(rgb(30, 70, seed=24)), cap)
    return {
        "kept": n_good + 6,
        "skipped": {
            "zero_byte": 1,
            "not_an_image": 2,
            "corrupt": 2,
            "decompression_bomb": 1,
            "caption_missing": 1,
            "caption_empty": 1,
        },
        "converted": {"grayscale": 1, "cmyk": 1, "rgba": 1, "palette": 1, "high_bit_depth": 1, "caption_not_utf8": 1},
        "filtered": {"caption_too_short": 1, "caption_not_english": 2, "caption_boilerplate": 1, "aspect_ratio": 2},
    }


def write_shard(path: Path, samples: list[tuple[str, bytes, bytes]]) -> list[int]:
    """A webdataset tar of (key, png bytes, caption bytes) samples; returns each sample's first header offset."""
    import tarfile

    starts = []
    with tarfile.open(path, "w") as tf:
        for key, image, caption in samples:
            starts.append(tf.offset)
            for ext, data in (("png", image), ("txt", caption)):
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return starts


def shard_samples(prefix: str, n: int, seed: int = 0) -> list[tuple[str, bytes, bytes]]:
    return [(f"{prefix}_{i:03d}", png(rgb(seed=seed + i)), f"{GOOD} number {seed + i}".encode()) for i in range(n)]
