"""The emoji benchmark's preparation: an npm emoji-datasource package layout -> folder+txt pairs."""

import json

import numpy as np
import pytest
from PIL import Image

from dalle_ds.data.filters import is_english
from dalle_ds.data.prepare_emoji import caption_for, prepare, split_key

pytest.importorskip("emoji")  # the CLDR names (requirements.txt)


def fake_package(root, vendor="twitter"):
    """A tiny emoji-datasource-<vendor> layout: package.json, emoji.json, img/<vendor>/64/*.png."""
    pkg = root / f"emoji-datasource-{vendor}"
    img = pkg / "img" / vendor / "64"
    img.mkdir(parents=True)
    (pkg / "package.json").write_text(json.dumps({"name": f"emoji-datasource-{vendor}", "version": "16.0.0"}))
    entries = [  # (unified, package name, category, has image, png written)
        ("1F34E", "RED APPLE", "Food & Drink", True, True),
        ("1F347", "GRAPES", "Food & Drink", True, True),
        ("1F989", "OWL", "Animals & Nature", True, True),
        ("1F68C", "BUS", "Travel & Places", True, True),
        ("1F1EA-1F1EC", "Egypt Flag", "Flags", True, True),  # category left out
        ("1F34C", "BANANA", "Food & Drink", False, True),  # the package says: no picture in this style
        ("1F352", "CHERRIES", "Food & Drink", True, False),  # listed, file missing: left out
    ]
    data = []
    for i, (code, name, cat, has, write) in enumerate(entries):
        data.append(
            {"name": name, "unified": code, "image": f"{code.lower()}.png", "category": cat, f"has_img_{vendor}": has}
        )
        if write:
            px = np.zeros((64, 64, 4), np.uint8)  # transparent background
            px[16:48, 16:48] = (200, 10 * i, 30, 255)  # an opaque square in an entry-specific colour
            Image.fromarray(px, "RGBA").save(img / f"{code.lower()}.png")
    (pkg / "emoji.json").write_text(json.dumps(data))
    return pkg


def test_prepare_writes_pairs_on_white_with_cldr_captions(tmp_path):
    """Kept categories only, RGBA flattened on white at the asked size, same-stem captions, fixed split."""
    pkg = fake_package(tmp_path)
    counts = prepare([pkg], tmp_path / "out", size=32, val=1)
    assert counts == {"train": 3, "val": 1}
    pairs = {}
    for split in ("train", "val"):
        pngs = sorted((tmp_path / "out" / split).glob("*.png"))
        assert [p.stem for p in pngs] == [f"{n:04d}" for n in range(counts[split])]
        for p in pngs:
            im = np.asarray(Image.open(p))
            assert im.shape == (32, 32, 3)
            assert (im[0, 0] == 255).all() and (im[16, 16] != 255).any()  # white corner, coloured middle
            pairs[p.with_suffix(".txt").read_text().strip()] = tuple(im[16, 16])
    assert set(pairs) == {"a red apple", "grapes", "an owl", "a bus"}
    assert pairs["a red apple"] == (200, 0, 30) and pairs["an owl"] == (200, 20, 30)  # caption matches picture
    assert "CC-BY 4.0" in (tmp_path / "out" / "ATTRIBUTION.txt").read_text()
    again = prepare([pkg], tmp_path / "again", size=32, val=1)  # the split does not change between runs
    assert again == counts
    assert (tmp_path / "again" / "val" / "0000.txt").read_text() == (tmp_path / "out" / "val" / "0000.txt").read_text()


@pytest.mark.parametrize(
    "name, caption",
    [
        ("red_apple", "a red apple"),
        ("owl", "an owl"),
        ("grapes", "grapes"),
        ("bus", "a bus"),
        ("cactus", "a cactus"),
        ("dress", "a dress"),
        ("night with stars", "a night with stars"),
        ("woman\u2019s clothes", "woman's clothes"),
        ("tennis", "tennis"),
        ("pi\u00f1ata", "a pinata"),
        ("Cura\u00e7ao flag", "a curacao flag"),
    ],
)
def test_caption_articles(name, caption):
    """An article for singular names, none for plurals and mass nouns; typographic apostrophes and accented
    letters made ASCII, so the English caption filter keeps the picture."""
    assert caption_for(name) == caption
    assert is_english(caption)


def _other_style_in_train(sort_key, n_held=100) -> float:
    """Sort 400 emoji in two styles by sort_key, hold out the first n_held: the fraction of held-out pictures
    whose other style is in train."""
    keys = [f"{style}/1F{300 + i:03X}" for i in range(400) for style in ("twitter", "google")]
    held = set(sorted(keys, key=sort_key)[:n_held])
    other = {"twitter": "google", "google": "twitter"}
    return sum(f"{other[k.split('/')[0]]}/{k.split('/')[1]}" not in held for k in held) / n_held


def test_split_puts_each_style_on_either_side_independently():
    """Independent sides: 1 - 99/799 = 0.88 of the held-out pictures have their other style in train. The old
    CRC32 key (linear: keys differing only in the style prefix sort together) fails the same check."""
    import zlib

    assert 0.78 <= _other_style_in_train(split_key) <= 0.97
    assert _other_style_in_train(lambda k: (zlib.crc32(k.encode()), k)) < 0.75
