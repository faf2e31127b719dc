"""The procedural "shapes" dataset: determinism, captions, held-out pairs, geometry."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from dalle_ds.data.shapes import (
    COLOURS,
    FAR_POSITION_PAIRS,
    HELDOUT_PAIRS,
    MAX_SHIFT,
    PALETTE,
    POSITIONS,
    SHAPES,
    SIZES,
    TRAIN_PAIRS,
    ShapesDataset,
    ShapeSpec,
    caption_of,
    heldout_captions,
    parse_caption,
    render_scene,
    scene_from_caption,
)


def _pairs(scene):
    return {(s.colour, s.shape) for s in scene}


def test_heldout_design():
    assert len(HELDOUT_PAIRS) == len(set(HELDOUT_PAIRS)) == len(COLOURS)
    assert sorted(c for c, _ in HELDOUT_PAIRS) == sorted(COLOURS)  # one held-out shape per colour
    for shape in SHAPES:
        assert sum(s == shape for _, s in HELDOUT_PAIRS) == 1  # every shape held out once
    for colour in COLOURS:
        assert sum(c == colour for c, _ in TRAIN_PAIRS) == len(SHAPES) - 1
    for shape in SHAPES:
        assert sum(s == shape for _, s in TRAIN_PAIRS) == len(COLOURS) - 1


def test_deterministic_any_order_and_instance():
    a = ShapesDataset(split="train", size=40, image_size=32, seed=3)
    b = ShapesDataset(split="train", size=40, image_size=32, seed=3)
    forward = [a[i] for i in range(40)]
    backward = [b[i] for i in reversed(range(40))][::-1]
    for x, y, z in zip(forward, backward, (a[i] for i in range(40))):
        assert x["caption"] == y["caption"] == z["caption"]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["image"], z["image"])
    assert a[-1]["caption"] == a[39]["caption"]
    other_seed = ShapesDataset(split="train", size=40, image_size=32, seed=4)
    assert [other_seed.caption(i) for i in range(40)] != [a.caption(i) for i in range(40)]
    val = ShapesDataset(split="val", size=40, image_size=32, seed=3)
    assert [val.caption(i) for i in range(40)] != [a.caption(i) for i in range(40)]
    # a prefix of a longer dataset is the shorter dataset
    longer = ShapesDataset(split="train", size=100, image_size=32, seed=3)
    assert [longer.caption(i) for i in range(40)] == [a.caption(i) for i in range(40)]


def test_render_cache_returns_what_rendering_gives_and_cannot_be_mutated(monkeypatch):
    cached = ShapesDataset(split="train", size=30, image_size=16, seed=5)
    monkeypatch.setattr(ShapesDataset, "CACHE_BYTES", 0)  # too small for any split: renders every time
    fresh = ShapesDataset(split="train", size=30, image_size=16, seed=5)
    assert cached._cache is not None and fresh._cache is None
    for i in (3, 17, 3, 29, 17):
        a, b = cached[i], fresh[i]
        assert a["caption"] == b["caption"] and torch.equal(a["image"], b["image"])
        a["image"].zero_()  # the caller owns what it got; the cache keeps its copy
    assert torch.equal(cached[3]["image"], fresh[3]["image"]) and len(cached._cache) == 3


def test_item_format_and_sizes():
    for size in (16, 32, 64):
        ds = ShapesDataset(split="train", size=4, image_size=size, noise=0)
        item = ds[0]
        assert set(item) == {"image", "caption"}
        assert item["image"].shape == (3, size, size) and item["image"].dtype == torch.uint8
        assert isinstance(item["caption"], str)
        assert item["image"][:, 0, 0].tolist() == [0, 0, 0]  # black background in the corner
        spec = ds.scene(0)[0]
        cx, cy = spec.centre
        assert tuple(item["image"][:, int(cy * size), int(cx * size)].tolist()) == PALETTE[spec.colour]
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 64, 64) and len(batch["caption"]) == 2
    assert len(ds) == 4
    with pytest.raises(IndexError):
        ds.scene(4)
    with pytest.raises(ValueError):
        ShapesDataset(split="test", size=4, image_size=32)


def test_captions_parse_back_to_the_scene():
    ds = ShapesDataset(split="train", size=200, image_size=32, two_shape_prob=0.5, noise=0)
    n_two = 0
    for i in range(200):
        scene = ds.scene(i)
        caption = ds.caption(i)
        unshifted = [replace(s, shift=(0.0, 0.0)) for s in scene]  # a caption does not name the shift
        assert parse_caption(caption) == unshifted == scene_from_caption(caption)
        assert caption_of(parse_caption(caption)) == caption
        n_two += len(scene) == 2
    assert 60 < n_two < 140
    item = ds[5]
    assert np.array_equal(render_scene(ds.scene(5), 32), item["image"].permute(1, 2, 0).numpy())
    assert parse_caption("A Large  RED circle at the Center.") == [
        ShapeSpec(colour="red", shape="circle", size="large", position="centre")
    ]
    assert (
        caption_of(parse_caption("a small red triangle at the top left and a large blue circle at the bottom right"))
        == "a small red triangle at the top left and a large blue circle at the bottom right"
    )
    for bad in ("a red circle", "a small pink circle at the top", "a small red circle at the moon", ""):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_heldout_pairs_never_in_train_or_val():
    for split in ("train", "val"):
        ds = ShapesDataset(split=split, size=3000 if split == "train" else 500, image_size=32, two_shape_prob=0.3)
        seen, positions, sizes = set(), set(), set()
        for i in range(len(ds)):
            scene = ds.scene(i)
            pairs = _pairs(scene)
            assert not pairs & set(HELDOUT_PAIRS), (split, i, ds.caption(i))
            if len(scene) == 2:
                assert scene[0].colour != scene[1].colour  # colours identify shapes for the checker
            seen |= pairs
            positions |= {s.position for s in scene}
            sizes |= {s.size for s in scene}
        assert seen == set(TRAIN_PAIRS)  # every colour and every shape still appears
        assert {c for c, _ in seen} == set(COLOURS) and {s for _, s in seen} == set(SHAPES)
        assert positions == set(POSITIONS) and sizes == set(SIZES)


def test_heldout_split_covers_every_heldout_pair():
    ds = ShapesDataset(split="heldout", size=108, image_size=32, seed=1)
    scenes = [ds.scene(i) for i in range(108)]
    assert all(len(s) == 1 for s in scenes)
    assert {(s[0].colour, s[0].shape) for s in scenes[:6]} == set(HELDOUT_PAIRS)  # any n >= 6 covers all
    assert len({replace(s[0], shift=(0.0, 0.0)) for s in scenes}) == 108  # every pair x size x position once
    assert heldout_captions(108, seed=1) == [ds.caption(i) for i in range(108)]
    assert heldout_captions(12, seed=1) == heldout_captions(108, seed=1)[:12]
    assert heldout_captions(12, seed=2) != heldout_captions(12, seed=1)


def test_two_shapes_never_overlap():
    """Every allowed position pair, sizes and shapes: no shared pixel; with a small shape a gap of at least
    1 px at 32 px (two large shapes' boxes share an edge: 16/32 wide, centres 16/32 apart), and the checker
    reads both shapes of a touching pair right."""
    from dalle_ds.eval.composition import check_image

    for size in (16, 32):
        for (pa, pb), (sa, sb), (ha, hb) in itertools.product(
            FAR_POSITION_PAIRS, itertools.product(SIZES, SIZES), [("square", "square"), ("circle", "triangle")]
        ):
            one = ShapeSpec(colour="red", shape=ha, size=sa, position=pa)
            two = ShapeSpec(colour="blue", shape=hb, size=sb, position=pb)
            a = render_scene([one], size).any(axis=2)
            b = render_scene([two], size).any(axis=2)
            assert not (a & b).any(), (size, pa, pb, sa, sb)
            if sa == sb == "large":
                assert check_image(render_scene([one, two], size), caption_of([one, two]))["all_correct"]
            if size < 32 or sa == sb == "large":
                continue
            grown = a.copy()
            grown[1:] |= a[:-1]
            grown[:-1] |= a[1:]
            grown[:, 1:] |= grown[:, :-1].copy()
            grown[:, :-1] |= grown[:, 1:].copy()
            assert not (grown & b).any(), (size, pa, pb, sa, sb)


def test_scene_shift_is_shared_bounded_and_keeps_boxes_inside():
    """Every split shifts its scenes as a whole by -1, 0 or +1 MAX_SHIFT per axis, never out of the image."""
    shifts = []
    for split in ("train", "val", "heldout"):
        ds = ShapesDataset(split=split, size=300, image_size=16, two_shape_prob=0.5)
        for i in range(300):
            scene = ds.scene(i)
            assert len({s.shift for s in scene}) == 1
            dx, dy = scene[0].shift
            assert dx in (-MAX_SHIFT, 0.0, MAX_SHIFT) and dy in (-MAX_SHIFT, 0.0, MAX_SHIFT)
            for s in scene:
                x0, y0, x1, y1 = s.box
                assert 0.0 <= x0 and 0.0 <= y0 and x1 <= 1.0 and y1 <= 1.0, (split, i, s)
            shifts.append((dx, dy))
    counts = Counter(shifts)
    assert len(counts) == 9 and min(counts.values()) > 30  # every combination, none rare


def test_shapes_stay_inside_the_image():
    """A large square in every position, with every shift the scene sampler allows, is drawn whole (none of
    it cut off by the image border): 16 x 16 pixels at 32 px, from its box's top-left corner."""
    for p, dx, dy in itertools.product(POSITIONS, (-MAX_SHIFT, 0.0, MAX_SHIFT), (-MAX_SHIFT, 0.0, MAX_SHIFT)):
        spec = ShapeSpec(colour="green", shape="square", size="large", position=p, shift=(dx, dy))
        x0, y0, x1, y1 = spec.box
        if min(x0, y0) < 0.0 or max(x1, y1) > 1.0:  # the sampler never draws this shift here
            continue
        on = render_scene([spec], 32).any(axis=2)
        assert on.sum() == 16 * 16, (p, dx, dy)
        r, c = np.nonzero(on)
        assert (r.min(), c.min()) == (round(y0 * 32), round(x0 * 32)), (p, dx, dy)


def test_two_shape_prob_extremes():
    one = ShapesDataset(split="train", size=100, image_size=32, two_shape_prob=0.0)
    two = ShapesDataset(split="val", size=100, image_size=32, two_shape_prob=1.0)
    assert all(len(one.scene(i)) == 1 for i in range(100))
    assert all(len(two.scene(i)) == 2 for i in range(100))


def test_pixel_noise_is_bounded_and_fixed_per_item():
    """The default noise moves each subpixel by at most 10 levels around the clean render, the same way
    every time the item is read, and differently for different items."""
    noisy = ShapesDataset(split="train", size=8, image_size=32)
    clean = ShapesDataset(split="train", size=8, image_size=32, noise=0)
    for i in range(8):
        diff = noisy[i]["image"].int() - clean[i]["image"].int()
        assert diff.abs().max() <= 10 and diff.abs().max() > 0
        assert torch.equal(noisy[i]["image"], noisy[i]["image"])
    assert not torch.equal(
        noisy[0]["image"].int() - clean[0]["image"].int(), noisy[1]["image"].int() - clean[1]["image"].int()
    )
