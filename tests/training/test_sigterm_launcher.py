"""SIGTERM under the deepspeed launcher (2 CPU ranks): every rank finishes saving the step it is on before the
processes end, whether the signal reaches the whole process group (SLURM, `kill -TERM -PGID`) or the
`deepspeed` runner alone (`kill PID`, a container runtime signalling PID 1: the runner then dies at once and,
before training/launcher_watch.py, the ranks trained on unsupervised with no checkpoint)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO, child_env, make_encoded_dataset, write_ds_config

from dalle_ds.training import checkpoint as ckpt


def _start(tmp_path, tiny_cfg, port):
    data = make_encoded_dataset(tmp_path / "data", tiny_cfg)
    ds = write_ds_config(tmp_path / "ds.json", micro=4, stage=0)
    out = tmp_path / "run"
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port", str(port)]
    cmd += [str(REPO / "dalle_ds/cli/train_prior.py"), "--preset", "tiny", "--data", str(data), "--out", str(out)]
    cmd += ["--ds-config", str(ds), "--set", "prior_train.steps=100000", "--set", "prior_train.save_every=100000"]
    cmd += ["--set", "prior_train.log_every=1", "--set", "tokenizer.bpe_dropout=0"]
    log = open(tmp_path / "log.txt", "w")  # noqa: SIM115 - the processes write to it until they end
    proc = subprocess.Popen(cmd, env=child_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "log.txt").read_text()[-3000:]
        time.sleep(0.1)
    return proc, out


def _wait_for_group(proc, seconds=240):
    """Until no process of the launch's session is left (ranks included); False if some outlived `seconds`."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return True
        proc.poll()  # reap the runner
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    return False


def _check_saved(tmp_path, out):
    """A checkpoint of the last logged step, written by both ranks and verified against its manifest."""
    log = (tmp_path / "log.txt").read_text()
    last = max(json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines())
    tag = f"step{last:08d}"
    assert ckpt.find_resumable(out / "checkpoints") == (tag, []), log[-3000:]
    manifest = json.loads((out / "checkpoints" / tag / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and f"{tag}/rank_state_00001.pt" in manifest["files"]
    assert f"prior: SIGTERM, checkpoint saved at step {last}" in log
    return log


@pytest.mark.parametrize("to", ["process group", "runner alone"])
def test_sigterm_under_the_launcher_saves_on_every_rank(tmp_path, tiny_cfg, to):
    proc, out = _start(tmp_path, tiny_cfg, 29783 if to == "process group" else 29785)
    if to == "process group":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    assert _wait_for_group(proc), "ranks still running 240 s after SIGTERM"
    log = _check_saved(tmp_path, out)
    if to == "runner alone":  # the ranks noticed, saved and exited 143, which launch.py reports
        assert "the deepspeed runner above this rank is gone" in log
        assert "exits with return code = 143" in log
