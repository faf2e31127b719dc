"""Deterministic checker of generated "shapes" images against their captions.

For each shape a caption names (`dalle_ds.data.shapes.parse_caption`), `check_image` answers:

* colour   - is there a blob of the caption's colour of a plausible size?
* shape    - is that blob (the largest 8-connected component of the colour) the named shape?
* position - does its bounding-box centre fall in the named cell of the 3x3 grid?
* size     - is its bounding box nearer the small or the large extent?

How, and why it survives a small dVAE's blur, noise and colour drift:

1. Pixels are classified by chromaticity, not by RGB distance: a pixel is foreground when its brightest
   channel is >= 40 % of full scale and its saturation (max - min) / max is >= 0.5; its colour is the
   palette entry nearest to rgb / max(rgb), if within 0.55 (palette chromaticities are >= 1.0 apart).
   Anti-aliased or blurred edges (the colour mixed with black) keep their hue, and the 40 % threshold
   sits near half-maximum so a symmetric blur moves the blob's outline very little. Grey, white and
   ambiguous tints (pink, orange-ish) are left unclassified.
2. Only the largest connected component of the caption's colour is used, so scattered noise pixels and
   small spurious blobs do not matter. Its area must lie between 1.5 % (about 30 % of the smallest
   shape, a small triangle) and 45 % of the image (an all-red image is not "a red circle").
3. The shape is the template (square, disc, apex-up triangle, each filling the blob's bounding box)
   with the highest IoU with the blob. Ideal masks score 1.0 on their own template against about 0.79
   (disc vs square) and about 0.5-0.6 (triangle vs the others). A blob whose bounding box is far from
   square (aspect > 1.6) or whose best IoU is below 0.6 is "other" and matches no shape.
4. The position uses the bounding-box centre rather than the centroid: a triangle's centroid sits a
   third of its half-height below the centre of its box, which is where the dataset places it.
   Grid cells are split half-way between the canonical centres (1/4, 1/2, 3/4), i.e. at 3/8 and 5/8.

Everything is scale-free (fractions of the image side), so any image size works.
"""
from __future__ import annotations

from collections import deque
from typing import Iterable, Sequence

import numpy as np
import torch

from dalle_ds.data.shapes import (COLOURS, HALF_EXTENT, PALETTE, POSITIONS, SHAPES, ShapeSpec,
                                  parse_caption)

MIN_VALUE = 0.4          # brightest channel, fraction of full scale, for a foreground pixel
MIN_SATURATION = 0.5     # (max - min) / max
MAX_CHROMA_DIST = 0.55   # distance of rgb / max(rgb) to the nearest palette chromaticity
MIN_AREA = 0.015         # blob area bounds, fractions of the image area
MAX_AREA = 0.45
MAX_ASPECT = 1.6         # bounding-box aspect ratio above which a blob is no shape of ours
MIN_IOU = 0.6            # best template IoU below which a blob is no shape of ours
GRID_SPLITS = (0.375, 0.625)  # half-way between the canonical centres 1/4, 1/2, 3/4
SIZE_SPLIT = HALF_EXTENT["small"] + HALF_EXTENT["large"]  # mid-way between the two box sides

_CHROMA = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32) / 255.0  # (6, 3)


def _to_hwc_uint8(image) -> np.ndarray:
    """Accept uint8 (H, W, 3) numpy (the documented input) and, for convenience, (3, H, W) tensors
    (uint8, or float in [0, 1])."""
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.is_floating_point():
            t = (t.clamp(0, 1) * 255).round().to(torch.uint8)
        if t.ndim == 3 and t.shape[0] == 3 and t.shape[-1] != 3:
            t = t.permute(1, 2, 0)
        image = t.numpy()
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an image of shape (H, W, 3), got {arr.shape}")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    return arr


