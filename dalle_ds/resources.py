"""Files that ship with the package: the DeepSpeed configs of `ds_configs/` (installed as `dalle_ds.ds_configs`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{name} is not installed: reinstall dalle_ds (`pip install .`)")
    return Path(next(iter(spec.submodule_search_locations)))


DS_CONFIGS = _package_dir("dalle_ds.ds_configs")
