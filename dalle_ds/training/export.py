"""Consolidate a train-prior run into an export folder that loads and samples without DeepSpeed
(`dalle-ds export`; the folder format is `dalle_ds.prior.io`)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from dalle_ds.config import ConfigError, from_dict
from dalle_ds.model_file import load_model_file
from dalle_ds.prior.io import CONFIG, TOKENIZER, write_export
from dalle_ds.safe_load import load_plain, refusal, weights_only_loads
from dalle_ds.training.checkpoint import ds_allowed_globals, find_resumable
from dalle_ds.training.manifest import verify


def _tag(ckpt_dir: Path, tag: str | None) -> str:
    """The given tag if it verifies against its manifest, else (no tag given) the newest that does."""
    if tag is not None:
        why = verify(ckpt_dir, tag) if (ckpt_dir / tag).is_dir() else "no such checkpoint"
        if why is not None:
            raise ConfigError(f"--tag: {ckpt_dir}/{tag}: {why}")
        return tag
    found, skipped = find_resumable(ckpt_dir)
    for t, why in skipped:
        print(f"export: checkpoint {t} skipped: {why}")
    if found is None:
        why = "; ".join(f"{t}: {w}" for t, w in skipped) or "no checkpoints"
        raise ConfigError(f"--run: {ckpt_dir}: no checkpoint verifies ({why}); train first")
    return found


def checkpoint_state_dict(ckpt_dir: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """Full fp32 state dict from a verified DeepSpeed checkpoint (any ZeRO stage), on CPU, one process; every
    file is read by the allowlisting unpickler (dalle_ds/safe_load.py)."""
    ckpt_dir = Path(ckpt_dir)
    tag = _tag(ckpt_dir, tag)
    folder = ckpt_dir / tag
    with weights_only_loads(ds_allowed_globals()):
        if any(folder.glob("*zero_pp_rank_*optim_states.pt")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: PLC0415

            try:
                state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
            except pickle.UnpicklingError as e:
                raise refusal(folder, e, "DeepSpeed checkpoint written by dalle_ds") from e
        else:  # ZeRO stage 0: the module is saved whole by rank 0
            what = "DeepSpeed model state written by dalle_ds"
            state = load_plain(folder / "mp_rank_00_model_states.pt", what=what)["module"]
    return {k: v.detach().float().contiguous().clone() for k, v in state.items()}


def export_run(run: str | Path, out: str | Path, *, ema: bool = False, tag: str | None = None) -> Path:
    run = Path(run)
    if ema:
        if not (run / "prior.pt").exists():
            raise ConfigError(f"--ema: {run} has no prior.pt (the EMA weights are exported when training ends)")
        payload = load_model_file(run / "prior.pt", "prior")
        if "ema_state_dict" not in payload:
            raise ConfigError(
                f"--ema: {run}/prior.pt has no EMA weights (train with prior_train.ema_decay > 0 to the end)"
            )
        return write_export(out, payload["ema_state_dict"], payload["config"], payload["tokenizer"])
    if not (run / CONFIG).exists() or not (run / TOKENIZER).exists():
        raise ConfigError(f"--run: {run} has no {CONFIG}/{TOKENIZER}; point it at a train-prior --out folder")
    state = checkpoint_state_dict(run / "checkpoints", tag)
    config = json.loads((run / CONFIG).read_text())
    from_dict(config)  # validate before writing
    return write_export(out, state, config, (run / TOKENIZER).read_text())
