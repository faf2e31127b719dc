"""dvae.pt: the trained dVAE's config and weights, read back without DeepSpeed."""

from __future__ import annotations

from pathlib import Path

import torch

from dalle_ds.config import ExperimentConfig, check_compatible, from_dict
from dalle_ds.dvae.model import DVAE
from dalle_ds.model_file import load_model_file, save_model_file


def save_dvae(path: str | Path, state_dict: dict[str, torch.Tensor], cfg: ExperimentConfig, *, step: int) -> None:
    save_model_file(path, {"kind": "dvae", "config": cfg.to_dict(), "state_dict": state_dict, "step": step})


def load_dvae(path: str | Path, cfg: ExperimentConfig | None = None) -> tuple[DVAE, ExperimentConfig]:
    """Rebuild the dVAE from its exported file alone (no DeepSpeed); refuse a mismatching config."""
    payload = load_model_file(path, "dvae")
    saved = from_dict(payload["config"])
    if cfg is not None:
        check_compatible(saved, cfg, "dvae")
    model = DVAE(saved.dvae)
    model.load_state_dict(payload["state_dict"])
    return model.eval(), saved
