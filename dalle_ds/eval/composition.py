"""Deterministic checker of generated "shapes" images against their captions.

For each shape a caption names (`dalle_ds.data.shapes.parse_caption`), `check_image` answers:

* colour   - is there a blob of the caption's colour, of a plausible size?
* shape    - is that blob (the largest 8-connected component of the colour) the named shape?
* position - does the fitted shape's box centre fall in the named cell of the 3x3 grid?
* size     - is the fitted box side nearer the small or the large extent?

How, and why it survives the blur, noise and colour drift of a small dVAE:

1. Colour. Each pixel is classified by chromaticity rather than RGB distance: it is foreground when
   its brightest channel is >= 40 % of full scale and its saturation (max - min) / max >= 0.5, and its
   colour is the palette entry nearest to rgb / max(rgb) if within 0.55 (the palette's chromaticities
   are >= 1.0 apart). A colour mixed with the black background (anti-aliased or blurred edges) keeps
   its hue; grey, white and ambiguous tints are left unclassified. Only the largest connected
   component of the caption's colour counts, so scattered noise pixels do not matter; its area must lie
   between 1.5 % of the image (about 30 % of the smallest shape) and 45 % (an all-red image is not "a
   red circle").
2. Shape, by fitting a generative model rather than thresholding. Around the blob, the colour's
   strength map s = min(on channels) - max(off channels) is computed (1 inside a pure shape, 0 on
   black and on every other palette colour, proportional to coverage on anti-aliased edges). For each
   candidate shape (square, disc, apex-up triangle, diamond, cross, 2:1 bar) the size follows from the
   blob's half-maximum area, the position from its strength-weighted centroid (a triangle's box centre
   lies a sixth of its height above its centroid), and the template is rendered with sub-pixel
   coverage, blurred with a Gaussian of sigma in {0, 0.5, 1, 1.5, 2} px at 32 px (scaled with the
   image) and scaled by the least-squares amplitude; sizes 0.9x, 1x and 1.1x are tried too. The shape with the smallest
   relative squared residual wins. Because blur is part of the model, a blurred square is still a
   square; because every pixel contributes, iid noise averages out. A best residual above 0.15 (a
   ring scores ~0.14, correct shapes under sigma=30 noise plus blur <= 0.09)
   means "other", which matches no shape.
3. Position and size come from the fitted template, not from a thresholded bounding box, so stray
   pixels attached to the blob do not move them. Grid cells are split half-way between the canonical
   centres (1/4, 1/2, 3/4), i.e. at 3/8 and 5/8; sizes at the mean of the small and large sides.

Measured on every colour x shape x size x position at 32 px: all right on clean renders, under
Gaussian noise sigma=20-30 (of 255) with a Gaussian blur of 0.7-1.2 px, and after a 2x box
downsample + bilinear upsample with noise 20; at 64 px also under much heavier blur. At 16 px (the
`tiny` and `shapes` presets) clean renders are all right but shapes are 6-8 px and noise breaks the shape call.
Everything is in fractions of the image side, so any image size works.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np
import torch

from dalle_ds.data.shapes import (
    COLOURS,
    GRID_CENTRES,
    HALF_EXTENT,
    PALETTE,
    POSITIONS,
    SHAPES,
    ShapeSpec,
    parse_caption,
)

MIN_VALUE = 0.4  # brightest channel, fraction of full scale, for a foreground pixel
MIN_SATURATION = 0.5  # (max - min) / max
MAX_CHROMA_DIST = 0.55  # distance of rgb / max(rgb) to the nearest palette chromaticity
MIN_AREA = 0.015  # blob area bounds, fractions of the image area
MAX_AREA = 0.45
MAX_RESIDUAL = 0.15  # best relative template residual above which the blob is no shape of ours
BLURS_AT_32 = (0.0, 0.5, 1.0, 1.5, 2.0)  # Gaussian sigmas tried, in pixels of a 32 px image
SIZE_FACTORS = (0.9, 1.0, 1.1)
# Fraction of its bounding box each shape covers (gives the box side from a blob's area).
SHAPE_AREA = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5, "diamond": 0.5, "cross": 5 / 9, "bar": 0.5}
SUPERSAMPLE = 4  # sub-pixels per side when rendering templates
# Cell boundaries half-way between the canonical centres; size boundary between the two box sides.
GRID_SPLITS = ((GRID_CENTRES[0] + GRID_CENTRES[1]) / 2, (GRID_CENTRES[1] + GRID_CENTRES[2]) / 2)
SIZE_SPLIT = HALF_EXTENT["small"] + HALF_EXTENT["large"]

_CHROMA = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32) / 255.0  # (6, 3)
_ON = {c: np.array(PALETTE[c]) > 0 for c in COLOURS}


def _to_hwc_uint8(image) -> np.ndarray:
    """uint8 (H, W, 3) numpy is the documented input; (3, H, W) tensors (uint8, or float in [0, 1])
    and float arrays in [0, 1] are converted for convenience."""
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


# ----------------------------------------------------------------------------------------------
# Pixels and blobs


def classify_pixels(image: np.ndarray) -> np.ndarray:
    """Per-pixel palette index (int8, H x W): the index into `COLOURS`, or -1 for background/other."""
    rgb = _to_hwc_uint8(image).astype(np.float32) / 255.0
    vmax = rgb.max(axis=2)
    vmin = rgb.min(axis=2)
    chroma = rgb / np.maximum(vmax, 1e-6)[..., None]
    dist = np.linalg.norm(chroma[..., None, :] - _CHROMA, axis=-1)  # (H, W, 6)
    ok = (vmax >= MIN_VALUE) & ((vmax - vmin) >= MIN_SATURATION * vmax) & (dist.min(axis=2) <= MAX_CHROMA_DIST)
    return np.where(ok, dist.argmin(axis=2), -1).astype(np.int8)


def colour_strength(image: np.ndarray, colour: str) -> np.ndarray:
    """min(on channels) - max(off channels), clipped to [0, 1] (float32, H x W).

    1 on the pure colour, 0 on black and on every other palette colour, and proportional to coverage
    where the colour is mixed with black (anti-aliased or blurred edges).
    """
    x = _to_hwc_uint8(image).astype(np.float32) / 255.0
    on = _ON[colour]
    s = x[..., on].min(axis=-1) - (x[..., ~on].max(axis=-1) if (~on).any() else 0.0)
    return np.clip(s, 0.0, 1.0)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask (all False if the mask is empty)."""
    h, w = mask.shape
    seen = np.zeros(mask.shape, dtype=bool)
    best: list[tuple[int, int]] = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        comp, queue = [], deque([(int(y0), int(x0))])
        while queue:
            y, x = queue.popleft()
            comp.append((y, x))
            for yy in (y - 1, y, y + 1):
                for xx in (x - 1, x, x + 1):
                    if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                        seen[yy, xx] = True
                        queue.append((yy, xx))
        if len(comp) > len(best):
            best = comp
    out = np.zeros(mask.shape, dtype=bool)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def _dilate(mask: np.ndarray) -> np.ndarray:
    p = np.pad(mask, 1)
    h, w = mask.shape
    out = mask.copy()
    for dy in range(3):
        for dx in range(3):
            out |= p[dy : dy + h, dx : dx + w]
    return out


