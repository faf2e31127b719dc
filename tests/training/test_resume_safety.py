"""Exact, safe resume: SIGKILL at any step then restart = the uninterrupted loss curve; SIGTERM saves and exits
cleanly; a crash during a save never leaves a half-written checkpoint marked latest."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import child_env, make_encoded_dataset, write_ds_config

from dalle_ds.config import apply_overrides
from dalle_ds.prior.train import train_prior
from dalle_ds.training import checkpoint as ckpt

STEPS = 10
OVERRIDES = [
    "tokenizer.bpe_dropout=0",
    "prior_train.log_every=1",
    f"prior_train.steps={STEPS}",
    "prior_train.save_every=1",
    "prior_train.eval_every=0",
    "prior.dropout=0.1",
    "prior_train.grad_scaling=pow2",
    "prior_train.grad_scale_init_log2=8",
    "prior_train.grad_scale_min_log2=0",
    "prior_train.grad_scale_growth_interval=3",
    "prior_train.ema_decay=0.9",
]


def _cmd(data, out, ds):
    args = [
        sys.executable,
        "-m",
        "dalle_ds.cli.train_prior",
        "--preset",
        "tiny",
        "--data",
        str(data),
        "--out",
        str(out),
        "--ds-config",
        str(ds),
    ]
    for o in OVERRIDES:
        args += ["--set", o]
    return args


def _curve(out):
    """step -> loss, the last logged value of each step (a resumed run re-logs the steps after its checkpoint)."""
    curve = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            curve[rec["step"]] = (rec["loss"], rec["gscale/log2_mean"])
    return curve


def test_sigkill_then_restart_gives_the_uninterrupted_curve(tmp_path, tiny_cfg):
    """Kill -9 once the step-3 checkpoint exists (the process is somewhere after it), rerun the same command:
    every step's loss and gradient-scale state equals the uninterrupted run's (fp32, dropout on, EMA and
    per-resblock scaling on), and the exported weights are identical."""
    data = make_encoded_dataset(tmp_path / "data", tiny_cfg)
    ds = write_ds_config(tmp_path / "ds.json", micro=4, stage=0)
    full = subprocess.run(
        _cmd(data, tmp_path / "full", ds), env=child_env(), capture_output=True, text=True, timeout=300
    )
    assert full.returncode == 0, full.stderr[-3000:]

    cut = tmp_path / "cut"
    proc = subprocess.Popen(_cmd(data, cut, ds), env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    early = (None, "step00000001", "step00000002")
    while time.time() < deadline and proc.poll() is None and ckpt.latest_tag(cut / "checkpoints") in early:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = ckpt.latest_tag(cut / "checkpoints")
    assert killed_at is not None and killed_at != f"step{STEPS:08d}", "the run finished before it was killed"
    again = subprocess.run(_cmd(data, cut, ds), env=child_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = _curve(tmp_path / "full"), _curve(cut)
    assert sorted(a) == list(range(1, STEPS + 1)) and a == b, (killed_at, a, b)
    pa = torch.load(tmp_path / "full" / "prior.pt", weights_only=False)
    pb = torch.load(cut / "prior.pt", weights_only=False)
    for key in ("state_dict", "ema_state_dict"):
        assert all(torch.equal(pa[key][k], pb[key][k]) for k in pa[key]), key


def test_sigterm_saves_and_exits_cleanly(tmp_path, tiny_cfg):
    """SIGTERM mid-run: exit status 143 (stopped, not finished), a verified checkpoint at the step it stopped, no
    export."""
    data = make_encoded_dataset(tmp_path / "data", tiny_cfg)
    ds = write_ds_config(tmp_path / "ds.json", micro=4, stage=0)
    out = tmp_path / "run"
    cmd = _cmd(data, out, ds) + ["--set", "prior_train.save_every=1000", "--set", "prior_train.steps=100000"]
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while (
        time.time() < deadline
        and proc.poll() is None
        and not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2)
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    assert "SIGTERM" in stdout
    tag = ckpt.latest_tag(out / "checkpoints")
    assert ckpt.find_resumable(out / "checkpoints") == (tag, [])
    last_logged = max(json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines())
    assert tag == f"step{last_logged:08d}"
    assert not (out / "prior.pt").exists()


def test_crash_during_save_keeps_latest_on_the_previous_checkpoint(tmp_path, tiny_cfg, monkeypatch):
    """A save that dies half-way (after writing part of its files) leaves `latest` on the last complete
    checkpoint, and a restart resumes from there and reproduces the uninterrupted curve."""
    data = make_encoded_dataset(tmp_path / "data", tiny_cfg)
    ds = write_ds_config(tmp_path / "ds.json", micro=4, stage=0)
    cfg = apply_overrides(tiny_cfg, ["prior_train.steps=6", "prior_train.save_every=2", "prior_train.eval_every=0"])
    full = train_prior(cfg, ds_config=ds, data_dir=data, out_dir=tmp_path / "full", progress=False)

    real = ckpt.save_checkpoint
    calls = {"n": 0}

    def dying_save(engine, ckpt_dir, step, client_state, rank_state=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the step-4 save: write the engine files, then die before `latest` moves
            engine.save_checkpoint(str(ckpt_dir), tag=f"step{step:08d}", client_state=client_state, save_latest=False)
            raise OSError("disk full (simulated)")
        return real(engine, ckpt_dir, step, client_state, rank_state)

    monkeypatch.setattr(ckpt, "save_checkpoint", dying_save)
    with pytest.raises(OSError, match="simulated"):
        train_prior(cfg, ds_config=ds, data_dir=data, out_dir=tmp_path / "cut", progress=False)
    assert (tmp_path / "cut" / "checkpoints" / "step00000004").exists()  # the half-written one
    assert ckpt.latest_tag(tmp_path / "cut" / "checkpoints") == "step00000002"
    monkeypatch.setattr(ckpt, "save_checkpoint", real)
    rest = train_prior(cfg, ds_config=ds, data_dir=data, out_dir=tmp_path / "cut", progress=False)
    assert rest["history"][0]["step"] == 3
    assert [h["loss"] for h in rest["history"]] == [h["loss"] for h in full["history"]][2:]
