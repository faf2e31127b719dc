"""The built-in procedural captioned-image dataset "shapes" (the demo's data).

Each image is one or two flat-coloured shapes on a black background, captioned with a fixed template::

    "a small red triangle at the top left"
    "a small red triangle at the top left and a large blue circle at the bottom right"

The factors are compositional: colour x shape x size x position. A fixed set of (colour, shape)
combinations, `HELDOUT_PAIRS`, never appears in a training or validation image (in neither shape of a
two-shape image); the "heldout" split renders exactly those combinations, so a prior trained on the
"train" split can be asked for captions it has never seen and the result checked automatically by
`dalle_ds.eval.composition.check_image`.

Design choices, all in favour of a model that learns in minutes on a CPU (the demo renders 16 px; tests
mostly 32 px), composes pairs it never saw, and an automatic checker that is never in doubt (it reads
every validation image right at both sizes):

* Palette: the six fully saturated RGB primaries and secondaries. Their chromaticities (RGB divided by
  the brightest channel) are at least 1.0 apart, so a blurred, darkened or noisy dVAE reconstruction is
  still classified by its hue, and a colour blended with the black background keeps its hue.
* Shapes: six (circle, square, triangle, diamond, cross, bar) and one held-out shape per colour, each
  shape held out once, so every colour is seen with five shapes and every shape with five colours.
  The more shapes each colour is seen with, the more a small prior composes: with an ideal tokenizer
  (each 2x2 patch's colour and pixel occupancy) the same prior drew held-out pairs right 1 % of the
  time with three shapes, 38 % with five and 58 % with six (its image-token loss on seen captions ~0
  in every case: with few pairs it memorises them instead of learning colour and shape apart).
* Layout: a canonical layout in image fractions, scaled to any `image_size`. Shape centres lie on a
  3x3 grid at 1/4, 1/2 and 3/4 of the side, and each scene is shifted as a whole by -1, 0 or +1 times
  `MAX_SHIFT` (1/16 of the side, 1 px at 16 px) along each axis, among the shifts that keep every box
  inside the image. The shift keeps the prior from memorising one image per caption; whole steps (not
  a continuous shift) keep the number of distinct renderings of a shape small, which a 2x2-patch dVAE
  reconstructs far more sharply. It is far from the checker's cell boundaries (1/8 away) and, shared by
  both shapes of a scene, never makes them overlap.
* Sizes: "small" spans 12/32 of the side and "large" 16/32 (6 and 8 px at 16 px), 2 px apart at 16 px.
  Grid centres lie on pixel edges, so at 16 px every box edge does too: a square's or a cross's edges
  are whole pixels, not anti-aliased half pixels. With 5 and 7 px boxes (half-pixel edges) the demo's
  dVAE rendered held-out pairs right 0.76 of the time and the demo scored 0.73 on held-out captions;
  with 6 and 8 px, 0.84 and 0.79 (one run each, seed 0, 16 candidates per caption).
* Two shapes are placed two grid steps apart along at least one axis (e.g. "top left" with "right") and
  always have different colours, so they never overlap (two large shapes' boxes share an edge, a small
  shape keeps a 2/32 gap) and the checker can segment each shape by its colour alone.
* Rendering: PIL at 4x supersampling, downsampled with a box filter. Edges are anti-aliased (darker
  versions of the same hue) and interiors keep the exact palette colour.
* Determinism: item i of a split is drawn from a generator seeded by (seed, split, i), so it does not
  depend on the order in which items are read, on DataLoader workers or on other instances.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------------------------
# Vocabulary of the scenes

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "bar")
SIZES: tuple[str, ...] = ("small", "large")

# Half the side of a shape's bounding box, as a fraction of the image side (12/32 and 16/32 in all).
HALF_EXTENT: dict[str, float] = {"small": 6 / 32, "large": 8 / 32}

# Named positions on a 3x3 grid: (row, column), row 0 = top, column 0 = left.
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "centre",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
POSITION_GRID: dict[str, tuple[int, int]] = {name: divmod(k, 3) for k, name in enumerate(POSITIONS)}
GRID_CENTRES: tuple[float, float, float] = (0.25, 0.5, 0.75)  # centre of row/column 0, 1, 2
MAX_SHIFT = 1 / 16  # a scene's random shift along each axis, fraction of the side
POSITION_ALIASES: dict[str, str] = {"center": "centre", "middle": "centre"}

# Held out of training and validation: a diagonal of the colour x shape table, so each colour and each
# shape is held out exactly once and still seen in five other pairs.
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = tuple(zip(COLOURS, SHAPES))
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT_PAIRS)

# Position pairs allowed in a two-shape scene: two grid steps apart along at least one axis.
FAR_POSITION_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (a, b)
    for a, b in itertools.combinations(POSITIONS, 2)
    if max(abs(POSITION_GRID[a][0] - POSITION_GRID[b][0]), abs(POSITION_GRID[a][1] - POSITION_GRID[b][1])) == 2
)

SPLITS: dict[str, int] = {"train": 0, "val": 1, "heldout": 2}
SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeSpec:
    """One shape of a scene."""

    colour: str
    shape: str
    size: str
    position: str
    shift: tuple[float, float] = (0.0, 0.0)  # (dx, dy) of the whole scene, fractions of the side

    def __post_init__(self) -> None:
        for value, allowed, what in (
            (self.colour, COLOURS, "colour"),
            (self.shape, SHAPES, "shape"),
            (self.size, SIZES, "size"),
            (self.position, POSITIONS, "position"),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} at the {self.position}"

    @property
    def centre(self) -> tuple[float, float]:
        """(x, y) of the bounding-box centre as fractions of the image side."""
        row, col = POSITION_GRID[self.position]
        return GRID_CENTRES[col] + self.shift[0], GRID_CENTRES[row] + self.shift[1]

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) bounding box as fractions of the image side."""
        cx, cy = self.centre
        h = HALF_EXTENT[self.size]
        return cx - h, cy - h, cx + h, cy + h


