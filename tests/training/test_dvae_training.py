"""dVAE training under a DeepSpeed engine (map-style and streamed data), export, and encoding to a
`datasets` dataset."""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from helpers import write_ds_config

from dalle_ds.config import apply_overrides
from dalle_ds.data.encode_grids import encode_to_disk, load_encoded
from dalle_ds.dvae.io import load_dvae
from dalle_ds.dvae.train import train_dvae

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "data"))  # dirty.py: bad-file folders


def test_train_export_encode(tmp_path, tiny_cfg):
    """Train the tiny dVAE a few steps, reload the EMA export without DeepSpeed, and encode both splits to
    uint16 token grids whose ids lie in the codebook."""
    cfg = apply_overrides(
        tiny_cfg, ["dvae_train.steps=6", "dvae_train.log_every=2", "data.num_train=48", "data.num_val=8"]
    )
    s = train_dvae(
        cfg,
        ds_config=write_ds_config(tmp_path / "ds.json", micro=8, stage=0),
        out_dir=tmp_path / "dvae",
        progress=False,
    )
    assert s["step"] == 6 and np.isfinite(s["recon_psnr"])
    assert [h["step"] for h in s["history"]] == [2, 4, 6]
    assert {"temperature", "kl_weight", "nll", "kl", "lr"} <= set(s["history"][-1])
    dvae, saved = load_dvae(s["path"], cfg)
    assert saved.dvae == cfg.dvae
    encode_to_disk(dvae, cfg, tmp_path / "tokens")
    caps, toks = load_encoded(tmp_path / "tokens", "train")
    assert len(caps) == 48 and toks.shape == (48, cfg.dvae.grid_size**2)
    assert int(toks.min()) >= 0 and int(toks.max()) < cfg.dvae.vocab_size
    # the stored grids are exactly the argmax encoding of the images
    from dalle_ds.data.sources import image_dataset

    x = image_dataset(cfg.data, "train")[0]["image"][None].float() / 255
    assert torch.equal(dvae.encode(x).flatten(1)[0], toks[0])


def test_resume_skips_finished_steps(tmp_path, tiny_cfg):
    """Re-running a finished dVAE run resumes from `latest` and does no more steps."""
    cfg = apply_overrides(tiny_cfg, ["dvae_train.steps=4", "dvae_train.save_every=2", "dvae_train.log_every=1"])
    ds = write_ds_config(tmp_path / "ds.json", micro=4, stage=0)
    train_dvae(cfg, ds_config=ds, out_dir=tmp_path / "d", progress=False)
    assert (tmp_path / "d" / "checkpoints" / "latest").read_text() == "step00000004"
    again = train_dvae(cfg, ds_config=ds, out_dir=tmp_path / "d", progress=False)
    assert again["step"] == 4 and again["history"] == []


# --- streamed training (data.streaming): a folder with bad files, exact resume, two ranks -----------------


def _stream_cfg(tiny_cfg, folder, *extra):
    return apply_overrides(
        tiny_cfg,
        [
            "data.dataset=folder",
            f"data.path={folder}",
            "data.streaming=true",
            "data.val_fraction=0.2",
            "dvae_train.log_every=1",
            *extra,
        ],
    )


def _expected_digest(cfg, n_items, rank=0, world=1):
    """Digest of the first n_items keys of a rank's shard, cycling epochs, listed by stream_items itself."""
    from dalle_ds.data.sources import stream_items
    from dalle_ds.data.stream import chain_digest

    keys = [it["key"] for _, it in stream_items(cfg.data, "train", "dvae", rank=rank, world=world)]
    digest = ""
    for i in range(n_items):
        digest = chain_digest(digest, keys[i % len(keys)])
    return digest, set(keys[:n_items])


