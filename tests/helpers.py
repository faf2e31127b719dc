"""Helpers for tests: small data the tests build themselves (no downloads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def child_env() -> dict:
    """Environment for a child process: one thread, the repo and the test helpers importable, and none of
    the rank variables that in-process tests set for their world of one (a child must pick its own)."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    path = os.pathsep.join(str(p) for p in (REPO, REPO / "tests", REPO / "tests/training"))
    return dict(env, PYTHONPATH=path, OMP_NUM_THREADS="1")


def launch_deepspeed(num_gpus: int, port: int, script: str, *args, timeout: int = 600):
    """`deepspeed --num_gpus N` (CPU ranks) running tests/training/<script> with `args`; fails the calling
    test, with the output's tail, when the launch exits non-zero. Returns the CompletedProcess."""
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "deepspeed"),
        "--num_gpus",
        str(num_gpus),
        "--master_port",
        str(port),
        str(REPO / "tests/training" / script),
        *map(str, args),
    ]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def make_encoded_dataset(path: Path, cfg, *, n_train: int = 64, n_val: int = 16, seed: int = 0) -> Path:
    """Shapes captions with random token grids, saved the way `dalle-ds encode` saves them."""
    import datasets

    from dalle_ds.data.shapes import ShapesDataset

    rng = np.random.default_rng(seed)
    parts = {}
    for split, n in (("train", n_train), ("val", n_val)):
        src = ShapesDataset(split=split, size=n, image_size=cfg.data.image_size, seed=seed)
        caps = [src[i]["caption"] for i in range(n)]
        toks = rng.integers(0, cfg.prior.image_vocab_size, size=(n, cfg.prior.image_len)).astype(np.uint16)
        parts[split] = datasets.Dataset.from_dict({"caption": caps, "tokens": toks})
    datasets.DatasetDict(parts).save_to_disk(str(path))
    return path


def write_ds_config(path: Path, *, micro: int, stage: int, accum: int = 1) -> Path:
    cfg = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": 4.0,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    if stage == 3:
        cfg["zero_optimization"].update(
            stage3_param_persistence_threshold=0, overlap_comm=False, contiguous_gradients=False
        )
    path.write_text(json.dumps(cfg))
    return path


def layout_id(p) -> str:
    """pytest id for a (kind, transposed) layout pair."""
    return f"{p[0]}{'-T' if p[1] else ''}"


def run_with_grads(fn, q, k, v, g) -> list:
    """[out, dq, dk, dv] of fn on fresh leaves, backpropagating g."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v)
    o.backward(g)
    return [o.detach(), q.grad, k.grad, v.grad]
