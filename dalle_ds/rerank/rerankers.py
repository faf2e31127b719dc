"""Contrastive reranking (PAPER §6): generate N candidates per caption, keep the K the reranker scores best.

A reranker is anything with `score(images, captions) -> (N,) float tensor`, images uint8 (N, H, W, 3),
higher = better match. Two implementations:

* `ContrastiveReranker`: the small model `dalle-ds train-clip` trains (contrastive.py).
* `OpenClipReranker`: an open_clip CLIP model from local files, nothing downloaded: `--open-clip ARCH:CHECKPOINT`
  (ARCH a built-in open_clip name such as `ViT-B-32` / `ViT-L-14-quickgelu`, or a model-config JSON; CHECKPOINT
  a state dict, .safetensors or open_clip training's `epoch_N.pt`) or `--open-clip DIR` (a folder with
  `open_clip_config.json` + weights, as on the Hugging Face hub). open_clip itself can't be imported beside
  this project's torch (its torchvision doesn't load), so dalle_ds runs the model with its own torch port
  (open_clip_model.py, ViT + text transformer only) and the CLIP BPE tokenizer (clip_bpe.py), reading the
  configs and vocabulary from the installed open_clip_torch package files (`pip install --no-deps`).
  tests/sampling/test_open_clip.py checks both equal open_clip's own outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from dalle_ds.rerank.clip_bpe import ClipTokenizer
from dalle_ds.rerank.io import load_clip
from dalle_ds.rerank.open_clip_config import load_config
from dalle_ds.rerank.open_clip_model import load_model, preprocess


class Reranker(Protocol):
    def score(self, images: np.ndarray, captions: Sequence[str]) -> torch.Tensor: ...


def _as_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    x = torch.as_tensor(np.asarray(images))
    return x.permute(0, 3, 1, 2).float().div(255.0)


class ContrastiveReranker:
    def __init__(self, model, tok, image_size: int, device: str | torch.device = "cpu", batch: int = 256):
        self.model, self.tok, self.image_size, self.batch = model.eval().to(device), tok, image_size, batch
        self.device = device

    @torch.no_grad()
    def score(self, images, captions) -> torch.Tensor:
        out = []
        for s in range(0, len(captions), self.batch):
            x = _as_float(images[s : s + self.batch]).to(self.device)
            if x.shape[-1] != self.image_size:
                x = F.interpolate(x, size=(self.image_size, self.image_size), mode="area")
            zi = self.model.encode_image(x)
            ids = self.tok.encode_batch(list(captions[s : s + self.batch]), train=False).to(self.device)
            out.append((zi * self.model.encode_text(ids)).sum(-1).cpu())
        return torch.cat(out)


class OpenClipReranker:
    """An open_clip CLIP model from local files, run by dalle_ds's own torch port (open_clip_model.py):
    open_clip cannot be imported beside this project's torch (see open_clip_config.py)."""

    def __init__(self, arch: str, checkpoint: str, device: str | torch.device = "cpu", batch: int = 64):

        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"--open-clip: checkpoint {checkpoint} does not exist (nothing is downloaded)")
        self.cfg = load_config(arch)
        self.model = load_model(self.cfg, checkpoint).to(device)
        self.tokenizer = ClipTokenizer(self.cfg.text.context_length, self.cfg.text.clean)
        self.device, self.batch = device, batch

    @torch.no_grad()
    def score(self, images, captions) -> torch.Tensor:
        out = []
        for s in range(0, len(captions), self.batch):
            x = preprocess(np.asarray(images[s : s + self.batch]), self.cfg.preprocess).to(self.device)
            ids = self.tokenizer(list(captions[s : s + self.batch])).to(self.device)
            zi = F.normalize(self.model.encode_image(x).float(), dim=-1)
            zt = F.normalize(self.model.encode_text(ids).float(), dim=-1)
            out.append((zi * zt).sum(-1).cpu())
        return torch.cat(out)


# open_clip's preference when a model folder (the Hugging Face hub layout) holds several weight files.
_DIR_WEIGHTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)


def _open_clip_spec(spec: str) -> tuple[str, str]:
    """ARCH:CHECKPOINT (ARCH a built-in name or a config JSON), or a folder with open_clip_config.json + weights."""
    d = Path(spec)
    if d.is_dir():
        found = [d / n for n in _DIR_WEIGHTS if (d / n).is_file()]
        if not (d / "open_clip_config.json").is_file() or not found:
            raise ValueError(
                f"--open-clip {spec}: a model folder needs open_clip_config.json and one of {_DIR_WEIGHTS}"
            )
        return str(d / "open_clip_config.json"), str(found[0])
    if ":" not in spec:
        raise ValueError(
            "--open-clip takes ARCH:CHECKPOINT (e.g. ViT-B-32:/models/open_clip.pt, or "
            "config.json:weights.safetensors) or a folder holding open_clip_config.json and weights"
        )
    arch, ckpt = spec.split(":", 1)
    return arch, ckpt


def load_reranker(
    *, clip: str | None = None, open_clip: str | None = None, device: str | torch.device = "cpu"
) -> Reranker:
    """The reranker of --clip FILE or --open-clip SPEC, in fp32 on `device`."""
    if clip is not None:
        model, tok, cfg = load_clip(clip)
        return ContrastiveReranker(model, tok, cfg.data.image_size, device)
    return OpenClipReranker(*_open_clip_spec(open_clip or ""), device=device)


def rerank(
    reranker: Reranker, images: np.ndarray, captions: Sequence[str], candidates: int, keep: int
) -> tuple[np.ndarray, torch.Tensor]:
    """images: (len(captions) * candidates, H, W, 3), each caption's candidates adjacent. Returns the best
    `keep` per caption (best first) and their scores."""
    labels = [c for c in captions for _ in range(candidates)]
    scores = reranker.score(images, labels).view(len(captions), candidates)
    top = scores.topk(keep, dim=1)
    pick = (torch.arange(len(captions)).unsqueeze(1) * candidates + top.indices).flatten()
    return np.asarray(images)[pick.numpy()], top.values.flatten()
