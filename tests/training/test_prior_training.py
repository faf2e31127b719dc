"""Prior training under real DeepSpeed engines: ZeRO-3 across two CPU ranks, exact resume, export."""

import json

import pytest
import torch
from helpers import launch_deepspeed, make_encoded_dataset, write_ds_config

from dalle_ds.config import apply_overrides
from dalle_ds.prior.io import load_prior
from dalle_ds.prior.train import train_prior


def _losses(summary):
    return [h["loss"] for h in summary["history"]]


@pytest.mark.parametrize("tied", [False, True])
def test_two_rank_zero3_matches_single_process(tmp_path, tiny_cfg, tied):
    """`deepspeed --num_gpus 2` (2 CPU ranks, ZeRO-3, micro-batch 4) gives the single-process loss curve
    for the same global batch of 8, also with the output head tied to the embeddings (the 12b preset's
    choice: ZeRO-3 must gather the embedding tables where the head reads them, outside their modules)."""
    data = make_encoded_dataset(tmp_path / "data", tiny_cfg)
    steps = 6
    tie = f"prior.tie_embeddings={tied}"
    single = train_prior(
        apply_overrides(tiny_cfg, [f"prior_train.steps={steps}", tie]),
        ds_config=write_ds_config(tmp_path / "one.json", micro=8, stage=0),
        data_dir=data,
        out_dir=tmp_path / "single",
        progress=False,
    )
    launch_deepspeed(
        2,
        29731,
        "run_tiny_prior.py",
        data,
        tmp_path / "two",
        write_ds_config(tmp_path / "z3.json", micro=4, stage=3),
        steps,
        tie,
    )
    two = json.loads((tmp_path / "two" / "losses.json").read_text())
    assert len(two) == steps
    assert torch.allclose(torch.tensor(two), torch.tensor(_losses(single)), rtol=1e-4, atol=1e-5), (
        two,
        _losses(single),
    )
    assert _losses(single)[-1] < _losses(single)[0]  # and it learns


def test_resume_continues_the_same_loss_curve(tmp_path, tiny_cfg):
    """A run stopped after step 4 and restarted from its checkpoint reproduces steps 5..8 of an
    uninterrupted run exactly (data position, dropout RNG, optimizer and LR schedule all restored)."""
    data = make_encoded_dataset(tmp_path / "data", tiny_cfg)
    ds = write_ds_config(tmp_path / "ds.json", micro=4, stage=0)
    cfg8 = apply_overrides(tiny_cfg, ["prior_train.steps=8", "prior_train.save_every=3", "prior.dropout=0.1"])
    full = train_prior(cfg8, ds_config=ds, data_dir=data, out_dir=tmp_path / "full", progress=False)
    first = train_prior(cfg8, ds_config=ds, data_dir=data, out_dir=tmp_path / "cut", progress=False, stop_at=4)
    torch.manual_seed(12345)  # disturb the global RNG: the checkpoint must restore it
    rest = train_prior(cfg8, ds_config=ds, data_dir=data, out_dir=tmp_path / "cut", progress=False)
    assert rest["history"][0]["step"] == 5
    assert _losses(first) + _losses(rest) == _losses(full)


def load_cfg_copy(cfg):
    from dalle_ds.config import from_dict

    return from_dict(cfg.to_dict())


def test_export_loads_without_deepspeed_and_checks_config(tmp_path, tiny_cfg):
    """prior.pt rebuilds the model and tokenizer from the file alone; a mismatching config is refused."""
    from dalle_ds.config import ConfigError

    data = make_encoded_dataset(tmp_path / "data", tiny_cfg)
    cfg = apply_overrides(tiny_cfg, ["prior_train.steps=2"])
    s = train_prior(
        cfg,
        ds_config=write_ds_config(tmp_path / "ds.json", micro=4, stage=0),
        data_dir=data,
        out_dir=tmp_path / "run",
        progress=False,
    )
    model, tok, saved = load_prior(s["path"])
    assert saved == cfg
    text = tok.encode_batch(["a small red circle at the top left"])
    assert model.logits(text, torch.zeros(1, cfg.prior.image_len, dtype=torch.long))[1].isfinite().all()
    other = apply_overrides(load_cfg_copy(cfg), ["prior.image_vocab_size=64", "dvae.vocab_size=64"])
    with pytest.raises(ConfigError, match="prior.image_vocab_size"):
        load_prior(s["path"], other)
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") >= 2
    assert any((tmp_path / "run" / "tensorboard").iterdir())
