"""The demo end to end at the tiny preset: every stage runs and metrics.json has the promised fields."""

import json

from helpers import write_ds_config

from dalle_ds.config import load_config
from dalle_ds.data.shapes import HELDOUT_PAIRS, SHAPES
from dalle_ds.demo.shapes import run_demo


def test_tiny_demo_writes_samples_and_metrics(tmp_path):
    cfg = load_config(
        "tiny", overrides=["dvae_train.steps=4", "prior_train.steps=4", "data.num_train=64", "data.num_val=16"]
    )
    ds = write_ds_config(tmp_path / "ds.json", micro=8, stage=0)
    metrics = run_demo(
        cfg, tmp_path / "out", num_captions=4, per_caption=2, candidates=3, dvae_ds=ds, prior_ds=ds, progress=False
    )
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    for key in (
        "heldout_composition_accuracy",
        "seen_composition_accuracy",
        "dvae_recon_psnr",
        "dvae_recon_composition_accuracy",
        "dvae_recon_heldout_composition_accuracy",
        "prior_val_loss_text",
        "prior_val_loss_image",
        "heldout_composition_accuracy_all_candidates",
        "seen_composition_accuracy_all_candidates",
        "clip_val_retrieval_top1",
    ):
        assert key in saved and 0 <= saved[key] < 100, key
    assert saved["heldout_samples"] == 8 and saved["candidates_per_caption"] == 3  # 2 kept of 3, 4 captions
    first_pairs = {f"{c} {s}" for c, s in HELDOUT_PAIRS[:4]}  # caption i names held-out pair i mod 6
    for key in (
        "heldout_accuracy_by_pair",
        "heldout_accuracy_by_pair_all_candidates",
        "dvae_recon_heldout_accuracy_by_pair",
    ):
        pairs = first_pairs if key.startswith("heldout") else {f"{c} {s}" for c, s in HELDOUT_PAIRS}
        assert set(saved[key]) == pairs and all(0 <= v <= 1 for v in saved[key].values()), key
    assert set(saved["dvae_recon_accuracy_by_shape"]) <= set(SHAPES)
    assert {"dvae_train_s", "encode_s", "prior_train_s", "clip_train_s", "sample_s", "total_s"} <= set(
        saved["wall_seconds"]
    )
    assert (tmp_path / "out" / "samples.png").stat().st_size > 0


def test_demo_reuses_a_trained_dvae(tmp_path):
    """--dvae skips stage 1: no dVAE run folder, no dVAE training time, the same PSNR and reconstruction
    accuracy as the run that trained it."""
    cfg = load_config(
        "tiny", overrides=["dvae_train.steps=4", "prior_train.steps=2", "data.num_train=32", "data.num_val=16"]
    )
    ds = write_ds_config(tmp_path / "ds.json", micro=8, stage=0)
    first = run_demo(cfg, tmp_path / "a", num_captions=2, per_caption=1, dvae_ds=ds, prior_ds=ds, progress=False)
    again = run_demo(
        cfg,
        tmp_path / "b",
        num_captions=2,
        per_caption=1,
        dvae_ds=ds,
        prior_ds=ds,
        progress=False,
        dvae_path=tmp_path / "a" / "dvae" / "dvae.pt",
    )
    assert not (tmp_path / "b" / "dvae").exists() and "dvae_train_s" not in again["wall_seconds"]
    assert again["dvae_recon_psnr"] == first["dvae_recon_psnr"]
    assert again["dvae_recon_composition_accuracy"] == first["dvae_recon_composition_accuracy"]
    assert again["dvae_steps"] is None and first["dvae_steps"] == 4
