"""Contrastive reranking (PAPER §6): generate N candidates per caption, keep the K the reranker scores best.

A reranker is anything with `score(images, captions) -> (N,) float tensor`, images uint8 (N, H, W, 3),
higher = better match. Two implementations:

* `ContrastiveReranker`: the small model `dalle-ds train-clip` trains (dalle_ds/contrastive.py).
* `OpenClipReranker`: an open_clip model built from a local checkpoint file the user points to
  (`--open-clip ARCH:CHECKPOINT`, e.g. `ViT-B-32:/models/open_clip_vit_b32.pt`). It needs the
  `open_clip_torch` package, which is not among this project's pinned dependencies: with it installed,
  `open_clip.create_model_and_transforms(ARCH, pretrained=CHECKPOINT)` loads the file without any
  download, and the model's own preprocessing and tokenizer are used. Without it a clear error says so.
  (Re-implementing open_clip's architectures and its BPE vocabulary file here was not feasible.)
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F


class Reranker(Protocol):
    def score(self, images: np.ndarray, captions: Sequence[str]) -> torch.Tensor: ...


def _as_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    x = torch.as_tensor(np.asarray(images))
    return x.permute(0, 3, 1, 2).float().div(255.0)


class ContrastiveReranker:
    def __init__(self, model, tok, image_size: int, batch: int = 256):
        self.model, self.tok, self.image_size, self.batch = model.eval(), tok, image_size, batch

    @torch.no_grad()
    def score(self, images, captions) -> torch.Tensor:
        out = []
        for s in range(0, len(captions), self.batch):
            x = _as_float(images[s:s + self.batch])
            if x.shape[-1] != self.image_size:
                x = F.interpolate(x, size=(self.image_size, self.image_size), mode="area")
            zi = self.model.encode_image(x)
            zt = self.model.encode_text(self.tok.encode_batch(list(captions[s:s + self.batch]), train=False))
            out.append((zi * zt).sum(-1))
        return torch.cat(out)


class OpenClipReranker:
    def __init__(self, arch: str, checkpoint: str, device: str = "cpu"):
        try:
            import open_clip  # noqa: PLC0415
        except ImportError as e:
            raise RuntimeError("--open-clip needs the open_clip_torch package (pip install open_clip_torch); "
                               "it is not a dalle_ds dependency. Or train a reranker with `dalle-ds train-clip` "
                               "and pass --clip clip.pt") from e
        from pathlib import Path  # noqa: PLC0415

        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"--open-clip: checkpoint {checkpoint} does not exist (nothing is downloaded)")
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=checkpoint, device=device)
        self.model, self.preprocess = model.eval(), preprocess
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.device = device

    @torch.no_grad()
    def score(self, images, captions) -> torch.Tensor:
        from PIL import Image  # noqa: PLC0415

        x = torch.stack([self.preprocess(Image.fromarray(np.asarray(im))) for im in images]).to(self.device)
        zi = F.normalize(self.model.encode_image(x).float(), dim=-1)
        zt = F.normalize(self.model.encode_text(self.tokenizer(list(captions)).to(self.device)).float(), dim=-1)
        return (zi * zt).sum(-1).cpu()


def load_reranker(*, clip: str | None = None, open_clip: str | None = None) -> Reranker:
    if clip is not None:
        from dalle_ds.train_clip import load_clip  # noqa: PLC0415

        model, tok, cfg = load_clip(clip)
        return ContrastiveReranker(model, tok, cfg.data.image_size)
    if open_clip is None or ":" not in open_clip:
        raise ValueError("--open-clip takes ARCH:CHECKPOINT, e.g. ViT-B-32:/models/open_clip.pt")
    arch, ckpt = open_clip.split(":", 1)
    return OpenClipReranker(arch, ckpt)


def rerank(reranker: Reranker, images: np.ndarray, captions: Sequence[str], candidates: int,
           keep: int) -> tuple[np.ndarray, torch.Tensor]:
    """images: (len(captions) * candidates, H, W, 3), each caption's candidates adjacent. Returns the best
    `keep` per caption (best first) and their scores."""
    labels = [c for c in captions for _ in range(candidates)]
    scores = reranker.score(images, labels).view(len(captions), candidates)
    top = scores.topk(keep, dim=1)
    pick = (torch.arange(len(captions)).unsqueeze(1) * candidates + top.indices).flatten()
    return np.asarray(images)[pick.numpy()], top.values.flatten()
