"""Consolidate a train-prior run into an export folder that loads and samples without DeepSpeed
(`dalle-ds export`; the folder format is `dalle_ds.prior.io`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dalle_ds.config import ConfigError, from_dict
from dalle_ds.prior.io import CONFIG, TOKENIZER, write_export


def checkpoint_state_dict(ckpt_dir: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """Full fp32 state dict from a DeepSpeed checkpoint folder (any ZeRO stage), on CPU, one process."""
    ckpt_dir = Path(ckpt_dir)
    if tag is None:
        latest = ckpt_dir / "latest"
        if not latest.exists():
            raise FileNotFoundError(f"{ckpt_dir}: no `latest` file; train first or pass --tag")
        tag = latest.read_text().strip()
    folder = ckpt_dir / tag
    if any(folder.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: PLC0415

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:  # ZeRO stage 0: the module is saved whole by rank 0
        state = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k: v.detach().float().contiguous().clone() for k, v in state.items()}


def export_run(run: str | Path, out: str | Path, *, ema: bool = False, tag: str | None = None) -> Path:
    run = Path(run)
    if ema:
        payload = (
            torch.load(run / "prior.pt", map_location="cpu", weights_only=False) if (run / "prior.pt").exists() else {}
        )
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
