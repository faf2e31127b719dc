"""`dalle-ds encode` at scale: any source, sharded across ranks, resumable, merged into one dataset."""

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from dirty import make_dirty_folder  # noqa: E402

from dalle_ds.config import load_config  # noqa: E402
from dalle_ds.data.encode_grids import encode_split, encode_to_disk, load_encoded  # noqa: E402
from dalle_ds.data.sources import image_dataset  # noqa: E402
from dalle_ds.dvae import DVAE  # noqa: E402


def test_two_ranks_interrupted_and_resumed_equal_one_rank(tmp_path):
    """Two ranks, one interrupted after a chunk and rerun, give the same pairs as a single-rank encode;
    the pass counts of the dirty folder are merged into encode_report.json."""
    make_dirty_folder(tmp_path / "dirty", n_good=14)
    cfg = load_config(
        "tiny", overrides=["data.dataset=folder", f"data.path={tmp_path / 'dirty'}", "data.val_fraction=0.2"]
    )
    torch.manual_seed(0)
    dvae = DVAE(cfg.dvae).eval()
    one = encode_to_disk(dvae, cfg, tmp_path / "one", chunk=3, batch=2)
    out = tmp_path / "two"
    encode_to_disk(dvae, cfg, out, rank=0, world=2, chunk=3, batch=2, stop_after_chunks=1)  # interrupted
    assert not (out / "encode_report.json").exists()
    encode_to_disk(dvae, cfg, out, rank=1, world=2, chunk=3, batch=2)
    assert not (out / "encode_report.json").exists()  # rank 0 is not done yet
    encode_to_disk(dvae, cfg, out, rank=0, world=2, chunk=3, batch=2)  # resumes and merges
    for split in ("train", "val"):
        c1, t1 = load_encoded(one, split)
        c2, t2 = load_encoded(out, split)
        assert t1.shape[1] == cfg.dvae.grid_size**2 and len(c1) > 0
        assert sorted(zip(c1, map(tuple, t1.tolist()))) == sorted(zip(c2, map(tuple, t2.tolist())))
    rep = json.loads((out / "encode_report.json").read_text())
    assert sum(rep["train"]["skipped"].values()) + sum(rep["val"]["skipped"].values()) == 8
    assert rep["train"]["kept"] + rep["val"]["kept"] == 14 + 6
    import datasets

    ds = datasets.load_from_disk(str(out / "dataset"))["train"]
    assert ds.features["tokens"].feature.dtype == "uint16"


def test_encode_then_train_prior_from_tokens(tmp_path):
    """train_prior reads the encoded folder (no pixels) and trains a couple of steps."""
    from helpers import write_ds_config

    from dalle_ds.prior.train import train_prior

    cfg = load_config(
        "tiny",
        overrides=[
            "data.num_train=24",
            "data.num_val=8",
            "prior_train.steps=2",
            "prior_train.log_every=1",
            "tokenizer.bpe_dropout=0",
        ],
    )
    torch.manual_seed(0)
    dvae = DVAE(cfg.dvae).eval()
    encode_to_disk(dvae, cfg, tmp_path / "tok", chunk=10)
    caps, toks = load_encoded(tmp_path / "tok", "train")
    ref = encode_split(dvae, image_dataset(cfg.data, "train"))
    assert caps == ref["caption"] and np.array_equal(toks.numpy(), ref["tokens"].astype(np.int64))
    s = train_prior(
        cfg,
        ds_config=write_ds_config(tmp_path / "ds.json", micro=4, stage=0),
        data_dir=tmp_path / "tok",
        out_dir=tmp_path / "prior",
        progress=False,
    )
    assert s["step"] == 2 and np.isfinite(s["val_loss_image"])
