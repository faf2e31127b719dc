"""Benchmark: decoded + preprocessed images per second from an image folder, and whether data loading could
bottleneck training of the `small` prior (loader time per step vs step time).

Run with `pytest -m bench tests/data/test_bench_loader.py -s`. Writes bench_results/loader_throughput.json.
The folder holds JPEGs of 640x480 (a typical web photo) with .txt captions; the target is the `small`
preset's 128 px. Rates: one process with 1 thread; a DataLoader with 2 worker processes (the 2 cores);
and data.streaming's StreamOrder (decode + filter + preprocess on the fly, in the training process).
The prior trains from pre-encoded tokens, so its per-step loading is tokenising captions + indexing the
uint16 token table (TokenTable, widened per batch); the dVAE reads pixels, so its per-step loading is
decode + Listing-1 preprocessing.
"""

import io
import json
import platform
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalle_ds.config import load_config

OUT = Path(__file__).resolve().parents[2] / "bench_results" / "loader_throughput.json"
N_IMAGES, MICRO = 48, 2


def _rate(fn) -> float:
    t0 = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t0)


def _photo(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (15, 20, 3), np.uint8)  # smooth-ish content compresses like a photo
    img = Image.fromarray(small).resize((640, 480), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.bench
def test_bench_loader_vs_small_prior_step(tmp_path):
    from dalle_ds.data.sources import image_dataset
    from dalle_ds.data.stream import StreamOrder
    from dalle_ds.data.tokens import TokenTable
    from dalle_ds.prior.model import Prior
    from dalle_ds.tokenizer import CaptionTokenizer

    root = tmp_path / "photos"
    root.mkdir()
    for i in range(N_IMAGES):
        (root / f"{i:04d}.jpg").write_bytes(_photo(i))
        (root / f"{i:04d}.txt").write_text(f"a photo of a small red car parked on the street number {i}")
    cfg = load_config("small", overrides=["data.dataset=folder", f"data.path={root}", "data.val_fraction=0"])
    t0 = time.perf_counter()
    ds = image_dataset(cfg.data, "train", purpose="dvae")
    scan_s = time.perf_counter() - t0
    assert len(ds) == N_IMAGES
    rows = {"scan_images_per_s": N_IMAGES / scan_s}
    for purpose in ("dvae", "prior"):
        ds.purpose = purpose
        t0 = time.perf_counter()
        for i in range(N_IMAGES):
            ds[i]
        rows[f"{purpose}_images_per_s"] = N_IMAGES / (time.perf_counter() - t0)
    ds.purpose = "dvae"
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, collate_fn=list, persistent_workers=True)
    sum(len(b) for b in loader)  # start the workers outside the timing
    rows["dvae_images_per_s_2_workers"] = _rate(lambda: sum(len(b) for b in loader))
    loader = None  # stop the persistent workers
    cfg.data.streaming = True
    order = StreamOrder(cfg.data, "train", "dvae")
    rows["dvae_stream_images_per_s"] = _rate(
        lambda: sum(
            len(order.micro_batch(s, global_batch=8, micro=8, accum_index=0, rank=0, world=1))
            for s in range(N_IMAGES // 8)
        )
    )

    # the prior: loading = tokenise MICRO captions + index MICRO token grids
    p = cfg.prior
    tok = CaptionTokenizer.train([f"a photo of a small red car number {i}" for i in range(200)], cfg.tokenizer)
    table = TokenTable(np.random.default_rng(0).integers(0, p.image_vocab_size, (10_000, p.image_len), dtype=np.uint16))
    caps = [f"a photo of a small red car number {i}" for i in range(10_000)]
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for _ in range(50):
        idx = rng.integers(0, len(caps), MICRO).tolist()
        tok.encode_batch([caps[i] for i in idx], train=True)
        table[idx]
    prior_load_s = (time.perf_counter() - t0) / 50
    torch.manual_seed(0)
    model = Prior(p)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    text = torch.randint(1, p.text_vocab_size, (MICRO, p.text_len))
    image = torch.randint(0, p.image_vocab_size, (MICRO, p.image_len))
    times = []
    for i in range(3):
        t0 = time.perf_counter()
        loss, _ = model(text, image)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i:
            times.append(time.perf_counter() - t0)
    step_s = min(times)
    rows.update(
        prior_micro_batch=MICRO,
        prior_loader_s_per_step=prior_load_s,
        prior_step_s=step_s,
        prior_loader_fraction=prior_load_s / step_s,
        dvae_pixel_loader_s_per_step=MICRO / rows["dvae_images_per_s"],
        threads=torch.get_num_threads(),
        machine=platform.machine(),
    )
    print("\n" + "\n".join(f"{k:32s} {v:.4g}" if isinstance(v, float) else f"{k:32s} {v}" for k, v in rows.items()))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(rows, indent=2))
    assert rows["dvae_images_per_s"] > 0 and rows["prior_images_per_s"] > 0
    assert prior_load_s < 0.1 * step_s  # loading is a small fraction of a `small` prior step