# ----------------------------------------------------------------------------------------------
# Template fitting


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Box-normalised coordinates (0..1, v down) inside the shape filling the box."""
    if shape == "square":
        return (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "triangle":  # apex up
        return (v >= 0) & (v <= 1) & (np.abs(u - 0.5) <= v / 2)
    if shape == "diamond":
        return np.abs(u - 0.5) + np.abs(v - 0.5) <= 0.5
    if shape == "cross":  # arms a third of the box wide
        return _inside("square", u, v) & ((np.abs(u - 0.5) <= 1 / 6) | (np.abs(v - 0.5) <= 1 / 6))
    if shape == "bar":  # full width, middle half of the height
        return (u >= 0) & (u <= 1) & (np.abs(v - 0.5) <= 0.25)
    raise ValueError(f"unknown shape {shape!r}")


def _render_template(shape: str, cx: float, cy: float, side: float, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Coverage of pixels [y0, y0 + h) x [x0, x0 + w) by `shape` in a side x side box centred at
    (cx, cy) (pixel units, pixel (0, 0) spanning [0, 1)^2)."""
    sub = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    ys = (y0 + np.arange(h)[:, None] + sub[None, :]).reshape(-1)
    xs = (x0 + np.arange(w)[:, None] + sub[None, :]).reshape(-1)
    v = (ys[:, None] - (cy - side / 2)) / side
    u = (xs[None, :] - (cx - side / 2)) / side
    m = _inside(shape, u, v).astype(np.float32)
    return m.reshape(h, SUPERSAMPLE, w, SUPERSAMPLE).mean(axis=(1, 3))