def classify_pixels(image: np.ndarray) -> np.ndarray:
    """Per-pixel palette index (int8, H x W): the index into `COLOURS`, or -1 for background/other."""
    rgb = _to_hwc_uint8(image).astype(np.float32) / 255.0
    vmax = rgb.max(axis=2)
    vmin = rgb.min(axis=2)
    chroma = rgb / np.maximum(vmax, 1e-6)[..., None]
    dist = np.linalg.norm(chroma[..., None, :] - _CHROMA, axis=-1)  # (H, W, 6)
    idx = dist.argmin(axis=2)
    ok = (vmax >= MIN_VALUE) & ((vmax - vmin) >= MIN_SATURATION * vmax) & (dist.min(axis=2) <= MAX_CHROMA_DIST)
    return np.where(ok, idx, -1).astype(np.int8)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask (all False if the mask is empty)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        comp, queue = [], deque([(int(y0), int(x0))])
        while queue:
            y, x = queue.popleft()
            comp.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                        seen[yy, xx] = True
                        queue.append((yy, xx))
        if len(comp) > len(best):
            best = comp
    out = np.zeros_like(mask, dtype=bool)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def _templates(h: int, w: int) -> dict[str, np.ndarray]:
    """Each shape filling an h x w box, sampled at pixel centres."""
    v = (np.arange(h, dtype=np.float32)[:, None] + 0.5) / h  # 0 at the top
    u = (np.arange(w, dtype=np.float32)[None, :] + 0.5) / w
    return {
        "square": np.ones((h, w), dtype=bool),
        "circle": (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25,
        "triangle": np.abs(u - 0.5) <= v / 2,
    }


def classify_shape(blob: np.ndarray) -> tuple[str, dict[str, float]]:
    """Name of the template with the highest IoU with `blob` (bool mask), and every template's IoU."""
    ys, xs = np.nonzero(blob)
    if len(ys) == 0:
        return "other", {s: 0.0 for s in SHAPES}
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = blob[y0:y1, x0:x1]
    scores = {}
    for name, tmpl in _templates(y1 - y0, x1 - x0).items():
        scores[name] = float((crop & tmpl).sum() / max((crop | tmpl).sum(), 1))
    best = max(scores, key=scores.get)
    aspect = max(y1 - y0, x1 - x0) / min(y1 - y0, x1 - x0)
    if aspect > MAX_ASPECT or scores[best] < MIN_IOU:
        best = "other"
    return best, scores


def _grid_index(f: float) -> int:
    return 0 if f < GRID_SPLITS[0] else (2 if f > GRID_SPLITS[1] else 1)


def _check_spec(labels: np.ndarray, spec: ShapeSpec) -> dict:
    h, w = labels.shape
    blob = largest_component(labels == COLOURS.index(spec.colour))
    area = float(blob.sum()) / (h * w)
    detected: dict = {"area": area, "shape": None, "position": None, "size": None, "bbox": None,
                      "scores": None}
    result = {"colour": False, "shape": False, "position": False, "size": False, "detected": detected}
    if not MIN_AREA <= area <= MAX_AREA:
        return result
    ys, xs = np.nonzero(blob)
    x0, x1, y0, y1 = xs.min() / w, (xs.max() + 1) / w, ys.min() / h, (ys.max() + 1) / h
    shape, scores = classify_shape(blob)
    position = POSITIONS[3 * _grid_index((y0 + y1) / 2) + _grid_index((x0 + x1) / 2)]
    size = "large" if max(x1 - x0, y1 - y0) > SIZE_SPLIT else "small"
    detected.update(shape=shape, position=position, size=size, bbox=(x0, y0, x1, y1), scores=scores)
    result.update(colour=True, shape=shape == spec.shape, position=position == spec.position,
                  size=size == spec.size)
    return result


def check_image(image: np.ndarray, caption: str) -> dict:
    """Check an image against its caption.

    Returns, for the FIRST shape named: `colour`, `shape`, `position`, `size` (bools; shape, position
    and size are False whenever colour is) and `detected` (area, bbox, shape, position, size and the
    template IoUs of the blob found). `shapes` holds the same dict for every shape named, and
    `all_colour_and_shape` / `all_correct` say whether every shape named has colour and shape right
    (and, for all_correct, position too). Two shapes of the same colour in one caption (never
    generated by the dataset) would both be checked against that colour's largest blob.
    """
    labels = classify_pixels(image)
    shapes = [_check_spec(labels, spec) for spec in parse_caption(caption)]
    out = dict(shapes[0])
    out["shapes"] = shapes
    out["all_colour_and_shape"] = all(s["colour"] and s["shape"] for s in shapes)
    out["all_correct"] = all(s["colour"] and s["shape"] and s["position"] for s in shapes)
    return out


def composition_accuracy(images: Iterable[np.ndarray] | np.ndarray | torch.Tensor,
                         captions: Sequence[str]) -> dict:
    """Fractions of images whose first named shape has the right colour, shape, position, size and
    colour-and-shape, plus `all_colour_and_shape` / `all_correct` over every named shape, and `n`.

    `images`: uint8 (N, H, W, 3) numpy or a sequence of (H, W, 3) arrays; (N, 3, H, W) tensors (uint8
    or float in [0, 1]) are accepted too.
    """
    if isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[1] == 3:
        images = list(images)
    images = list(images)
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    keys = ("colour", "shape", "position", "size", "colour_and_shape", "all_colour_and_shape", "all_correct")
    totals = dict.fromkeys(keys, 0)
    for image, caption in zip(images, captions):
        r = check_image(image, caption)
        r["colour_and_shape"] = r["colour"] and r["shape"]
        for k in keys:
            totals[k] += int(bool(r[k]))
    n = len(images)
    out = {k: (v / n if n else 0.0) for k, v in totals.items()}
    out["n"] = n
    return out