# ----------------------------------------------------------------------------------------------
# Captions


def caption_of(scene: Iterable[ShapeSpec]) -> str:
    """ "a small red triangle at the top left and a large blue circle at the bottom right"."""
    return " and ".join(s.phrase for s in scene)


_PHRASE = re.compile(
    r"^an?\s+(?P<size>{})\s+(?P<colour>{})\s+(?P<shape>{})\s+(?:at|in)\s+the\s+(?P<position>{})$".format(
        "|".join(SIZES),
        "|".join(COLOURS),
        "|".join(SHAPES),
        "|".join(sorted(list(POSITIONS) + list(POSITION_ALIASES), key=len, reverse=True)),
    )
)


def parse_caption(caption: str) -> list[ShapeSpec]:
    """The shapes named by a caption of the dataset's template, in caption order.

    Case, surrounding whitespace, repeated spaces and a final full stop are ignored, and "center" is
    accepted for "centre". Raises ValueError for a caption that does not follow the template.
    """
    text = " ".join(caption.lower().split()).rstrip(".").strip()
    specs = []
    for phrase in text.split(" and "):
        m = _PHRASE.match(phrase.strip())
        if m is None:
            raise ValueError(
                f"caption {caption!r}: cannot parse {phrase!r}; expected e.g. 'a small red triangle at the top left'"
            )
        position = POSITION_ALIASES.get(m["position"], m["position"])
        specs.append(ShapeSpec(colour=m["colour"], shape=m["shape"], size=m["size"], position=position))
    return specs


def scene_from_caption(caption: str) -> list[ShapeSpec]:
    """Alias of `parse_caption` (the scene a caption describes, e.g. to render a reference image)."""
    return parse_caption(caption)


# ----------------------------------------------------------------------------------------------
# Rendering