@lru_cache(maxsize=256)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """Row-normalised Gaussian blur along one axis as an n x n matrix (B @ img @ B.T blurs both)."""
    if sigma <= 1e-3:
        return np.eye(n, dtype=np.float32)
    i = np.arange(n, dtype=np.float32)
    k = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
    return (k / k.sum(axis=1, keepdims=True)).astype(np.float32)


def fit_shape(strength: np.ndarray, blob: np.ndarray) -> dict:
    """Fit every candidate shape to the strength map around `blob`; see the module docstring.

    Returns {"shape": best name or "other", "residuals": {shape: relative residual}, "centre": (x, y)
    box centre in pixels, "side": box side in pixels, "blur": sigma in pixels, "amplitude": float}.
    """
    H, W = strength.shape
    ys, xs = np.nonzero(blob)
    margin = max(2, round(3 * W / 32))
    y0, y1 = max(int(ys.min()) - margin, 0), min(int(ys.max()) + 1 + margin, H)
    x0, x1 = max(int(xs.min()) - margin, 0), min(int(xs.max()) + 1 + margin, W)
    s = strength[y0:y1, x0:x1]
    h, w = s.shape
    amplitude = float(np.percentile(s[blob[y0:y1, x0:x1]], 90))
    half = (s >= amplitude / 2) & _dilate(blob)[y0:y1, x0:x1]  # half-maximum area: blur-robust
    area = float(half.sum())
    hy, hx = np.nonzero(half)
    wt = s[half]
    cy = y0 + float((wt * (hy + 0.5)).sum() / wt.sum())
    cx = x0 + float((wt * (hx + 0.5)).sum() / wt.sum())
    norm = float((s * s).sum())
    scale = W / 32
    residuals, fits = {}, {}
    for shape in SHAPES:
        side0 = np.sqrt(area / SHAPE_AREA[shape])  # box side whose shape has the blob's area
        best = (np.inf, None)
        for factor in SIZE_FACTORS:
            side = side0 * factor
            box_cy = cy - side / 6 if shape == "triangle" else cy  # centroid is 2/3 down from the apex
            t0 = _render_template(shape, cx, box_cy, side, y0, x0, h, w)
            for b in BLURS_AT_32:
                t = _blur_matrix(h, b * scale) @ t0 @ _blur_matrix(w, b * scale).T
                amp = float((s * t).sum() / max(float((t * t).sum()), 1e-9))
                r = float(((s - amp * t) ** 2).sum()) / max(norm, 1e-9)
                if r < best[0]:
                    best = (r, dict(centre=(cx, box_cy), side=side, blur=b * scale, amplitude=amp))
        residuals[shape], fits[shape] = best
    name = min(residuals, key=residuals.get)
    out = dict(fits[name], residuals=residuals, shape=name if residuals[name] <= MAX_RESIDUAL else "other")
    return out


# ----------------------------------------------------------------------------------------------
# Checks


def _grid_index(f: float) -> int:
    return 0 if f < GRID_SPLITS[0] else (2 if f > GRID_SPLITS[1] else 1)


