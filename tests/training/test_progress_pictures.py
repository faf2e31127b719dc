"""Issue 16 item 3: pictures while training. train-dvae writes OUT/recon_stepN.png (fixed val images above
their reconstructions) and logs the val PSNR every eval_every; train-prior with a dVAE writes
OUT/samples_stepN.png for fixed val captions; both go to TensorBoard as images."""

import json

import numpy as np
import torch
from helpers import make_encoded_dataset, write_ds_config
from PIL import Image

from dalle_ds.config import apply_overrides
from dalle_ds.data.shapes import ShapesDataset
from dalle_ds.dvae.io import load_dvae, save_dvae
from dalle_ds.dvae.model import DVAE
from dalle_ds.dvae.train import train_dvae
from dalle_ds.prior.io import load_prior
from dalle_ds.prior.train import train_prior
from dalle_ds.sampling.decode import sample_image_tokens


def _cells(grid: np.ndarray, n: int, size: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The n image cells of the top row and of the row below in a two-row save_grid picture (each cell a whole
    multiple of the image size, each row's captions below its cells), downsampled back to size x size."""
    cell, row_h = grid.shape[1] // n, grid.shape[0] // 2
    k = cell // size
    return tuple(
        [grid[r * row_h : r * row_h + cell, c * cell : (c + 1) * cell][::k, ::k] for c in range(n)] for r in (0, 1)
    )


def _tensorboard_images(run_dir) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Images(tag)] for tag in acc.Tags()["images"]}


