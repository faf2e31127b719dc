"""DeepSpeed checkpoints that resume exactly and survive damage, and consolidated model files that load without
DeepSpeed.

Each tag is verified against its manifest (training/manifest.py) before anything in it is unpickled; resuming
takes the newest tag that verifies and says why newer ones were skipped. Every file is then unpickled by
torch's allowlisting unpickler (safe_load.py), DeepSpeed's own loads included."""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from dalle_ds.errors import RunFailed
from dalle_ds.safe_load import load_plain, refusal, weights_only_loads
from dalle_ds.training.distributed import barrier, gather_objects, is_main, rank
from dalle_ds.training.manifest import tag_folders, verify, write_manifest

LATEST = "latest"
TAG = re.compile(r"step\d{8}")
LOW_DISK = 64 << 20  # bytes free under which a failed write is taken for a full disk


def capture_rng() -> dict:
    """Every RNG's state as tensors and plain data (numpy's key array as a tensor), so that it loads with
    torch's allowlisting unpickler."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # readers see the old or the new file, never half of one


def _rank_file(ckpt_dir: Path, tag: str) -> Path:
    return ckpt_dir / tag / f"rank_state_{rank():05d}.pt"


def _engine_dir(engine, ckpt_dir: Path) -> Path:
    """Where this rank's DeepSpeed files go. With ZeRO-3 inside each node (node_groups.py) every node holds a
    replica whose shard files have the same names, so nodes other than 0 write under `node<k>/`."""
    groups = getattr(engine, "node_groups", None)
    return ckpt_dir if groups is None or groups.node == 0 else ckpt_dir / f"node{groups.node}"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _steps(ckpt_dir: Path) -> list[int]:
    """The steps of the tag folders under ckpt_dir, oldest first (rank 0's view, the same on every rank)."""
    found = [int(p.name[4:]) for p in ckpt_dir.glob("step*") if p.is_dir() and TAG.fullmatch(p.name)]
    return gather_objects(sorted(found))[0]


def _agree_failed(failed: bool) -> bool:
    """Collective: True on every rank if any rank failed (so none waits in a barrier for a rank that gave up)."""
    return any(gather_objects(failed))


def _save_error(e: BaseException, folder: Path, previous: str | None) -> RunFailed | None:
    """One line for a save that failed writing (None: not a write failure, keep the traceback). torch's own
    zip writer reports a full disk as a RuntimeError without errno ("unexpected pos ..."), so free space
    decides too."""
    text = str(e)
    where = getattr(e, "filename", None) or folder
    probe = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    keep = f"`latest` still names {previous}" if previous else "there is no earlier checkpoint"
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in text or free < LOW_DISK:
        return RunFailed(
            f"checkpoint save failed: ENOSPC (no space left on device) writing {where}, {free} bytes free; "
            f"{keep}, and a restart skips the partial {folder.name}"
        )
    if isinstance(e, OSError) or any(w in text for w in ("write", "PytorchStreamWriter", "inline_container")):
        first = (text.strip().splitlines() or [type(e).__name__])[0][:200]
        return RunFailed(f"checkpoint save failed writing {where}: {first}; {keep}")
    return None


def _raise_save_error(error: BaseException | None, folder: Path, previous: str | None) -> None:
    if error is None:
        raise RunFailed(f"checkpoint save of {folder.name} failed on another rank; `latest` still names {previous}")
    mapped = _save_error(error, folder, previous)
    if mapped is None:
        raise error
    raise mapped from error


def save_checkpoint(engine, ckpt_dir: str | Path, step: int, client_state: dict, rank_state: dict | None = None) -> str:
    """Save every rank's shard, then (only after all ranks finished) the manifest, then point `latest` at it.

    DeepSpeed keeps `client_state` from data-parallel rank 0 only, so state that differs per rank (RNG,
    EMA shards under ZeRO-3, compressor error buffers) goes into `rank_state`, one file per rank.
    A crash anywhere before the manifest is written leaves a tag that resuming skips; `latest` moves last.
    A write that fails (a full disk) raises RunFailed naming the path, with `latest` unchanged.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    previous = latest_tag(ckpt_dir)
    if is_main():  # a damaged folder of this tag, left from before a resume fell back past it
        for folder in tag_folders(ckpt_dir, tag):
            shutil.rmtree(folder)
    barrier()
    state = dict(client_state, step=step, rng=capture_rng())
    engine_dir = _engine_dir(engine, ckpt_dir)
    try:
        engine_dir.mkdir(parents=True, exist_ok=True)  # DeepSpeed creates only global rank 0's folder
        engine.save_checkpoint(str(engine_dir), tag=tag, client_state=state, save_latest=False)
    except (OSError, RuntimeError) as e:  # other ranks wait in DeepSpeed's barrier: the launcher ends them
        _raise_save_error(e, ckpt_dir / tag, previous)
    own = _rank_file(ckpt_dir, tag)
    error = None
    try:
        own.parent.mkdir(parents=True, exist_ok=True)
        tmp = own.with_name(own.name + ".tmp")
        torch.save(dict(rank_state or {}, rng=capture_rng()), tmp)
        os.replace(tmp, own)
    except (OSError, RuntimeError) as e:
        error = e
    if _agree_failed(error is not None):
        _raise_save_error(error, ckpt_dir / tag, previous)
    try:
        write_manifest(ckpt_dir, tag, step)
        if is_main():
            _atomic_write_text(ckpt_dir / LATEST, tag)
    except OSError as e:
        error = e
    if _agree_failed(error is not None):
        _raise_save_error(error, ckpt_dir / tag, previous)
    return tag


def prune(ckpt_dir: str | Path, keep_last: int, step: int) -> list[str]:
    """Rank 0: delete all but the `keep_last` newest tags up to `step` (0 = keep all). Tags after `step` are
    left alone (damaged ones a resume fell back past; the run overwrites them when it gets there)."""
    ckpt_dir = Path(ckpt_dir)
    if keep_last <= 0 or not is_main():
        return []
    old = [tag_for(s) for s in _steps(ckpt_dir) if s <= step][:-keep_last]
    for tag in old:
        for folder in tag_folders(ckpt_dir, tag):
            shutil.rmtree(folder, ignore_errors=True)
    return old


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The tag `latest` names (None if it is missing, empty or unreadable). Resuming does not rely on it."""
    path = Path(ckpt_dir) / LATEST
    try:
        return path.read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def find_resumable(ckpt_dir: str | Path) -> tuple[str | None, list[tuple[str, str]]]:
    """Collective: the newest tag that verifies against its manifest, and (tag, reason) for each newer one
    that did not. `latest` is not trusted for this: it may be empty, stale or name a missing folder."""
    ckpt_dir = Path(ckpt_dir)
    skipped = []
    for step in reversed(_steps(ckpt_dir)):
        tag = tag_for(step)
        reason = verify(ckpt_dir, tag)
        if reason is None:
            return tag, skipped
        skipped.append((tag, reason))
    return None, skipped


def ds_allowed_globals() -> list:
    """The DeepSpeed classes its checkpoints pickle besides tensors and plain data (ZeRO stage, loss scaler
    state, ZeRO-1/2 fragment addresses); nothing in them runs code when unpickled."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler  # noqa: PLC0415
    from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: PLC0415
    from deepspeed.utils.tensor_fragment import fragment_address  # noqa: PLC0415

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def load_checkpoint(engine, ckpt_dir: str | Path) -> dict | None:
    """Restore engine (model, optimizer, scheduler) and RNG from the newest checkpoint that verifies; returns
    its client state (with `tag` and `skipped`) or None when there is none to resume from."""
    ckpt_dir = Path(ckpt_dir)
    tag, skipped = find_resumable(ckpt_dir)
    if is_main():
        for t, why in skipped:
            print(f"checkpoint {t} skipped: {why}", flush=True)
    if tag is None:
        named = latest_tag(ckpt_dir)
        if named is not None and (ckpt_dir / named).is_dir():  # a run was there: do not silently start over
            raise RunFailed(
                f"{ckpt_dir}: no checkpoint verifies ({'; '.join(f'{t}: {w}' for t, w in skipped)}); "
                "restore it, or pass --no-resume to start over"
            )
        return None
    folder = ckpt_dir / tag
    try:
        with weights_only_loads(ds_allowed_globals()):  # DeepSpeed's own torch.load(weights_only=False) calls
            _, client_state = engine.load_checkpoint(str(_engine_dir(engine, ckpt_dir)), tag=tag)
    except pickle.UnpicklingError as e:
        raise refusal(folder, e, "DeepSpeed checkpoint written by dalle_ds") from e
    if client_state is None:
        raise RunFailed(f"checkpoint {folder} could not be loaded")
    own = _rank_file(ckpt_dir, tag)
    if not own.exists():  # verified, so the tag was saved by fewer ranks
        raise RunFailed(f"{folder} has no {own.name}: resume with the ranks and ds_config that saved it")
    rank_state = load_plain(own, what="dalle_ds rank state")
    restore_rng(rank_state.pop("rng"))
    return dict(client_state, rank_state=rank_state, tag=tag, skipped=skipped)


def gathered_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Full fp32 state dict on rank 0 (gathering ZeRO-3 shards); None on other ranks."""
    import deepspeed  # noqa: PLC0415

    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        if not is_main():
            return None
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
