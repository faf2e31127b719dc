"""Benchmark: KV-cached vs full-forward sampling of one image (1024 tokens) at the `small` prior.

Run with `pytest -m bench tests/sampling/test_bench_kv_cache.py -s`. Prints a table and writes
bench_results/kv_cache.json.

The uncached path re-runs the full (T + N)-position forward for every token, so each of its steps
costs the same whatever the step index. Running all 1024 steps on CPU takes many minutes, so it is
timed on the LAST `UNCACHED_STEPS` tokens only (priming the first N - UNCACHED_STEPS) and its
per-step cost is extrapolated to N steps. The cached path is timed on the full 1024-token sample.
The two paths are also checked to sample the same tokens over the timed steps.
"""

import json
import platform
import time
from pathlib import Path

import pytest
import torch

from dalle_ds.config import get_preset
from dalle_ds.prior.model import Prior
from dalle_ds.sampling.decode import sample_image_tokens

UNCACHED_STEPS = 64
OUT = Path(__file__).resolve().parents[2] / "bench_results" / "kv_cache.json"


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


@pytest.mark.bench
def test_bench_kv_cache_sampling():
    """Wall time of sample_image_tokens for one sample, with and without the KV cache."""
    cfg = get_preset("small").prior
    torch.manual_seed(0)
    model = Prior(cfg).eval()
    N = cfg.image_len
    text = torch.randint(1, cfg.text_vocab_size, (1, cfg.text_len))
    text[:, 20:] = 0

    def gen():
        return torch.Generator().manual_seed(0)

    # warm-up (allocator, first-call overheads)
    sample_image_tokens(model, text, generator=gen(), prime=torch.zeros(1, N - 4, dtype=torch.long))
    sample_image_tokens(model, text, generator=gen(), use_cache=False, prime=torch.zeros(1, N - 1, dtype=torch.long))

    cached_tokens, t_cached = _timed(lambda: sample_image_tokens(model, text, generator=gen()))

    prime = cached_tokens[:, : N - UNCACHED_STEPS]
    ref, t_uncached_part = _timed(
        lambda: sample_image_tokens(model, text, generator=gen(), use_cache=False, prime=prime)
    )
    same, t_cached_part = _timed(lambda: sample_image_tokens(model, text, generator=gen(), prime=prime))
    assert torch.equal(ref, same), "cached and uncached paths sampled different tokens"

    per_step_uncached = t_uncached_part / UNCACHED_STEPS
    t_uncached_est = per_step_uncached * N
    result = {
        "preset": "small",
        "prior": {
            "text_len": cfg.text_len,
            "image_tokens": N,
            "d_model": cfg.d_model,
            "n_layers": cfg.n_layers,
            "n_heads": cfg.n_heads,
        },
        "batch_size": 1,
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "cached_s": t_cached,
        "cached_per_token_ms": 1e3 * t_cached / N,
        "uncached_timed_steps": UNCACHED_STEPS,
        "uncached_timed_s": t_uncached_part,
        "uncached_per_token_ms": 1e3 * per_step_uncached,
        "uncached_extrapolated_s": t_uncached_est,
        "uncached_is_extrapolated": True,
        "cached_same_steps_s": t_cached_part,
        "speedup": t_uncached_est / t_cached,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")

    print()
    print(
        f"KV-cache sampling benchmark: small prior (T {cfg.text_len} + {N} image tokens, d {cfg.d_model}, "
        f"{cfg.n_layers} layers), batch 1, CPU, {torch.get_num_threads()} threads"
    )
    print(f"{'path':<34}{'total s':>10}{'ms/token':>10}")
    print(f"{'cached (1024 tokens, measured)':<34}{t_cached:>10.2f}{1e3 * t_cached / N:>10.2f}")
    print(f"{'uncached (1024, extrapolated)':<34}{t_uncached_est:>10.2f}{1e3 * per_step_uncached:>10.2f}")
    print(
        f"uncached: timed the last {UNCACHED_STEPS} of {N} steps ({t_uncached_part:.2f} s; every step runs "
        f"the full forward, so per-step cost is constant) and extrapolated x{N // UNCACHED_STEPS}"
    )
    print(f"speedup (uncached / cached): {result['speedup']:.1f}x   -> {OUT}")
