"""The real-data benchmark (`dalle-ds demo --data`, demo/real.py) end to end at the tiny preset's size: every
stage runs on a captioned folder and metrics.json holds each number the benchmark reports."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from dalle_ds.config import load_config
from dalle_ds.demo.real import run_real

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def _put(folder: Path, i: int, colour: str, number: int) -> str:
    """A 16 px picture: a square of the colour, size and place varying with i, on white."""
    a = np.full((16, 16, 3), 255, np.uint8)
    s = 4 + i % 6
    a[i % 5 : i % 5 + s, i % 7 : i % 7 + s] = COLOURS[colour]
    Image.fromarray(a).save(folder / f"{i:03d}.png")
    caption = f"a {colour} square number {number}"
    (folder / f"{i:03d}.txt").write_text(caption)
    return caption


def test_benchmark_on_a_folder_writes_pictures_and_every_metric(tmp_path, one_thread):
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    names = list(COLOURS)
    train_caps = {_put(root / "train", i, names[i % 4], i % 12) for i in range(48)}  # 12 captions
    val_caps = [_put(root / "val", 100 + i, names[i % 4], i // 4) for i in range(36)]  # 36 distinct
    in_train = sum(c in train_caps for c in val_caps)
    assert in_train == 9  # both groups of the split are exercised
    steps = ["dvae_train.steps=3", "prior_train.steps=3", "clip.steps=3", "clip.augment=0.15"]
    cfg = load_config("tiny", overrides=["data.dataset=folder", f"data.path={root}", *steps])
    m = run_real(cfg, tmp_path / "out", num_eval=36, fid=False, progress=False)

    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == m
    for png in ("recon.png", "samples.png", "samples_shuffled.png"):
        assert Image.open(tmp_path / "out" / png).size[0] > 0
    assert m["heldout_images"] == 36 and m["heldout_caption_in_train"] == in_train
    for name in ("real", "generated", "shuffled_generated"):
        parts = [m[f"{name}_retrieval_top1{g}"] for g in ("", "_caption_in_train", "_caption_not_in_train")]
        assert all(0 <= p <= 1 for p in parts)
        # the whole is the two groups weighted by their sizes
        whole = (parts[1] * in_train + parts[2] * (36 - in_train)) / 36
        assert abs(parts[0] - whole) < 1e-3
    assert m["prior_steps"] == m["dvae_steps"] == m["clip_steps"] == 3
    assert 1 <= m["dvae_codes_used_heldout"] <= m["dvae_vocab_size"]
    assert np.isfinite([m["prior_val_loss_image"], m["shuffled_prior_val_loss_image"], m["dvae_recon_psnr"]]).all()
