"""dVAE training under a DeepSpeed engine, export, and encoding to a `datasets` dataset."""
import numpy as np
import torch

from helpers import write_ds_config
from dalle_ds.config import apply_overrides
from dalle_ds.data.encode import encode_to_disk, load_encoded
from dalle_ds.train_dvae import load_dvae, train_dvae


def test_train_export_encode(tmp_path, tiny_cfg):
    """Train the tiny dVAE a few steps, reload the EMA export without DeepSpeed, and encode both splits to
    uint16 token grids whose ids lie in the codebook."""
    cfg = apply_overrides(tiny_cfg, ["dvae_train.steps=6", "dvae_train.log_every=2", "data.num_train=48",
                                     "data.num_val=8"])
    s = train_dvae(cfg, ds_config=write_ds_config(tmp_path / "ds.json", micro=8, stage=0),
                   out_dir=tmp_path / "dvae", progress=False)
    assert s["step"] == 6 and np.isfinite(s["recon_psnr"])
    assert [h["step"] for h in s["history"]] == [2, 4, 6]
    assert {"temperature", "kl_weight", "nll", "kl", "lr"} <= set(s["history"][-1])
    dvae, saved = load_dvae(s["path"], cfg)
    assert saved.dvae == cfg.dvae
    encode_to_disk(dvae, cfg, tmp_path / "tokens")
    caps, toks = load_encoded(tmp_path / "tokens", "train")
    assert len(caps) == 48 and toks.shape == (48, cfg.dvae.grid_size ** 2)
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