def test_streamed_training_over_dirty_folder_logs_counts(tmp_path, tiny_cfg, capsys, one_thread):
    """A dVAE run streaming a folder with every defect (past one epoch) finishes, counts each defect kind
    and prints and writes the counts."""
    from dirty import make_dirty_folder

    expected = make_dirty_folder(tmp_path / "dirty", n_good=10)
    cfg = _stream_cfg(tiny_cfg, tmp_path / "dirty", "dvae_train.steps=5")
    s = train_dvae(
        cfg, ds_config=write_ds_config(tmp_path / "ds.json", micro=4, stage=0), out_dir=tmp_path / "run", progress=False
    )
    assert s["step"] == 5 and np.isfinite(s["recon_psnr"])
    rep = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert rep == s["data_report"] and rep["stream_ranks"][0]["epoch"] >= 1  # 20 items > one epoch
    for kind, n in expected["skipped"].items():  # each bad file counted (train: once per epoch read)
        assert rep["train"]["skipped"].get(kind, 0) + rep["val"]["skipped"].get(kind, 0) >= n, kind
    assert rep["train"]["kept"] == 20
    out = capsys.readouterr().out
    assert "[train] data pass: 20/" in out and "decompression_bomb=" in out


def test_streamed_resume_reads_the_same_items_and_loss_curve(tmp_path, tiny_cfg, one_thread):
    """Stopped after N steps and resumed to 2N, a streamed run reads exactly the items of an uninterrupted
    2N run (no item twice, none skipped; across an epoch boundary) and gives the same fp32 loss curve."""
    from dirty import make_dirty_folder

    make_dirty_folder(tmp_path / "dirty", n_good=10)
    cfg = _stream_cfg(tiny_cfg, tmp_path / "dirty", "dvae_train.steps=8", "dvae_train.save_every=100")
    ds = write_ds_config(tmp_path / "ds.json", micro=2, stage=0)
    full = train_dvae(cfg, ds_config=ds, out_dir=tmp_path / "full", progress=False)
    first = train_dvae(cfg, ds_config=ds, out_dir=tmp_path / "cut", progress=False, stop_at=4)
    assert first["data_report"]["stream_ranks"][0]["items"] == 8
    torch.manual_seed(12345)  # disturb the global RNG: the checkpoint must restore it
    rest = train_dvae(cfg, ds_config=ds, out_dir=tmp_path / "cut", progress=False)
    assert rest["history"][0]["step"] == 5
    assert [h["loss"] for h in first["history"] + rest["history"]] == [h["loss"] for h in full["history"]]
    a, b = full["data_report"]["stream_ranks"][0], rest["data_report"]["stream_ranks"][0]
    assert a == b and a["items"] == 16 and a["epoch"] == 1
    assert a["keys_digest"] == _expected_digest(cfg, 16)[0]
    assert full["data_report"]["train"] == rest["data_report"]["train"]  # counts carried over the resume


def test_two_rank_stream_reads_disjoint_items(tmp_path, tiny_cfg):
    """`deepspeed --num_gpus 2`: each rank streams its own shard of the folder; the items read are the
    expected ones per rank and no item is read by both."""
    from dirty import make_dirty_folder
    from helpers import launch_deepspeed

    make_dirty_folder(tmp_path / "dirty", n_good=10)
    steps = 3
    launch_deepspeed(
        2,
        29741,
        "run_tiny_dvae_stream.py",
        tmp_path / "dirty",
        tmp_path / "two",
        write_ds_config(tmp_path / "ds.json", micro=2, stage=0),
        steps,
        timeout=300,
    )
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert len(summary["losses"]) == steps
    ranks = summary["data_report"]["stream_ranks"]
    assert [(st["rank"], st["world"], st["items"]) for st in ranks] == [(0, 2, 6), (1, 2, 6)]
    cfg = _stream_cfg(tiny_cfg, tmp_path / "dirty")
    read = []
    for st in ranks:
        digest, keys = _expected_digest(cfg, st["items"], rank=st["rank"], world=2)
        assert st["keys_digest"] == digest
        read.append(keys)
    # a shard with fewer than 6 usable train records starts its next epoch: count distinct keys, not items
    assert read[0] and read[1] and not read[0] & read[1]
