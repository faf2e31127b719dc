"""Loading `.pt` files without running code from them.

A pickle can name any importable function and have it called while it loads, so every `.pt` this package
reads goes through torch's allowlisting unpickler (`weights_only=True`): tensors, containers, numbers and
strings, plus the few named classes a caller allows. Our own files (dvae.pt, prior.pt, clip.pt, rank
states) hold nothing else. DeepSpeed's loaders call `torch.load(weights_only=False)` themselves;
`weights_only_loads` forces those calls through the same unpickler while it is active.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from dalle_ds.errors import ConfigError

_FORCE, _FORCE_NO = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


class UnsafeFileError(ConfigError):
    """A file asked to import or call something outside the allowlist: it is refused unread."""


def refusal(path: str | Path, err: BaseException, what: str) -> ConfigError:
    """The one-line error for a `.pt` that did not load: hostile (disallowed global), damaged or not a pickle."""
    text = str(err)
    if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in text:
        # torch's message names what it refused, e.g. "unsupported GLOBAL posix.system"
        found = re.search(r"GLOBAL ([\w.]+)", text)
        asks = f"it asks to load {found.group(1)}" if found else "it holds more than tensors and plain data"
        return UnsafeFileError(f"{path}: not a {what}: {asks}, which could run code; refused without running it")
    if isinstance(err, (EOFError, zipfile.BadZipFile)) or "zip archive" in text or "central directory" in text:
        return ConfigError(f"{path}: not a {what}: the file is truncated or damaged ({type(err).__name__})")
    if isinstance(err, (KeyError, pickle.UnpicklingError)):  # e.g. a text file: "invalid load key"
        return ConfigError(f"{path}: not a {what}: not a PyTorch file")
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return ConfigError(f"{path}: not a {what}: {first[:200]}")


def load_plain(path: str | Path, *, what: str) -> object:
    """torch.load(weights_only=True) on CPU; anything else than a readable file of tensors and plain data
    (a directory, text, a truncated file, a pickle that imports code) is one ConfigError naming `path`."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file (expected a {what})")
    if not path.is_file():
        raise ConfigError(f"{path}: not a {what}: it is a {'directory' if path.is_dir() else 'special file'}")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of files it then refuses
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile, KeyError) as e:
        raise refusal(path, e, what) from e


@contextmanager
def weights_only_loads(allowed: list | tuple = ()) -> Iterator[None]:
    """Every torch.load inside the block uses the allowlisting unpickler, even a caller's explicit
    `weights_only=False` (DeepSpeed's checkpoint engine, zero_to_fp32); `allowed` adds named classes."""
    saved = {k: os.environ.get(k) for k in (_FORCE, _FORCE_NO)}
    os.environ[_FORCE] = "1"
    os.environ.pop(_FORCE_NO, None)  # torch refuses both set at once
    try:
        with torch.serialization.safe_globals(list(allowed)):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
