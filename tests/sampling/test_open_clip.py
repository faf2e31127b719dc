"""`--open-clip`: dalle_ds's torch port of open_clip against open_clip itself.

open_clip cannot be imported here (see dalle_ds/sampling/open_clip_config.py), so its outputs were recorded
once by tests/data/open_clip/make_fixture.py, run with real open_clip 3.3.0 on two tiny random models."""

from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).resolve().parents[1] / "data" / "open_clip"
TINY = f"{DATA / 'tiny.json'}:{DATA / 'tiny.pt'}"  # ARCH:CHECKPOINT with a config file as ARCH
SPECS = {"tiny": TINY, "variant": str(DATA / "variant")}  # the hub folder form


@pytest.fixture(scope="module")
def ref():
    return torch.load(DATA / "reference.pt", weights_only=True)


def test_tokenizer_matches_open_clip(ref):
    """Punctuation, contractions, unicode, html entities, mojibake, curly quotes, specials, truncation."""
    from dalle_ds.rerank.clip_bpe import ClipTokenizer

    assert torch.equal(ClipTokenizer()(ref["tokenizer_cases"]), ref["tokenizer_ids"])


@pytest.mark.parametrize("name", ["tiny", "variant"])
def test_reranker_matches_open_clip(ref, name, one_thread):
    """Preprocessing, token ids, both towers and the reranker's score equal open_clip's on the same files."""
    from dalle_ds.rerank.open_clip_model import preprocess
    from dalle_ds.rerank.rerankers import load_reranker

    r, want = load_reranker(open_clip=SPECS[name]), ref[name]
    for im, pix in zip(ref["pre_images"], want["pre_pixels"]):  # odd sizes, both orientations
        torch.testing.assert_close(preprocess(im.numpy()[None], r.cfg.preprocess)[0], pix, rtol=0, atol=1e-6)
    assert torch.equal(r.tokenizer(ref["captions"]), want["ids"])
    with torch.no_grad():
        torch.testing.assert_close(r.model.encode_image(want["pixels"]), want["image_features"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r.model.encode_text(want["ids"]), want["text_features"], rtol=1e-5, atol=1e-5)
    scores = r.score(ref["images"].numpy(), ref["captions"])
    torch.testing.assert_close(scores, want["scores"], rtol=1e-5, atol=1e-5)
    assert scores.std() > 0.01  # a non-degenerate check: the captions score differently


def test_builtin_config_has_open_clips_layout(ref):
    """ViT-B-32, read from the installed package's config file, gets exactly open_clip's names and shapes."""
    from dalle_ds.rerank.open_clip_config import load_config
    from dalle_ds.rerank.open_clip_model import OpenClip

    with torch.device("meta"):
        model = OpenClip(load_config("ViT-B-32"))
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == ref["vit_b_32_shapes"]


def test_checkpoint_forms_and_errors(ref, tmp_path, one_thread):
    """open_clip training's {"state_dict": {"module.…"}} file scores the same; wrong input fails clearly."""
    from dalle_ds.rerank.open_clip_config import load_config
    from dalle_ds.rerank.rerankers import load_reranker

    sd = torch.load(DATA / "tiny.pt", weights_only=True)
    wrapped = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, wrapped)
    r = load_reranker(open_clip=f"{DATA / 'tiny.json'}:{wrapped}")
    torch.testing.assert_close(r.score(ref["images"].numpy(), ref["captions"]), ref["tiny"]["scores"])

    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_reranker(open_clip=f"ViT-B-32:{tmp_path / 'missing.pt'}")
    with pytest.raises(ValueError, match="does not match"):  # the tiny weights under ViT-B-32's config
        load_reranker(open_clip=f"ViT-B-32:{DATA / 'tiny.pt'}")
    with pytest.raises(ValueError, match="ARCH:CHECKPOINT"):
        load_reranker(open_clip=str(DATA / "tiny.pt"))
    with pytest.raises(ValueError, match="unknown open_clip model"):
        load_config("ViT-Nope-99")
    with pytest.raises(ValueError, match="timm"):
        load_config("convnext_base")  # a real built-in open_clip config with a timm image tower
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="weights_only"):
        load_reranker(open_clip=f"{DATA / 'tiny.json'}:{tmp_path / 'pickled.pt'}")


def test_rerank_keeps_the_matching_image_after_training(tmp_path, one_thread):
    """The tiny model trained a few steps on red/blue pairs, saved and reloaded through `--open-clip`:
    `rerank` keeps the red candidate for the red caption and the blue one for the blue caption."""
    from dalle_ds.rerank.clip_bpe import ClipTokenizer
    from dalle_ds.rerank.open_clip_config import load_config
    from dalle_ds.rerank.open_clip_model import load_model, preprocess
    from dalle_ds.rerank.rerankers import load_reranker, rerank

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = load_config(str(DATA / "tiny.json"))
    model = load_model(cfg, DATA / "tiny.pt").train()
    tok = ClipTokenizer(cfg.text.context_length)

    def solid(rgb, n):
        return np.clip(np.array(rgb)[None, None, None] + rng.normal(0, 20, (n, 20, 20, 3)), 0, 255).astype(np.uint8)

    captions = ["a red picture", "a blue picture"]
    ids = tok(captions)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        x = preprocess(np.concatenate([solid((220, 30, 30), 4), solid((30, 30, 220), 4)]), cfg.preprocess)
        zi = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
        zt = torch.nn.functional.normalize(model.encode_text(ids), dim=-1)
        loss = torch.nn.functional.cross_entropy(10 * zi @ zt.T, torch.tensor([0] * 4 + [1] * 4))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(model.state_dict(), tmp_path / "trained.pt")

    r = load_reranker(open_clip=f"{DATA / 'tiny.json'}:{tmp_path / 'trained.pt'}")
    red, blue = solid((220, 30, 30), 1)[0], solid((30, 30, 220), 1)[0]
    kept, scores = rerank(r, np.stack([blue, red, red, blue]), captions, candidates=2, keep=1)
    assert np.array_equal(kept[0], red) and np.array_equal(kept[1], blue)
    assert loss.item() < 0.3
