"""The prior's model files, read back without DeepSpeed: `prior.pt` (config, weights, EMA weights, tokenizer)
and the export folder of `dalle-ds export` (model.safetensors + config.json + tokenizer.json)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dalle_ds.config import ExperimentConfig, check_compatible, from_dict
from dalle_ds.errors import ConfigError
from dalle_ds.model_file import load_model_file, save_model_file
from dalle_ds.prior.model import Prior
from dalle_ds.tokenizer import CaptionTokenizer

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"


def save_prior(
    path: str | Path,
    state_dict: dict[str, torch.Tensor],
    cfg: ExperimentConfig,
    tok: CaptionTokenizer,
    *,
    step: int,
    ema_state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    payload = {
        "kind": "prior",
        "config": cfg.to_dict(),
        "state_dict": state_dict,
        "tokenizer": tok.to_json(),
        "step": step,
    }
    if ema_state_dict is not None:
        payload["ema_state_dict"] = ema_state_dict
    save_model_file(path, payload)


def write_export(out: str | Path, state_dict: dict[str, torch.Tensor], config: dict, tokenizer_json: str) -> Path:
    """Write the three files of an export folder into `out` (each atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (WEIGHTS + ".tmp")
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS)
    for name, text in ((CONFIG, json.dumps(config, indent=1)), (TOKENIZER, tokenizer_json)):
        (out / (name + ".tmp")).write_text(text)
        os.replace(out / (name + ".tmp"), out / name)
    return out


def is_export(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / WEIGHTS).exists()


def read_export(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, str]:
    """An export folder's weights, config and tokenizer; a missing or damaged file is one ConfigError."""
    path = Path(path)
    try:
        state = load_file(str(path / WEIGHTS))
        config = json.loads((path / CONFIG).read_text())
        tokenizer = (path / TOKENIZER).read_text()
    except (OSError, ValueError, SafetensorError) as e:  # JSON and UTF-8 errors are ValueErrors
        raise ConfigError(f"{path}: not a complete export folder ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(config, dict):
        raise ConfigError(f"{path}/{CONFIG}: not a config mapping")
    return state, config, tokenizer


def load_prior(
    path: str | Path, cfg: ExperimentConfig | None = None, backend: str | None = None, use_ema: bool = False
) -> tuple[Prior, CaptionTokenizer, ExperimentConfig]:
    """Rebuild prior and tokenizer from a prior.pt or an export folder alone (no DeepSpeed); `use_ema`
    loads the averaged weights (trained with prior_train.ema_decay > 0)."""
    if is_export(path):
        state, config, tok_json = read_export(path)
        payload = {"config": config, "state_dict": state, "tokenizer": tok_json}
        if use_ema:
            raise ValueError(f"{path}: an export holds one set of weights; export with --ema instead")
    else:
        payload = load_model_file(path, "prior")
    saved = from_dict(payload["config"])
    if cfg is not None:
        check_compatible(saved, cfg, "prior")
    if backend is not None:
        saved.prior.attention_backend = backend  # weights do not depend on the backend
    model = Prior(saved.prior)
    if use_ema and "ema_state_dict" not in payload:
        raise ValueError(f"{path} has no EMA weights (train with prior_train.ema_decay > 0)")
    model.load_state_dict(payload["ema_state_dict"] if use_ema else payload["state_dict"])
    return model.eval(), CaptionTokenizer.from_json(payload["tokenizer"], saved.tokenizer), saved
