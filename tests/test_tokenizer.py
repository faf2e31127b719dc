"""BPE caption tokenizer: round trip, case, dropout, padding, truncation, serialisation, vocab size."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from dalle_ds.config import TokenizerConfig, preset_shapes, preset_tiny
from dalle_ds.data.shapes import ShapesDataset
from dalle_ds.tokenizer import CaptionTokenizer

FREE = [
    "the red circle and the blue square",
    "a large cyan triangle",
    "at the top the small magenta circle is left of a green square",
    "two yellow triangles",
]


@pytest.fixture(scope="module")
def captions():
    return ShapesDataset(split="train", size=2000, image_size=32).captions()


@pytest.fixture(scope="module")
def cfg():
    return TokenizerConfig(vocab_size=256, text_len=32, bpe_dropout=0.1)


@pytest.fixture(scope="module")
def tok(captions, cfg):
    return CaptionTokenizer.train(captions + FREE, cfg)


def test_round_trip(tok, captions):
    for c in captions[:300] + FREE:
        ids = tok.encode(c)
        assert tok.decode(ids) == tok.normalize(c) == c
    messy = "  A Large   RED circle at the TOP\tleft  "
    assert tok.normalize(messy) == "a large red circle at the top left"
    assert tok.decode(tok.encode(messy)) == "a large red circle at the top left"
    # unseen words made of seen letters still round-trip (BPE falls back to smaller pieces)
    assert tok.decode(tok.encode("a tiny orange octagon")) == "a tiny orange octagon"
    # a padded row decodes to the caption
    assert tok.decode(tok.encode_batch([captions[0]])[0]) == captions[0]


def test_shapes_words_are_single_tokens(tok, captions):
    """With the shapes preset's vocabulary every caption word is one token (easy for a small prior)."""
    for c in captions[:50]:
        assert len(tok.encode(c)) == len(c.split())


def test_case_insensitive(tok, captions):
    for c in captions[:50] + FREE:
        assert tok.encode(c.upper()) == tok.encode(c)
        assert tok.encode(c.title(), train=False) == tok.encode(c)


def test_lowercase_off_keeps_case(captions):
    cfg = TokenizerConfig(vocab_size=128, text_len=32, bpe_dropout=0.0, lowercase=False)
    tok = CaptionTokenizer.train(captions[:300], cfg)
    assert tok.encode("RED") != tok.encode("red")


def test_bpe_dropout_only_when_training(tok):
    c = "a small magenta triangle at the bottom right"  # stays within text_len even with dropout
    det = tok.encode(c)
    assert all(tok.encode(c) == det for _ in range(50))
    assert torch.equal(tok.encode_batch([c] * 8), tok.encode_batch([c] * 8, train=False))
    dropped = [tok.encode(c, train=True) for _ in range(50)]
    assert sum(d != det for d in dropped) >= 5
    assert all(len(d) >= len(det) for d in dropped)
    assert all(tok.decode(d) == c for d in dropped)  # another segmentation of the same text
    # the deterministic tokenizer is unaffected by dropout having been used
    assert tok.encode(c) == det


def test_no_dropout_when_disabled(captions):
    cfg = TokenizerConfig(vocab_size=256, text_len=32, bpe_dropout=0.0)
    tok = CaptionTokenizer.train(captions[:500], cfg)
    c = captions[3]
    assert all(tok.encode(c, train=True) == tok.encode(c) for _ in range(30))


def test_padding(tok, captions, cfg):
    batch = captions[:16] + ["", "a"]
    out = tok.encode_batch(batch)
    assert out.shape == (len(batch), cfg.text_len) and out.dtype == torch.long
    for row, c in zip(out, batch):
        ids = tok.encode(c)
        assert row[: len(ids)].tolist() == ids
        assert (row[len(ids) :] == tok.pad_id).all()
        assert (row[: len(ids)] != 0).all()
    assert tok.pad_id == 0
    assert (out[16] == 0).all()  # the empty caption is all pads
    for train in (False, True):
        out = tok.encode_batch(captions[:64], train=train)
        lengths = (out != 0).sum(dim=1)
        # pads form a suffix: no 0 before the last real token
        assert all((row[:n] != 0).all() and (row[n:] == 0).all() for row, n in zip(out, lengths))
    # a literal "[PAD]" in a caption is not turned into a pad
    ids = tok.encode("a red [PAD] circle")
    assert 0 not in ids and tok.unk_id in ids


def test_truncation_warns_once(captions):
    cfg = TokenizerConfig(vocab_size=256, text_len=5, bpe_dropout=0.1)
    tok = CaptionTokenizer.train(captions[:500], cfg)
    long = "a small red square at the top left and a large blue circle at the bottom right"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(tok.encode(long)) == 5
        assert len(tok.encode(long, train=True)) == 5
        assert tok.encode_batch([long, long]).shape == (2, 5)
        tok.encode("a red circle")  # fits: no warning
    assert len([w for w in caught if "truncated" in str(w.message)]) == 1
    assert tok.encode_batch([long])[0].tolist() == tok.encode(long)
    with warnings.catch_warnings(record=True) as caught:  # a fresh instance warns again, once
        warnings.simplefilter("always")
        other = CaptionTokenizer.from_json(tok.to_json(), cfg)
        other.encode(long)
        other.encode(long)
    assert len(caught) == 1


def test_serialisation_round_trip(tok, captions, cfg, tmp_path):
    loaded = CaptionTokenizer.from_json(tok.to_json(), cfg)
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    from_file = CaptionTokenizer.load(path, cfg)
    for c in captions[:100] + FREE:
        assert loaded.encode(c) == from_file.encode(c) == tok.encode(c)
    assert torch.equal(loaded.encode_batch(captions[:20]), tok.encode_batch(captions[:20]))
    assert loaded.vocab_size == tok.vocab_size
    assert json.loads(tok.to_json())["model"]["dropout"] is None  # dropout comes from the config
    c = captions[0]
    assert any(loaded.encode(c, train=True) != loaded.encode(c) for _ in range(50))
    with pytest.raises(ValueError, match="vocab_size"):
        CaptionTokenizer.from_json(tok.to_json(), TokenizerConfig(vocab_size=64, text_len=32))


@pytest.mark.parametrize("vocab_size", [40, 64, 96, 256])
def test_vocab_size_respected(captions, vocab_size):
    cfg = TokenizerConfig(vocab_size=vocab_size, text_len=128, bpe_dropout=0.0)
    tok = CaptionTokenizer.train(captions[:500] + FREE + ["ÀÉÎÕÜ qwxz jk 0123456789 ,.;:!?"], cfg)
    assert tok.vocab_size <= vocab_size
    ids = tok.encode_batch(captions[:100] + FREE)
    assert int(ids.max()) < tok.vocab_size
    if vocab_size == 256:
        assert tok.vocab_size < 256  # the shapes vocabulary is exhausted before the limit


def test_presets_fit(captions):
    """The shapes and tiny presets' tokenizers train on shapes captions and fit their configs."""
    for cfg in (preset_shapes().tokenizer, preset_tiny().tokenizer):
        tok = CaptionTokenizer.train(captions, cfg)
        assert tok.vocab_size <= cfg.vocab_size
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tiny's text_len 12 truncates two-shape captions
            out = tok.encode_batch(captions[:8])
        assert out.shape == (8, cfg.text_len)