def test_dvae_writes_recon_grids_and_val_psnr(tmp_path, tiny_cfg):
    """eval_every=2 over 4 steps: recon_step2.png and recon_step4.png; in each the top row is the first 8 val
    images pixel for pixel and, at the last step, the row below is what the exported dVAE reconstructs."""
    cfg = apply_overrides(
        tiny_cfg, ["dvae_train.steps=4", "dvae_train.eval_every=2", "data.num_train=32", "data.num_val=8"]
    )
    run = tmp_path / "dvae"
    s = train_dvae(cfg, ds_config=write_ds_config(tmp_path / "ds.json", micro=8, stage=0), out_dir=run, progress=False)
    assert sorted(p.name for p in run.glob("recon_step*.png")) == ["recon_step2.png", "recon_step4.png"]
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "val/recon_psnr" in r] == [2, 4]
    assert all("val/recon" not in r for r in logged)  # pictures are files, not JSON
    val = ShapesDataset(split="val", size=8, image_size=16, seed=cfg.data.seed, two_shape_prob=cfg.data.two_shape_prob)
    originals = [val[i]["image"].permute(1, 2, 0).numpy() for i in range(8)]
    dvae, _ = load_dvae(s["path"])
    with torch.no_grad():
        x = torch.stack([val[i]["image"] for i in range(8)]).float() / 255
        rec = (dvae.decode(dvae.encode(x)).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for step in (2, 4):
        grid = np.asarray(Image.open(run / f"recon_step{step}.png").convert("RGB"))
        top, bottom = _cells(grid, 8, 16)
        for i in range(8):
            assert np.array_equal(top[i], originals[i]), (step, i)
    assert max(int(np.abs(bottom[i].astype(int) - rec[i].astype(int)).max()) for i in range(8)) <= 1
    assert not all(np.array_equal(b, o) for b, o in zip(bottom, originals))  # the bottom row is not a copy
    assert _tensorboard_images(run) == {"val/recon": [2, 4]}


def test_prior_writes_sample_grids_with_a_dvae(tmp_path, tiny_cfg, capsys):
    """With dvae_path, samples_step2.png and samples_step4.png: one sample per distinct val caption, and the
    last grid's pictures are what the exported prior samples with the same seed. Without it: no pictures and
    one note."""
    cfg = apply_overrides(tiny_cfg, ["prior_train.steps=4", "prior_train.eval_every=2", "prior_train.save_every=4"])
    data = make_encoded_dataset(tmp_path / "tokens", cfg, n_train=32, n_val=12)
    dvae_path = tmp_path / "dvae.pt"
    torch.manual_seed(0)
    save_dvae(dvae_path, DVAE(cfg.dvae).state_dict(), cfg, step=0)  # untrained is enough to render tokens
    ds = write_ds_config(tmp_path / "ds.json", micro=4, stage=0)
    run = tmp_path / "prior"
    train_prior(cfg, ds_config=ds, data_dir=data, out_dir=run, progress=False, dvae_path=dvae_path)
    assert sorted(p.name for p in run.glob("samples_step*.png")) == ["samples_step2.png", "samples_step4.png"]
    assert _tensorboard_images(run) == {"val/samples": [2, 4]}
    import datasets

    val_caps = list(dict.fromkeys(datasets.load_from_disk(str(data))["val"]["caption"]))[:8]
    prior, tok, _ = load_prior(run / "prior.pt")
    dvae, _ = load_dvae(dvae_path)
    gen = torch.Generator().manual_seed(cfg.sample.seed)
    text = tok.encode_batch(val_caps, train=False)
    toks = sample_image_tokens(
        prior, text, temperature=cfg.sample.temperature, top_k=cfg.sample.top_k, top_p=cfg.sample.top_p, generator=gen
    )
    g = cfg.prior.image_grid
    with torch.no_grad():
        want = (dvae.decode(toks.view(-1, g, g)).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    grid = np.asarray(Image.open(run / "samples_step4.png").convert("RGB"))
    n = len(val_caps)
    cell = grid.shape[1] // n
    got = [grid[:cell, c * cell : (c + 1) * cell][:: cell // 16, :: cell // 16] for c in range(n)]
    assert all(np.array_equal(got[i], want[i].numpy()) for i in range(n))
    capsys.readouterr()
    train_prior(cfg, ds_config=ds, data_dir=data, out_dir=tmp_path / "bare", progress=False)
    assert not list((tmp_path / "bare").glob("samples_step*.png"))
    assert capsys.readouterr().out.count("no --dvae given") == 1


def test_encode_sampling_and_fid_show_progress_bars(tmp_path, tiny_cfg, capsys):
    """`dalle-ds encode` and `dalle-ds eval` show bars (stderr) that end at the number of items done:
    records encoded per split, images sampled, images read by the Inception network."""
    from dalle_ds.config import SampleConfig
    from dalle_ds.data.encode_grids import encode_to_disk
    from dalle_ds.eval.fid import fid
    from dalle_ds.prior.model import Prior
    from dalle_ds.sampling.generate import generate
    from dalle_ds.tokenizer import CaptionTokenizer

    cfg = apply_overrides(tiny_cfg, ["data.num_train=24", "data.num_val=8"])
    torch.manual_seed(0)
    dvae = DVAE(cfg.dvae).eval()
    encode_to_disk(dvae, cfg, tmp_path / "tokens", chunk=10, batch=4, progress=True)
    err = capsys.readouterr().err
    assert "encode train" in err and "24/24" in err and "encode val" in err and "8/8" in err
    tok = CaptionTokenizer.train(["a red square", "a blue circle"] * 4, cfg.tokenizer)
    images = generate(
        Prior(cfg.prior), tok, dvae, ["a red square"] * 3, SampleConfig(batch_size=2), progress="sampling"
    )
    err = capsys.readouterr().err
    assert images.shape == (3, 16, 16, 3) and "sampling" in err and "3/3" in err
    # the bar mechanics with a cheap feature extractor (Inception itself is the slow part it reports on)
    fid(
        images,
        images[::-1].copy(),
        radii=(0, 1),
        features=lambda x: x.reshape(len(x), -1)[:, :8] / 255.0,
        progress=True,
    )
    err = capsys.readouterr().err
    assert "Inception features" in err and "12/12" in err  # (3 real + 3 generated) x 2 radii
