"""The composition checker: right on clean and degraded renders, wrong on wrong images."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from dalle_ds.data.shapes import (
    COLOURS,
    HELDOUT_PAIRS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesDataset,
    ShapeSpec,
    render_caption,
    render_scene,
)
from dalle_ds.eval.composition import check_image, classify_pixels, composition_accuracy

ALL_SPECS = [
    ShapeSpec(colour=c, shape=s, size=z, position=p)
    for c, s, z, p in itertools.product(COLOURS, SHAPES, SIZES, POSITIONS)
]


def _degrade(img: np.ndarray, rng: np.random.Generator, *, noise: float, blur: float, down: int = 1) -> np.ndarray:
    """Stand-in for a lossy dVAE reconstruction: optional 2x down/up-sampling, blur, Gaussian noise."""
    im = Image.fromarray(img)
    if down > 1:
        n = im.size[0]
        im = im.resize((n // down, n // down), Image.Resampling.BOX).resize((n, n), Image.Resampling.BILINEAR)
    if blur:
        im = im.filter(ImageFilter.GaussianBlur(blur))
    out = np.asarray(im, dtype=np.float32) + rng.normal(0.0, noise, img.shape)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("image_size", [16, 32, 64])
def test_clean_renders_all_right(image_size):
    """Every colour x shape x size x position (held-out pairs included) is checked right."""
    images = [render_scene([s], image_size) for s in ALL_SPECS]
    acc = composition_accuracy(images, [s.phrase for s in ALL_SPECS])
    assert acc["n"] == len(ALL_SPECS) == len(COLOURS) * len(SHAPES) * len(SIZES) * len(POSITIONS)
    for key in ("colour", "shape", "position", "size", "colour_and_shape", "all_correct"):
        assert acc[key] == 1.0, (key, acc)
    assert set(HELDOUT_PAIRS) <= {(s.colour, s.shape) for s in ALL_SPECS}


@pytest.mark.parametrize("noise,blur,down", [(20.0, 0.8, 1), (10.0, 1.2, 1), (15.0, 0.0, 2)])
def test_noisy_blurred_renders_still_right(noise, blur, down):
    rng = np.random.default_rng(0)
    images = [_degrade(render_scene([s], 32), rng, noise=noise, blur=blur, down=down) for s in ALL_SPECS]
    acc = composition_accuracy(images, [s.phrase for s in ALL_SPECS])
    assert acc["colour"] == 1.0 and acc["position"] == 1.0, acc
    assert acc["shape"] >= 0.98 and acc["colour_and_shape"] >= 0.98, acc


def test_two_shape_images_every_shape_checked():
    ds = ShapesDataset(split="train", size=60, image_size=32, two_shape_prob=1.0)
    rng = np.random.default_rng(1)
    for i in range(60):
        item = ds[i]
        img = item["image"].permute(1, 2, 0).numpy()
        for image in (img, _degrade(img, rng, noise=15.0, blur=0.7)):
            r = check_image(image, item["caption"])
            assert len(r["shapes"]) == 2 and r["all_correct"], (item["caption"], r)
    # and the tensor / batch forms are accepted
    batch = torch.stack([ds[i]["image"] for i in range(4)])
    acc = composition_accuracy(batch, [ds.caption(i) for i in range(4)])
    assert acc["all_correct"] == 1.0 and acc["n"] == 4
    acc = composition_accuracy(batch.float() / 255, [ds.caption(i) for i in range(4)])
    assert acc["all_correct"] == 1.0


def test_dim_washed_out_colours_still_right():
    rng = np.random.default_rng(2)
    for spec in ALL_SPECS[::7]:
        img = render_scene([spec], 32).astype(np.float32)
        img = np.clip(img * rng.uniform(0.6, 0.85) + rng.uniform(0, 40), 0, 255).astype(np.uint8)
        r = check_image(img, spec.phrase)
        assert r["colour"] and r["shape"] and r["position"], (spec, r["detected"])


def test_wrong_colour_shape_position_and_blank():
    img = render_caption("a large red circle at the top left", 32)
    r = check_image(img, "a large red circle at the top left")
    assert r["colour"] and r["shape"] and r["position"] and r["size"]

    r = check_image(img, "a large blue circle at the top left")
    assert not r["colour"] and not r["shape"] and not r["position"]
    for other in ("square", "triangle"):
        r = check_image(img, f"a large red {other} at the top left")
        assert r["colour"] and not r["shape"] and r["position"]
    for other in POSITIONS[1:]:
        r = check_image(img, f"a large red circle at the {other}")
        assert r["colour"] and r["shape"] and not r["position"], other
    assert not check_image(img, "a small red circle at the top left")["size"]

    blank = np.zeros((32, 32, 3), np.uint8)
    for spec in ALL_SPECS[::11]:
        r = check_image(blank, spec.phrase)
        assert not (r["colour"] or r["shape"] or r["position"] or r["size"])
    acc = composition_accuracy([blank] * 3, ["a small red circle at the top"] * 3)
    assert acc["colour"] == acc["shape"] == acc["colour_and_shape"] == 0.0

    # per group of the first named shape: a right red circle, a blank "red circle", two right blue bars
    caps = [
        "a large red circle at the top left",
        "a small red circle at the top",
        "a large blue bar at the centre",
        "a small blue bar at the left and a large red circle at the right",
    ]
    acc = composition_accuracy([render_caption(caps[0], 32), blank] + [render_caption(c, 32) for c in caps[2:]], caps)
    assert acc["by_pair"] == {"blue bar": 1.0, "red circle": 0.5} and acc["by_shape"] == {"bar": 1.0, "circle": 0.5}

    # a few stray red pixels are not a red shape; a fully red image is not one either
    speck = blank.copy()
    speck[5, 5] = speck[20, 9] = speck[30, 30] = (255, 0, 0)
    assert not check_image(speck, "a small red circle at the top left")["colour"]
    full = np.full((32, 32, 3), (255, 0, 0), np.uint8)
    assert not check_image(full, "a large red square at the centre")["colour"]
    # white or grey is no palette colour
    assert (classify_pixels(np.full((4, 4, 3), 200, np.uint8)) == -1).all()


def test_second_shape_errors_are_reported():
    img = render_caption("a small red triangle at the top left and a large blue circle at the bottom right", 32)
    r = check_image(img, "a small red triangle at the top left and a large blue square at the bottom right")
    assert r["colour"] and r["shape"] and r["position"]  # first shape right
    assert r["shapes"][1]["colour"] and not r["shapes"][1]["shape"]
    assert not r["all_colour_and_shape"] and not r["all_correct"]


@pytest.mark.parametrize("image_size", [16, 32])
def test_dataset_images_all_right(image_size):
    """What the demo feeds the checker's ceiling: shifted, noisy val (one or two shapes) and held-out images."""
    for split, two in (("val", 0.5), ("heldout", 0.0)):
        ds = ShapesDataset(split=split, size=150, image_size=image_size, two_shape_prob=two, seed=7)
        images = [ds[i]["image"] for i in range(len(ds))]
        acc = composition_accuracy(torch.stack(images), ds.captions())
        assert acc["all_correct"] == 1.0, (split, acc)


def test_non_shapes_are_not_shapes():
    def draw(fn):
        im = Image.new("RGB", (128, 128))
        fn(ImageDraw.Draw(im))
        return np.asarray(im.resize((32, 32), Image.Resampling.BOX))

    ell = draw(
        lambda d: (
            d.rectangle([20, 20, 50, 100], fill=(0, 255, 0)),  # an L
            d.rectangle([20, 70, 100, 100], fill=(0, 255, 0)),
        )
    )
    ring = draw(lambda d: (d.ellipse([16, 16, 104, 104], fill=(0, 255, 0)), d.ellipse([40, 40, 80, 80], fill=0)))
    for img in (ell, ring):
        for shape in SHAPES:
            r = check_image(img, f"a large green {shape} at the centre")
            assert r["colour"] and not r["shape"], (shape, r["detected"])
    with pytest.raises(ValueError):
        check_image(ell, "a green thing somewhere")
