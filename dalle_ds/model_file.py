"""Consolidated model files (dvae.pt, prior.pt, clip.pt): one dict of config, weights and plain data that
loads without DeepSpeed and without the training code, and without running code from the file: it is read
by torch's allowlisting unpickler (dalle_ds/safe_load.py), and its `kind` says which of the three it is."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dalle_ds.errors import ConfigError
from dalle_ds.safe_load import load_plain

KINDS = ("dvae", "prior", "clip")


def save_model_file(path: str | Path, payload: dict) -> None:
    """Write a consolidated model file atomically (rank 0 only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_model_file(path: str | Path, kind: str) -> dict:
    """The payload of a `kind` model file; a missing, damaged, hostile or other-kind file is one ConfigError."""
    what = f"{kind}.pt"
    payload = load_plain(path, what=f"dalle_ds {what}")
    found = payload.get("kind") if isinstance(payload, dict) else None
    if found != kind:
        other = f"a {found}.pt" if found in KINDS else "not a dalle_ds model file"
        raise ConfigError(f"{path}: {other}, expected a {what}")
    if not isinstance(payload.get("config"), dict) or not isinstance(payload.get("state_dict"), dict):
        raise ConfigError(f"{path}: a {what} without its config or weights (damaged?)")
    return payload
