"""Checkpoints that verify before they load: a damaged newest checkpoint is skipped (saying why) and the run
resumes from the previous intact one exactly as if never interrupted; nothing in a checkpoint runs code;
`checkpoint.keep_last` prunes; a full disk names ENOSPC and leaves `latest` alone; metrics.jsonl has one
record per step after a resume."""

import copy
import errno
import json
import os
import shutil

import pytest
import torch
from helpers import launch_deepspeed, make_encoded_dataset, write_ds_config

from dalle_ds.config import apply_overrides
from dalle_ds.errors import ConfigError, RunFailed
from dalle_ds.prior.train import train_prior
from dalle_ds.safe_load import UnsafeFileError, weights_only_loads
from dalle_ds.training import checkpoint as ckpt
from dalle_ds.training.export import export_run
from dalle_ds.training.manifest import MANIFEST, sha256
from dalle_ds.training.metrics import MetricsLogger

OVERRIDES = ["prior_train.steps=6", "prior_train.save_every=2", "prior_train.eval_every=0"]
OVERRIDES += ["prior.dropout=0.1", "prior_train.ema_decay=0.9"]  # RNG and per-rank state both matter
STEP2, STEP4 = "step00000002", "step00000004"


class Payload:
    """Unpickling this calls open(marker, "w"): the marker appears if, and only if, the payload ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_cfg_module):
    """An uninterrupted 6-step run, and one stopped after step 4 (checkpoints at steps 2 and 4)."""
    root = tmp_path_factory.mktemp("trust")
    cfg = apply_overrides(tiny_cfg_module, OVERRIDES)
    data = make_encoded_dataset(root / "data", cfg)
    ds = write_ds_config(root / "ds.json", micro=4, stage=0)
    full = train_prior(cfg, ds_config=ds, data_dir=data, out_dir=root / "full", progress=False)
    train_prior(cfg, ds_config=ds, data_dir=data, out_dir=root / "cut", progress=False, stop_at=4)
    return {"cfg": cfg, "data": data, "ds": ds, "full": full, "root": root}


@pytest.fixture(scope="module")
def tiny_cfg_module():
    from dalle_ds.config import load_config

    return load_config("tiny", overrides=["tokenizer.bpe_dropout=0", "prior_train.log_every=1"])


def _copy(runs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(runs["root"] / "cut", out)
    return out


def _with(runs, *overrides):
    return apply_overrides(copy.deepcopy(runs["cfg"]), list(overrides))  # apply_overrides changes its argument


def _resume(runs, out, cfg=None):
    return train_prior(cfg or runs["cfg"], ds_config=runs["ds"], data_dir=runs["data"], out_dir=out, progress=False)


def _flip(path):
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0xFF
    path.write_bytes(bytes(b))


def _fifo(path):
    path.unlink()
    os.mkfifo(path)


def _to_dev_zero(path):
    path.unlink()
    path.symlink_to("/dev/zero")


MODEL, RANK = "mp_rank_00_model_states.pt", "rank_state_00000.pt"
DAMAGES = {  # name -> (file in the step-4 folder, damage, what the skip reason says)
    "truncated model state": (MODEL, lambda p: p.write_bytes(p.read_bytes()[:-10]), "size mismatch in"),
    "truncated rank state": (RANK, lambda p: p.write_bytes(p.read_bytes()[:50]), "size mismatch in"),
    "garbled model state": (MODEL, _flip, "checksum mismatch in step00000004/mp_rank"),
    "garbled rank state": (RANK, _flip, "checksum mismatch in step00000004/rank_state"),
    "missing rank state": (RANK, lambda p: p.unlink(), "missing file step00000004/rank_state_00000.pt"),
    "missing model state": (MODEL, lambda p: p.unlink(), "missing file"),
    "missing manifest": (MANIFEST, lambda p: p.unlink(), "no manifest"),
    "garbled manifest": (MANIFEST, lambda p: p.write_text('{"files": '), "manifest unreadable"),
    "empty manifest": (MANIFEST, lambda p: p.write_bytes(b""), "manifest unreadable"),
    "manifest of another tag": (MANIFEST, lambda p: p.write_text(p.read_text().replace(STEP4, STEP2)), "tag"),
    "extra file": ("stray.pt", lambda p: p.write_bytes(b"x"), "unexpected file step00000004/stray.pt"),
    "FIFO for a rank state": (RANK, _fifo, "is not a regular file"),
    "symlink to /dev/zero": (RANK, _to_dev_zero, "is not a regular file"),
}


@pytest.mark.parametrize("name", list(DAMAGES))
def test_each_kind_of_damage_is_skipped_with_its_reason(runs, tmp_path, name):
    """The newest tag is checked against its manifest (sizes, SHA-256, the exact file set, regular files only,
    so a FIFO or /dev/zero cannot hang it); the damaged one is skipped with a reason, step 2 is chosen."""
    out = _copy(runs, tmp_path)
    file, damage, says = DAMAGES[name]
    damage(out / "checkpoints" / STEP4 / file)
    tag, skipped = ckpt.find_resumable(out / "checkpoints")
    assert tag == STEP2 and [t for t, _ in skipped] == [STEP4], skipped
    assert says in skipped[0][1], skipped


def test_a_pickle_in_place_of_the_manifest_is_not_unpickled(runs, tmp_path):
    """The manifest is read as JSON only: a pickle there is unreadable JSON, and its payload never runs."""
    out = _copy(runs, tmp_path)
    torch.save({"files": Payload(tmp_path / "ran")}, out / "checkpoints" / STEP4 / MANIFEST)
    tag, skipped = ckpt.find_resumable(out / "checkpoints")
    assert tag == STEP2 and "manifest unreadable" in skipped[0][1]
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("latest", [b"", b"step00000099", None, b"\xff\xfe"])
def test_latest_is_not_trusted(runs, tmp_path, latest):
    """An empty `latest`, one naming a missing tag, none at all or garbage: the newest intact tag is found."""
    out = _copy(runs, tmp_path)
    path = out / "checkpoints" / "latest"
    path.unlink() if latest is None else path.write_bytes(latest)
    assert ckpt.find_resumable(out / "checkpoints") == (STEP4, [])


def _check_continuation(runs, out, summary, resumed_from):
    """Resumed losses, final weights and EMA weights equal the uninterrupted run's; metrics.jsonl has one
    training record per step and no step twice of one kind."""
    full = [h["loss"] for h in runs["full"]["history"]]
    assert [h["step"] for h in summary["history"]] == list(range(resumed_from + 1, 7))
    assert [h["loss"] for h in summary["history"]] == full[resumed_from:]
    a = torch.load(runs["root"] / "full" / "prior.pt", weights_only=True)
    b = torch.load(out / "prior.pt", weights_only=True)
    for key in ("state_dict", "ema_state_dict"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 7)), recs
    val = [r["step"] for r in recs if "loss" not in r]
    assert len(val) == len(set(val)), recs


@pytest.mark.parametrize("name", ["truncated rank state", "garbled model state", "missing manifest"])
def test_damaged_newest_checkpoint_resumes_from_the_previous_identically(runs, tmp_path, capsys, name):
    """Resuming skips the damaged step-4 checkpoint, says so and which one it used, and continues from step 2
    exactly as the uninterrupted run did."""
    out = _copy(runs, tmp_path)
    file, damage, says = DAMAGES[name]
    damage(out / "checkpoints" / STEP4 / file)
    summary = _resume(runs, out)
    printed = capsys.readouterr().out
    assert f"checkpoint {STEP4} skipped: {says}" in printed
    assert f"prior: resumed from step 2 (checkpoint {STEP2})" in printed
    _check_continuation(runs, out, summary, 2)
    assert ckpt.find_resumable(out / "checkpoints")[1] == []  # the damaged step 4 was written anew


def test_empty_latest_resumes_from_the_newest(runs, tmp_path, capsys):
    out = _copy(runs, tmp_path)
    (out / "checkpoints" / "latest").write_text("")
    summary = _resume(runs, out)
    assert f"resumed from step 4 (checkpoint {STEP4})" in capsys.readouterr().out
    _check_continuation(runs, out, summary, 4)


def test_no_intact_checkpoint_is_one_line_not_a_silent_restart(runs, tmp_path):
    """Every checkpoint damaged while `latest` names one: refuse in one line (saying why each was skipped and
    how to start over) rather than silently training from step 0."""
    out = _copy(runs, tmp_path)
    for tag in (STEP2, STEP4):
        (out / "checkpoints" / tag / RANK).write_bytes(b"")
    with pytest.raises(RunFailed) as e:
        _resume(runs, out)
    msg = str(e.value)
    assert "no checkpoint verifies" in msg and "--no-resume" in msg and "\n" not in msg
    assert f"{STEP2}: size mismatch" in msg and f"{STEP4}: size mismatch" in msg


def _forge_manifest(folder):
    """Rewrite the manifest to vouch for the files as they now are (what an attacker with write access does)."""
    body = json.loads((folder / MANIFEST).read_text())
    for rel in body["files"]:
        p = folder.parent / rel
        body["files"][rel] = {"size": p.stat().st_size, "sha256": sha256(p)}
    (folder / MANIFEST).write_text(json.dumps(body))


def _swap_in_crafted(folder, file, marker):
    """Replace a checkpoint file by the same content plus an entry that runs code when unpickled."""
    with weights_only_loads(ckpt.ds_allowed_globals()):
        state = torch.load(folder / file, weights_only=True)
    state["extra"] = Payload(marker)
    torch.save(state, folder / file)


@pytest.mark.parametrize("file", [RANK, MODEL])
def test_crafted_file_swapped_into_a_checkpoint_never_runs(runs, tmp_path, file):
    """A crafted rank state or DeepSpeed model state in the newest checkpoint: with the manifest untouched it
    fails verification and is skipped; with the manifest forged to match, resuming (including DeepSpeed's own
    load) and `dalle-ds export` refuse it in one line. The payload never runs."""
    out = _copy(runs, tmp_path)
    folder = out / "checkpoints" / STEP4
    _swap_in_crafted(folder, file, tmp_path / "ran")
    tag, skipped = ckpt.find_resumable(out / "checkpoints")
    assert tag == STEP2 and "mismatch" in skipped[0][1]
    _forge_manifest(folder)
    assert ckpt.find_resumable(out / "checkpoints") == (STEP4, [])
    with pytest.raises(UnsafeFileError) as e:
        _resume(runs, out)
    assert "could run code" in str(e.value) and "\n" not in str(e.value)
    if file == MODEL:
        with pytest.raises(UnsafeFileError, match="could run code"):
            export_run(out, tmp_path / "export")
    assert not (tmp_path / "ran").exists()
    torch.load(folder / file, weights_only=False)  # the control: the payload is live
    assert (tmp_path / "ran").exists()


def test_export_takes_the_newest_checkpoint_that_verifies(runs, tmp_path):
    out = _copy(runs, tmp_path)
    (out / "checkpoints" / STEP4 / MODEL).write_bytes(b"")
    export_run(out, tmp_path / "export")
    export_run(out, tmp_path / "export2", tag=STEP2)
    assert sha256(tmp_path / "export/model.safetensors") == sha256(tmp_path / "export2/model.safetensors")
    with pytest.raises(ConfigError, match=f"--tag: .*{STEP4}: size mismatch"):
        export_run(out, tmp_path / "export3", tag=STEP4)


def test_keep_last_prunes_older_checkpoints(runs, tmp_path):
    """checkpoint.keep_last=2 with a save every step: only the 2 newest tags remain, both intact."""
    cfg = _with(runs, "prior_train.steps=5", "prior_train.save_every=1", "checkpoint.keep_last=2")
    train_prior(cfg, ds_config=runs["ds"], data_dir=runs["data"], out_dir=tmp_path / "run", progress=False)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step*")) == ["step00000004", "step00000005"]
    assert ckpt.find_resumable(ckpts) == ("step00000005", [])
    with pytest.raises(ConfigError, match="checkpoint.keep_last"):
        _resume(runs, tmp_path / "neg", _with(runs, "checkpoint.keep_last=-1"))


@pytest.mark.parametrize("where", ["rank state (OSError)", "DeepSpeed's writer (RuntimeError, disk full)"])
def test_disk_full_names_enospc_and_keeps_latest(runs, tmp_path, monkeypatch, where):
    """A full disk during the step-4 save: one line naming ENOSPC and the path, `latest` still on step 2, and
    a restart continues exactly as the uninterrupted run."""
    out = tmp_path / "run"
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        name = os.fspath(f) if isinstance(f, (str, os.PathLike)) else ""
        if STEP4 in name and ("rank_state" in name if where.startswith("rank") else "model_states" in name):
            if where.startswith("rank"):
                raise OSError(errno.ENOSPC, "No space left on device", name)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    if not where.startswith("rank"):  # torch's zip writer says nothing of ENOSPC: free space tells
        monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
    with pytest.raises(RunFailed) as e:
        _resume(runs, out)
    msg = str(e.value)
    assert "ENOSPC" in msg and STEP4 in msg and f"`latest` still names {STEP2}" in msg and "\n" not in msg
    assert ckpt.latest_tag(out / "checkpoints") == STEP2
    monkeypatch.undo()
    _check_continuation(runs, out, _resume(runs, out), 2)


def test_metrics_keep_one_record_per_step_after_a_resume(tmp_path):
    """A resume at step 3 drops the records after step 3 (and a line torn by a kill); a second record of the
    same kind at one step replaces the first."""
    lines = [{"step": s, "loss": float(s)} for s in range(1, 6)] + [{"step": 4, "val/loss": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 6, "lo')
    log = MetricsLogger(tmp_path, total_steps=10, start_step=3, progress=False)
    log.log(3, {"val/loss": 1.0})
    log.log(3, {"val/loss": 2.0})
    log.log(4, {"loss": 40.0})
    log.close()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    want = [{"step": s, "loss": float(s)} for s in (1, 2, 3)] + [
        {"step": 3, "val/loss": 2.0},
        {"step": 4, "loss": 40.0},
    ]
    assert recs == want


def _two_rank(tmp_path, tiny_cfg, stage, damages, port):
    data = make_encoded_dataset(tmp_path / "data", tiny_cfg)
    ds = write_ds_config(tmp_path / "ds.json", micro=4, stage=stage)
    proc = launch_deepspeed(2, port, "run_resume_2rank.py", data, tmp_path / "out", ds, *damages, timeout=900)
    res = json.loads((tmp_path / "out" / "result.json").read_text())
    for name in damages:
        assert res["resumed"][name] == res["full"][2:], name
        assert res["same_weights"][name], name
    assert proc.stdout.count("prior: resumed from step 2 (checkpoint step00000002)") == len(damages)
    return proc.stdout


def test_two_ranks_damaged_rank1_state_falls_back_identically(tmp_path, tiny_cfg):
    """2 ranks: rank 1's rank state in the newest checkpoint truncated by one byte (a file rank 0 never wrote, so
    the manifest must hold every rank's files): both ranks skip it and continue from step 2 with the
    uninterrupted run's losses, final weights and EMA weights."""
    out = _two_rank(tmp_path, tiny_cfg, 0, ["truncate_rank1_state"], 29787)
    assert "skipped: size mismatch in step00000004/rank_state_00001.pt" in out


@pytest.mark.slow
def test_two_ranks_zero3_damages_fall_back_identically(tmp_path, tiny_cfg):
    """The same under ZeRO-3 (each rank writes its own shards) for a truncated rank-1 optimizer shard, a garbled
    rank-0 model state and a deleted rank-1 rank state."""
    damages = ["truncate_rank1_shard", "garble_rank0_model", "delete_rank1_state"]
    out = _two_rank(tmp_path, tiny_cfg, 3, damages, 29789)
    assert "size mismatch in step00000004/zero_pp_rank_1_mp_rank_00_optim_states.pt" in out
    assert "checksum mismatch in step00000004/zero_pp_rank_0_mp_rank_00_model_states.pt" in out
    assert "missing file step00000004/rank_state_00001.pt" in out
