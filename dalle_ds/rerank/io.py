"""clip.pt: the small contrastive model's config, weights and tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from dalle_ds.config import ExperimentConfig, from_dict
from dalle_ds.model_file import load_model_file, save_model_file
from dalle_ds.rerank.contrastive import ContrastiveModel
from dalle_ds.tokenizer import CaptionTokenizer


def save_clip(
    path: str | Path, state_dict: dict[str, torch.Tensor], cfg: ExperimentConfig, tok: CaptionTokenizer, *, step: int
) -> None:
    save_model_file(
        path,
        {"kind": "clip", "config": cfg.to_dict(), "state_dict": state_dict, "tokenizer": tok.to_json(), "step": step},
    )


def load_clip(path: str | Path) -> tuple[ContrastiveModel, CaptionTokenizer, ExperimentConfig]:
    payload = load_model_file(path, "clip")
    cfg = from_dict(payload["config"])
    tok = CaptionTokenizer.from_json(payload["tokenizer"], cfg.tokenizer)
    model = ContrastiveModel(cfg.clip, tok.vocab_size, tok.text_len)
    model.load_state_dict(payload["state_dict"])
    return model.eval(), tok, cfg
