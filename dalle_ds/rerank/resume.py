"""train-clip's checkpoint and stop signals: a stopped run continues where it stopped, ending with the same
weights as a run that was never stopped.

One file, OUT/clip_ckpt/checkpoint.pt, replaced atomically (temp file + rename: a kill mid-write leaves the
previous one), holds everything the next step depends on: model, AdamW and LR-schedule state, the batch RNG
(numpy), torch's RNG, the data reader's crop counter, the tokenizer, the step and the history so far. It is
plain data, read back with the allowlisting unpickler. SIGTERM and a first Ctrl-C (SIGINT) only set a flag:
the loop saves at the end of the current step and stops; a second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import torch

from dalle_ds.config import ExperimentConfig, from_dict
from dalle_ds.errors import ConfigError
from dalle_ds.model_file import save_model_file
from dalle_ds.safe_load import load_plain

CKPT_DIR = "clip_ckpt"
CKPT_FILE = "checkpoint.pt"
KIND = "clip_checkpoint"
# fields whose change makes the saved weights or tokenizer unusable: a resume with other values is refused
SHAPE_FIELDS = (
    "clip.embed_dim clip.width clip.text_layers clip.heads clip.shape_stream tokenizer.vocab_size tokenizer.text_len"
).split()


def save(ckpt_dir: Path, *, step: int, cfg: ExperimentConfig, model, opt, sched, rng, tok, data, history, seconds):
    """Write the checkpoint of `step` (atomic)."""
    payload = {
        "kind": KIND,
        "step": step,
        "config": cfg.to_dict(),
        "state_dict": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "numpy_rng": rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
        "data": data.state_dict() if hasattr(data, "state_dict") else {},
        "tokenizer": tok.to_json(),
        "history": history,
        "seconds": seconds,
    }
    save_model_file(ckpt_dir / CKPT_FILE, payload)


def load(ckpt_dir: Path, cfg: ExperimentConfig) -> dict | None:
    """The checkpoint in ckpt_dir, or None; refused (ConfigError) if it was trained with other model shapes."""
    path = ckpt_dir / CKPT_FILE
    if not path.exists():
        return None
    state = load_plain(path, what="train-clip checkpoint")
    if not isinstance(state, dict) or state.get("kind") != KIND:
        raise ConfigError(f"{path}: not a train-clip checkpoint; remove it or use another --out")
    saved = from_dict(state["config"])
    for dotted in SHAPE_FIELDS:
        section, name = dotted.split(".")
        a, b = getattr(getattr(saved, section), name), getattr(getattr(cfg, section), name)
        if a != b:
            raise ConfigError(
                f"{dotted}: the checkpoint in {ckpt_dir} was trained with {a!r}, the config asks for {b!r}; "
                "drop the override, or start over with --no-resume (or another --out)"
            )
    return state


def restore(state: dict, *, model, opt, sched, rng: np.random.Generator, data) -> None:
    """Put every piece of training state back as it was when `state` was saved."""
    model.load_state_dict(state["state_dict"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    rng.bit_generator.state = state["numpy_rng"]
    torch.set_rng_state(state["torch_rng"])
    if hasattr(data, "load_state_dict") and state["data"]:
        data.load_state_dict(state["data"])


class StopFlag:
    """SIGTERM or a first SIGINT sets `signum`; a second SIGINT raises KeyboardInterrupt as usual."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
