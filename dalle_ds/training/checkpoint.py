"""DeepSpeed checkpoints that resume exactly, and consolidated model files that load without DeepSpeed."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from dalle_ds.training.distributed import barrier, is_main, rank

LATEST = "latest"


def capture_rng() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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


def save_checkpoint(engine, ckpt_dir: str | Path, step: int, client_state: dict, rank_state: dict | None = None) -> str:
    """Save every rank's shard, then (only after all ranks finished) point `latest` at it.

    DeepSpeed keeps `client_state` from data-parallel rank 0 only, so state that differs per rank (RNG,
    EMA shards under ZeRO-3, compressor error buffers) goes into `rank_state`, one file per rank.
    A crash anywhere before the final rename leaves `latest` on the previous complete checkpoint.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = f"step{step:08d}"
    state = dict(client_state, step=step, rng=capture_rng())
    engine_dir = _engine_dir(engine, ckpt_dir)
    engine_dir.mkdir(parents=True, exist_ok=True)  # DeepSpeed creates only global rank 0's folder
    engine.save_checkpoint(str(engine_dir), tag=tag, client_state=state, save_latest=False)
    own = _rank_file(ckpt_dir, tag)
    own.parent.mkdir(parents=True, exist_ok=True)
    tmp = own.with_name(own.name + ".tmp")
    torch.save(dict(rank_state or {}, rng=capture_rng()), tmp)
    os.replace(tmp, own)
    barrier()
    if is_main():
        _atomic_write_text(ckpt_dir / LATEST, tag)
    barrier()
    return tag


def latest_tag(ckpt_dir: str | Path) -> str | None:
    path = Path(ckpt_dir) / LATEST
    return path.read_text().strip() if path.exists() else None


def load_checkpoint(engine, ckpt_dir: str | Path) -> dict | None:
    """Restore engine (model, optimizer, scheduler) and RNG; returns the client state or None."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    _, client_state = engine.load_checkpoint(str(_engine_dir(engine, Path(ckpt_dir))), tag=tag)
    if client_state is None:
        raise RuntimeError(f"checkpoint {ckpt_dir}/{tag} could not be loaded")
    own = _rank_file(Path(ckpt_dir), tag)
    if own.exists():
        rank_state = torch.load(own, map_location="cpu", weights_only=False)
        restore_rng(rank_state.pop("rng"))
        client_state = dict(client_state, rank_state=rank_state)
    else:  # older checkpoints: one RNG state for every rank
        restore_rng(client_state["rng"])
        client_state = dict(client_state, rank_state={})
    return client_state


def gathered_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Full fp32 state dict on rank 0 (gathering ZeRO-3 shards); None on other ranks."""
    import deepspeed  # noqa: PLC0415

    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        if not is_main():
            return None
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
