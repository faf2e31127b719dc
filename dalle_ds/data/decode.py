"""Robust decoding of one image-text pair from raw bytes: convert what can be converted, refuse the rest.

Every refusal raises `BadInput(kind)`; every conversion is reported by name. The caller counts both
(`dalle_ds.data.report.PassReport`), so a pass over dirty data never dies and always says what it saw.

Image kinds refused:  zero_byte, not_an_image, corrupt (truncated or broken stream), decompression_bomb.
Image kinds converted: grayscale (L/LA/1), cmyk, rgba (alpha composited on white), palette (P/PA),
                       high_bit_depth (16-bit I;16 / I / F scaled to 8 bit).
Caption kinds refused: caption_missing, caption_empty.  Converted: caption_not_utf8 (decoded as cp1252,
                       then latin-1, which never fails, with a BOM stripped).
A source may hand over a BadInput instead of bytes (it refused to read the file: data/safe_read.py, tars.py);
decoding raises it, so it is counted like the rest.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image


class BadInput(Exception):
    """One record cannot be used; `kind` names why (a counter key)."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default bomb threshold (about 0.25 GiB of RGB)


def _to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """(RGB image, name of the conversion or None)."""
    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode in ("P", "PA"):
        rgba = img.convert("RGBA")
        return _composite(rgba), "palette"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        return _composite(img.convert("RGBA")), "rgba" if mode.startswith("RGB") else "grayscale"
    if mode in ("L", "1"):
        return img.convert("RGB"), "grayscale"
    if mode == "CMYK":
        return img.convert("RGB"), "cmyk"
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or (a.max(initial=0) > 255) else 255.0
        a8 = np.clip(np.round(a / hi * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a8, "L").convert("RGB"), "high_bit_depth"
    if mode in ("RGBX", "YCbCr", "LAB", "HSV"):
        return img.convert("RGB"), "colour_space"
    return img.convert("RGB"), "other_mode"


def _composite(rgba: Image.Image) -> Image.Image:
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def open_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and size-check without decoding the pixels (cheap: reads the header)."""
    if isinstance(data, BadInput):  # the source refused to read it (data/safe_read.py)
        raise data.with_traceback(None)
    if data is None or len(data) == 0:
        raise BadInput("zero_byte")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadInput("decompression_bomb", str(e)) from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for non-images
        raise BadInput("not_an_image", type(e).__name__) from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise BadInput("corrupt", "empty size")
    if w * h > max_pixels:
        raise BadInput("decompression_bomb", f"{w}x{h} > {max_pixels} pixels")
    return img


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, str | None]:
    """(uint8 (H, W, 3), conversion name or None); raises BadInput."""
    img = open_image(data, max_pixels=max_pixels)
    try:
        img.load()  # full decode: truncated files fail here (LOAD_TRUNCATED_IMAGES stays False)
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        rgb, conversion = _to_rgb(img)
        arr = np.asarray(rgb, dtype=np.uint8)
    except BadInput:
        raise
    except Exception as e:  # noqa: BLE001
        raise BadInput("corrupt", f"{type(e).__name__}: {e}") from None
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise BadInput("corrupt", f"decoded shape {arr.shape}")
    return arr, conversion


def decode_caption(data: bytes | str | None) -> tuple[str, str | None]:
    """(caption, conversion name or None); raises BadInput for missing or empty captions."""
    if isinstance(data, BadInput):  # the source refused to read it (data/safe_read.py)
        raise data.with_traceback(None)
    if data is None:
        raise BadInput("caption_missing")
    conversion = None
    if isinstance(data, (bytes, bytearray)):
        raw = bytes(data)
        if raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            conversion = "caption_not_utf8"
            try:
                text = raw.decode("cp1252")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
    else:
        text = str(data)
    # A caption file may hold several captions, one per line (the DALLE-pytorch layout); we take the first
    # non-empty line so that a pass is deterministic.
    lines = [" ".join(line.replace("\x00", " ").split()) for line in text.splitlines()]
    text = next((line for line in lines if line), "")
    if not text:
        raise BadInput("caption_empty")
    return text, conversion