def _check_spec(image: np.ndarray, labels: np.ndarray, spec: ShapeSpec) -> dict:
    h, w = labels.shape
    blob = largest_component(labels == COLOURS.index(spec.colour))
    area = float(blob.sum()) / (h * w)
    detected: dict = {"area": area, "shape": None, "position": None, "size": None}
    result = {"colour": False, "shape": False, "position": False, "size": False, "detected": detected}
    if not MIN_AREA <= area <= MAX_AREA:
        return result
    fit = fit_shape(colour_strength(image, spec.colour), blob)
    cx, cy = fit["centre"]
    position = POSITIONS[3 * _grid_index(cy / h) + _grid_index(cx / w)]
    size = "large" if fit["side"] / w > SIZE_SPLIT else "small"
    detected.update(
        shape=fit["shape"],
        position=position,
        size=size,
        centre=(cx / w, cy / h),
        side=fit["side"] / w,
        blur=fit["blur"],
        amplitude=fit["amplitude"],
        residuals=fit["residuals"],
    )
    result.update(
        colour=True, shape=fit["shape"] == spec.shape, position=position == spec.position, size=size == spec.size
    )
    return result


def check_image(image: np.ndarray, caption: str) -> dict:
    """Check an image (uint8 (H, W, 3)) against its caption.

    Returns, for the FIRST shape named: `colour`, `shape`, `position`, `size` (bools; shape, position
    and size are False whenever colour is) and `detected` (blob area, fitted shape, position, size,
    centre and side as fractions of the image side, blur, amplitude and every template's residual).
    `shapes` holds the same dict for every shape named; `all_colour_and_shape` / `all_correct` say
    whether every shape named has colour and shape right (and, for all_correct, position too).
    Two shapes of one colour in a caption (never generated by the dataset) would both be checked
    against that colour's largest blob. Raises ValueError for a caption off the template.
    """
    image = _to_hwc_uint8(image)
    labels = classify_pixels(image)
    shapes = [_check_spec(image, labels, spec) for spec in parse_caption(caption)]
    out = dict(shapes[0])
    out["shapes"] = shapes
    out["all_colour_and_shape"] = all(s["colour"] and s["shape"] for s in shapes)
    out["all_correct"] = all(s["colour"] and s["shape"] and s["position"] for s in shapes)
    return out


def composition_accuracy(images: Iterable[np.ndarray] | np.ndarray | torch.Tensor, captions: Sequence[str]) -> dict:
    """Fractions of images whose first named shape has the right colour, shape, position, size and
    colour-and-shape, plus `all_colour_and_shape` / `all_correct` over every named shape, and `n`.
    `by_pair` ({"magenta cross": ...}) and `by_shape` ({"cross": ...}) give colour-and-shape per group of
    the first named shape: which pairs or shapes fail.

    `images`: uint8 (N, H, W, 3) numpy or a sequence of (H, W, 3) arrays; (N, 3, H, W) tensors (uint8
    or float in [0, 1]) are accepted too.
    """
    images = list(images)
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    keys = ("colour", "shape", "position", "size", "colour_and_shape", "all_colour_and_shape", "all_correct")
    totals = dict.fromkeys(keys, 0)
    groups: dict[str, dict[str, list[int]]] = {"by_pair": {}, "by_shape": {}}  # group -> [right, seen]
    for image, caption in zip(images, captions):
        r = check_image(image, caption)
        r["colour_and_shape"] = r["colour"] and r["shape"]
        for k in keys:
            totals[k] += int(bool(r[k]))
        first = parse_caption(caption)[0]
        for by, name in (("by_pair", f"{first.colour} {first.shape}"), ("by_shape", first.shape)):
            tally = groups[by].setdefault(name, [0, 0])
            tally[0] += int(bool(r["colour_and_shape"]))
            tally[1] += 1
    n = len(images)
    out: dict = {k: (v / n if n else 0.0) for k, v in totals.items()}
    out["n"] = n
    for by, tallies in groups.items():
        out[by] = {name: right / seen for name, (right, seen) in sorted(tallies.items())}
    return out
