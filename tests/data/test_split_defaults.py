"""Issue 16 item 2: data defaults a real captioned set survives: short captions, typographic quotes, and a val
split of the smaller of a few hundred items and 5 %, with a warning when it is tiny."""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from dirty import png, put, rgb  # noqa: E402

from dalle_ds.config import DataConfig, load_config  # noqa: E402
from dalle_ds.data.filters import caption_rejection, is_english, words  # noqa: E402
from dalle_ds.data.sources import image_dataset  # noqa: E402
from dalle_ds.data.split import HashSplit, hash_split, key_hash, val_count  # noqa: E402


def test_default_filters_keep_short_real_captions():
    """The defaults keep "A frog." (2 words) and drop a lone token; 3 words used to be the minimum."""
    cfg = DataConfig()
    for cap in ("A frog.", "an apple", "Red apple", "a frog on a lily pad"):
        assert caption_rejection(cap, cfg) is None, cap
    assert caption_rejection("logo", cfg) == "caption_too_short"
    assert caption_rejection("A frog.", DataConfig(min_caption_words=3)) == "caption_too_short"  # the old default


def test_typographic_apostrophes_and_quotes_read_like_ascii():
    """Curly apostrophes and quotes give the same words and the same verdict as their ASCII forms; contractions
    count as English. The captions with an apostrophe were dropped as not English before (4+ words, no function
    word: "santa", "s", "sleigh", ...)."""
    cfg = DataConfig()
    pairs = [
        ("Santa’s sleigh bells ringing", "Santa's sleigh bells ringing"),
        ("don’t walk sign flashing", "don't walk sign flashing"),
        ("Kermit’s friend Miss Piggy", "Kermit's friend Miss Piggy"),
        ("a “Smile” neon sign", 'a "Smile" neon sign'),
        ("Grandma‘s kitchen herb garden", "Grandma's kitchen herb garden"),
    ]
    for curly, ascii_ in pairs:
        assert words(curly) == words(ascii_), curly
        assert caption_rejection(curly, cfg) is None, curly
        assert caption_rejection(ascii_, cfg) is None, ascii_
    assert words("don’t stop") == ["don't", "stop"]
    # still refused: other languages, with or without apostrophes
    assert not is_english("l’eau de la mer bleue")
    assert caption_rejection("une voiture rouge sur la route", cfg) == "caption_not_english"


def test_val_count_rule():
    """val = min(300, 5 % of N) where N is known: 780 -> 39, 20,000 -> 300; never all, at least 1."""
    cfg = DataConfig()
    assert val_count(780, cfg) == 39
    assert val_count(20000, cfg) == 300 and val_count(6000, cfg) == 300
    assert val_count(100, cfg) == 5 and val_count(10, cfg) == 1 and val_count(2, cfg) == 1
    assert val_count(1, cfg) == 0 and val_count(0, cfg) == 0
    assert val_count(780, DataConfig(val_fraction=0.0)) == 0
    assert val_count(20000, DataConfig(val_max_items=1000)) == 1000


class _Keys:
    """Map-style records reduced to their keys (the split reads nothing else)."""

    def __init__(self, keys):
        self._keys = keys

    def __len__(self):
        return len(self._keys)

    def keys(self):
        return list(self._keys)


def test_hash_split_is_exact_stable_and_order_free():
    """Exactly val_count(N) keys are val, the smallest hashes; the same keys in another order give the same
    split; a streaming source (size unknown) holds out the fraction of the hash range."""
    cfg = DataConfig()
    keys = [f"img_{i:05d}.png" for i in range(780)]
    split = hash_split(_Keys(keys), cfg)
    val = {k for k in keys if split(k) == "val"}
    assert len(val) == 39
    assert val == set(sorted(keys, key=key_hash)[:39])  # independent reference: sort by hash
    again = hash_split(_Keys(list(reversed(keys))), cfg)
    assert {k for k in keys if again(k) == "val"} == val
    big = [f"k{i}" for i in range(20000)]
    split = hash_split(_Keys(big), cfg)
    assert sum(split(k) == "val" for k in big) == 300

    class Stream:
        streaming = True

    s = hash_split(Stream(), cfg)
    assert isinstance(s, HashSplit) and s.cut == int(0.05 * 2**64)
    assert abs(sum(s(k) == "val" for k in big) / len(big) - 0.05) < 0.01


def _folder(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        put(root, f"{i:03d}.png", png(rgb(8, 8, seed=i)), f"a frog number {i}".encode())
    return root


def test_folder_split_sizes_and_small_val_warning(tmp_path, caplog):
    """A folder of 40 pairs: 2 val (5 %), 38 train, disjoint; the val set warns that it is under 32 items."""
    root = _folder(tmp_path / "f", 40)
    cfg = load_config("tiny", overrides=["data.dataset=folder", f"data.path={root}"]).data
    with caplog.at_level(logging.WARNING):
        val = image_dataset(cfg, "val")
    assert len(val) == 2
    assert any("validation split holds only 2 items" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train = image_dataset(cfg, "train")
    assert len(train) == 38 and not caplog.records  # the train split does not warn
    assert not {train[i]["caption"] for i in range(38)} & {val[i]["caption"] for i in range(2)}
