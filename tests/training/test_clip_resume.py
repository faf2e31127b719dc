"""Issue 16 item 3: train-clip checkpoints, resumes exactly, and a stop (SIGTERM) leaves the last checkpoint.

"Exactly" is bitwise here: one process, one thread, the same ops in the same order on CPU; the checkpoint
restores model, AdamW, LR schedule, the batch RNG, torch's RNG and the data reader's crop counter, so a
resumed run computes the same floats as an uninterrupted one. (Across thread counts CPU reductions may
split differently; both runs of each comparison use one thread.)"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import child_env

from dalle_ds.config import load_config
from dalle_ds.rerank.train import train_clip
from dalle_ds.safe_load import load_plain


def _weights(path):
    return load_plain(path, what="clip.pt")["state_dict"]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("augment", [0.0, 0.3])
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, one_thread, augment):
    """Stopped after step 4 (--stop-at) and rerun: same clip.pt, bit for bit, and the same logged losses as
    a run of 10 steps in one go; the step-4 weights differ (the rerun did train). With clip.augment the
    zoom and shift draws resume too."""
    sets = ["clip.steps=10", "clip.save_every=3", "clip.log_every=2", f"clip.augment={augment}"]
    cfg = load_config("tiny", overrides=sets)
    whole = train_clip(cfg, tmp_path / "whole", progress=False)
    part = train_clip(cfg, tmp_path / "cut", progress=False, stop_at=4)
    assert part["step"] == 4
    ckpt = load_plain(tmp_path / "cut" / "clip_ckpt" / "checkpoint.pt", what="checkpoint")
    assert ckpt["step"] == 4
    at4 = _weights(tmp_path / "cut" / "clip.pt")
    resumed = train_clip(cfg, tmp_path / "cut", progress=False)
    assert resumed["step"] == 10
    final = _weights(tmp_path / "cut" / "clip.pt")
    assert _same(final, _weights(tmp_path / "whole" / "clip.pt"))
    assert not _same(final, at4)
    assert resumed["history"] == whole["history"]
    assert load_plain(tmp_path / "whole" / "clip_ckpt" / "checkpoint.pt", what="checkpoint")["step"] == 10


def test_sigterm_saves_the_current_step_and_a_rerun_continues_exactly(tmp_path, one_thread):
    """`dalle-ds train-clip` killed by SIGTERM mid-run exits 143 with a checkpoint and no clip.pt; resuming it
    to step K gives the weights of an uninterrupted run to K."""
    out = tmp_path / "run"
    sets = ["clip.steps=100000", "clip.save_every=2", "clip.log_every=1000"]
    cmd = [sys.executable, "-m", "dalle_ds.cli", "train-clip", "--preset", "tiny", "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = out / "clip_ckpt" / "checkpoint.pt"
    deadline = time.monotonic() + 300  # a guard against a hang, not a timing assertion
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ckpt.exists(), proc.communicate()[1][-2000:] if proc.poll() is not None else "no checkpoint in 300 s"
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "SIGTERM, checkpoint saved at step" in err
    assert not (out / "clip.pt").exists()
    stopped = load_plain(ckpt, what="checkpoint")["step"]
    assert stopped >= 2
    cfg = load_config("tiny", overrides=sets)
    k = stopped + 3
    train_clip(cfg, out, progress=False, stop_at=k)
    train_clip(cfg, tmp_path / "whole", progress=False, stop_at=k)
    assert _same(_weights(out / "clip.pt"), _weights(tmp_path / "whole" / "clip.pt"))