def render_scene(scene: Iterable[ShapeSpec], image_size: int, *, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Render shapes on black as a uint8 array (image_size, image_size, 3).

    Drawn at `supersample` times the size and box-filtered down: interiors keep the pure palette colour,
    edges get darker shades of the same hue.
    """
    if image_size < 4:
        raise ValueError(f"image_size must be >= 4, got {image_size}")
    n = image_size * supersample
    canvas = Image.new("RGB", (n, n), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for spec in scene:
        x0, y0, x1, y1 = (round(v * n) for v in spec.box)
        fill = PALETTE[spec.colour]
        if spec.shape == "square":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)  # PIL boxes include both ends
        elif spec.shape == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
        elif spec.shape == "triangle":  # isosceles, apex up, filling its bounding box
            draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
        elif spec.shape == "diamond":  # the box's edge midpoints joined
            cx, cy = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2
            draw.polygon([(cx, y0), (x1 - 1, cy), (cx, y1 - 1), (x0, cy)], fill=fill)
        elif spec.shape == "cross":  # a plus sign with arms a third of the box wide
            t = (x1 - x0) / 3
            draw.rectangle([round(x0 + t), y0, round(x1 - t) - 1, y1 - 1], fill=fill)
            draw.rectangle([x0, round(y0 + t), x1 - 1, round(y1 - t) - 1], fill=fill)
        elif spec.shape == "bar":  # the box's full width, its middle half in height
            q = (y1 - y0) / 4
            draw.rectangle([x0, round(y0 + q), x1 - 1, round(y1 - q) - 1], fill=fill)
        else:  # pragma: no cover - ShapeSpec validates
            raise ValueError(spec.shape)
    if supersample > 1:
        canvas = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    return np.asarray(canvas, dtype=np.uint8).copy()


def render_caption(caption: str, image_size: int) -> np.ndarray:
    """Reference image for any caption of the template (held-out combinations included)."""
    return render_scene(parse_caption(caption), image_size)


# ----------------------------------------------------------------------------------------------
# Scene sampling


def _shifted(scene: list[ShapeSpec], rng: np.random.Generator) -> list[ShapeSpec]:
    """The scene moved along each axis by -MAX_SHIFT, 0 or +MAX_SHIFT (uniformly among those that keep
    every box inside)."""
    shift = []
    for axis in range(2):
        allowed = [
            k * MAX_SHIFT
            for k in (-1, 0, 1)
            if all(0.0 <= s.box[axis] + k * MAX_SHIFT and s.box[axis + 2] + k * MAX_SHIFT <= 1.0 for s in scene)
        ]
        shift.append(float(allowed[rng.integers(len(allowed))]))
    return [replace(s, shift=(shift[0], shift[1])) for s in scene]


def _sample_training_scene(rng: np.random.Generator, two_shape_prob: float) -> list[ShapeSpec]:
    """Training/validation scene before its shift: only `TRAIN_PAIRS`, uniform over pairs, sizes and positions."""
    if rng.random() < two_shape_prob:
        positions = list(FAR_POSITION_PAIRS[rng.integers(len(FAR_POSITION_PAIRS))])
        if rng.random() < 0.5:
            positions.reverse()
        first = TRAIN_PAIRS[rng.integers(len(TRAIN_PAIRS))]
        others = [p for p in TRAIN_PAIRS if p[0] != first[0]]  # two shapes never share a colour
        second = others[rng.integers(len(others))]
        return [
            ShapeSpec(colour=c, shape=s, size=SIZES[rng.integers(len(SIZES))], position=pos)
            for (c, s), pos in zip((first, second), positions)
        ]
    colour, shape = TRAIN_PAIRS[rng.integers(len(TRAIN_PAIRS))]
    return [
        ShapeSpec(
            colour=colour,
            shape=shape,
            size=SIZES[rng.integers(len(SIZES))],
            position=POSITIONS[rng.integers(len(POSITIONS))],
        )
    ]


def _heldout_orders(seed: int) -> list[list[tuple[str, str]]]:
    """For each held-out pair, a seed-dependent order of its (size, position) combinations."""
    combos = [(s, p) for s in SIZES for p in POSITIONS]
    orders = []
    for k in range(len(HELDOUT_PAIRS)):
        perm = np.random.default_rng([seed, SPLITS["heldout"], k]).permutation(len(combos))
        orders.append([combos[j] for j in perm])
    return orders


def _heldout_scene(i: int, orders: list[list[tuple[str, str]]]) -> list[ShapeSpec]:
    """Item i cycles over the held-out pairs (i mod 6) and, per pair, over all sizes and positions."""
    k = i % len(HELDOUT_PAIRS)
    colour, shape = HELDOUT_PAIRS[k]
    size, position = orders[k][(i // len(HELDOUT_PAIRS)) % len(orders[k])]
    return [ShapeSpec(colour=colour, shape=shape, size=size, position=position)]


def heldout_captions(n: int, seed: int = 0) -> list[str]:
    """n single-shape captions of held-out pairs: the captions of items 0..n-1 of the heldout split.

    Item i names pair i mod 6, so any n >= 6 covers every held-out pair evenly; 108 covers every
    (pair, size, position) once.
    """
    orders = _heldout_orders(seed)
    return [caption_of(_heldout_scene(i, orders)) for i in range(n)]


class ShapesDataset(torch.utils.data.Dataset):
    """`size` captioned images of one split: {"image": uint8 (3, H, W), "caption": str}.

    Splits: "train" (training pairs, one or two shapes), "val" (the same distribution, other seeds)
    and "heldout" (one shape, held-out pairs only, cycled as in `heldout_captions`).

    `noise` adds uniform integer noise in [-noise, noise] to every subpixel (fixed per item). A perfectly
    constant background makes the dVAE's logit-Laplace likelihood unbounded (the decoder drives b -> 0
    there and learns nothing else); photographs never have that, and 10 levels of noise restore it.

    Rendered items are kept in memory when the whole split fits in `CACHE_BYTES`: training reads each
    item many times, and PIL rendering at 4x supersampling costs as much as a sixth of a demo dVAE step.
    """

    CACHE_BYTES = 256 * 2**20

    def __init__(
        self, *, split: str, size: int, image_size: int, seed: int = 0, two_shape_prob: float = 0.3, noise: int = 10
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if not 0.0 <= two_shape_prob <= 1.0:
            raise ValueError(f"two_shape_prob must be in [0, 1], got {two_shape_prob}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not 0 <= noise <= 64:
            raise ValueError(f"noise must be in [0, 64] levels, got {noise}")
        self.noise = noise
        self.split, self.size, self.image_size = split, size, image_size
        self.seed, self.two_shape_prob = seed, two_shape_prob
        self._orders = _heldout_orders(seed) if split == "heldout" else None
        fits = size * 3 * image_size**2 <= self.CACHE_BYTES
        self._cache: dict[int, tuple[torch.Tensor, str]] | None = {} if fits else None

    def __len__(self) -> int:
        return self.size

    def scene(self, i: int) -> list[ShapeSpec]:
        """The shapes of item i (no rendering)."""
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for a dataset of {self.size} items")
        rng = np.random.default_rng([self.seed, SPLITS[self.split], i])
        if self._orders is not None:
            scene = _heldout_scene(i, self._orders)
        else:
            scene = _sample_training_scene(rng, self.two_shape_prob)
        return _shifted(scene, rng)

    def caption(self, i: int) -> str:
        """The caption of item i without rendering it (e.g. to train the tokenizer)."""
        return caption_of(self.scene(i))

    def captions(self) -> list[str]:
        return [self.caption(i) for i in range(self.size)]

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            i += self.size
        hit = self._cache.get(i) if self._cache is not None else None
        if hit is None:
            scene = self.scene(i)
            hit = self._render(i, scene), caption_of(scene)
            if self._cache is not None:
                self._cache[i] = hit
        return {"image": hit[0].clone(), "caption": hit[1]}

    def _render(self, i: int, scene: list[ShapeSpec]) -> torch.Tensor:
        pixels = render_scene(scene, self.image_size)  # (H, W, 3) uint8
        if self.noise:
            rng = np.random.default_rng([self.seed, SPLITS[self.split], i, 1])
            jitter = rng.integers(-self.noise, self.noise + 1, size=pixels.shape)
            pixels = np.clip(pixels.astype(np.int16) + jitter, 0, 255).astype(np.uint8)
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()  # (3, H, W)
