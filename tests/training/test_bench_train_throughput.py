"""Benchmark: training throughput (tokens/s) of the `small` prior on CPU through a real DeepSpeed engine.

Run with `pytest -m bench tests/training/test_bench_train_throughput.py -s`. Prints a table and writes
bench_results/train_throughput.json. Tokens per step = micro-batch x (text_len + 32*32). One row per
attention backend (`dense`: SDPA with the boolean mask; `sparse`: the PyTorch block-gather path).
"""

import json
import platform
import time
from pathlib import Path

import pytest
import torch

from dalle_ds.config import get_preset
from dalle_ds.prior.model import Prior
from dalle_ds.training.distributed import init_distributed
from dalle_ds.training.engine import build_engine, load_ds_config

OUT = Path(__file__).resolve().parents[2] / "bench_results" / "train_throughput.json"
MICRO, WARMUP, STEPS = 2, 2, 5


@pytest.mark.bench
@pytest.mark.parametrize("backend", ["dense", "sparse"])
def test_bench_small_prior_training_throughput(backend):
    init_distributed()
    cfg = get_preset("small").prior
    cfg.attention_backend = backend
    torch.manual_seed(0)
    ds_cfg = load_ds_config(
        {
            "train_micro_batch_size_per_gpu": MICRO,
            "gradient_clipping": 4.0,
            "zero_optimization": {"stage": 0},
            "steps_per_print": 10**9,
        }
    )
    engine = build_engine(
        Prior(cfg), ds_cfg, lr=1e-4, betas=(0.9, 0.96), eps=1e-8, weight_decay=0.045, lr_lambda=lambda s: 1.0
    )
    text = torch.randint(1, cfg.text_vocab_size, (MICRO, cfg.text_len))
    image = torch.randint(0, cfg.image_vocab_size, (MICRO, cfg.image_len))
    times = []
    for i in range(WARMUP + STEPS):
        t0 = time.perf_counter()
        loss, _ = engine(text, image)
        engine.backward(loss)
        engine.step()
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    tokens = MICRO * cfg.seq_len
    row = {
        "preset": "small",
        "backend": backend,
        "micro_batch": MICRO,
        "seq_len": cfg.seq_len,
        "params": sum(p.numel() for p in engine.module.parameters()),
        "median_step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    print(f"\n{'preset':8s} {'backend':8s} {'seq':>6s} {'step s':>8s} {'tokens/s':>10s}")
    print(f"{'small':8s} {backend:8s} {cfg.seq_len:6d} {step_s:8.3f} {row['tokens_per_s']:10.0f}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    results[backend] = row
    OUT.write_text(json.dumps(results, indent=2))
    assert row["tokens_per_s"] > 0
