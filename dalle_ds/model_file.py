"""Consolidated model files (dvae.pt, prior.pt, clip.pt): one dict of config, weights and plain data that
loads without DeepSpeed and without the training code."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def save_model_file(path: str | Path, payload: dict) -> None:
    """Write a consolidated model file atomically (rank 0 only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_model_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file {path} does not exist (train first, or point to a *.pt export)")
    return torch.load(path, map_location="cpu", weights_only=False)
