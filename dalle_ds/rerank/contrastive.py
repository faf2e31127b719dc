"""A small contrastive image-text model (CLIP-style, InfoNCE both ways) that dalle_ds trains itself to rerank
samples (PAPER §6 uses a pretrained CLIP; none can be downloaded here).

Image tower: 4 conv blocks (two of them stride 2), adaptive average pooling to a 4x4 map (so WHERE things
are survives, which captions like "at the top left" need), flatten, linear to the joint space. With
`shape_stream` a second such stack reads only the brightness (max over RGB): a conv stack over colour
learns a shape's features per colour and fails on a colour-shape pair it never saw, while the brightness
stack gives the same shape the same features in every colour.
Text tower: BPE ids (the prior's tokenizer format, pad 0) -> token + position embeddings -> a small
pre-LN transformer encoder -> mean over non-pad tokens -> linear. Both embeddings are L2-normalised; the
score is their cosine similarity.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dalle_ds.config import ClipConfig


def _conv_stack(cin: int, w: int) -> nn.Sequential:
    """(B, cin, H, W) -> (B, 2w, 4, 4): 4 conv blocks (two of them stride 2), then average pooling to 4x4."""

    def block(a, b, stride):
        return nn.Sequential(nn.Conv2d(a, b, 3, stride, 1), nn.GroupNorm(1, b), nn.GELU())

    return nn.Sequential(
        block(cin, w, 1), block(w, w, 2), block(w, 2 * w, 2), block(2 * w, 2 * w, 1), nn.AdaptiveAvgPool2d(4)
    )


class ImageTower(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        w = cfg.width
        self.net = _conv_stack(3, w)
        # shape_stream: a second stack over brightness (max over RGB) only; the features it gives a shape are
        # the same in every colour, so a shape the model saw in other colours is still recognised
        self.shape_net = _conv_stack(1, w) if cfg.shape_stream else None
        self.proj = nn.Linear(2 * w * 16 * (2 if cfg.shape_stream else 1), cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) in [0, 1] -> (B, E)
        h = self.net(x * 2 - 1).flatten(1)  # (B, 2w * 16)
        if self.shape_net is not None:
            h = torch.cat([h, self.shape_net(x.amax(1, keepdim=True) * 2 - 1).flatten(1)], 1)  # (B, 4w * 16)
        return self.proj(h)


class TextTower(nn.Module):
    def __init__(self, cfg: ClipConfig, vocab_size: int, text_len: int):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, cfg.width)
        self.pos = nn.Parameter(torch.randn(text_len, cfg.width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.width, cfg.heads, 4 * cfg.width, dropout=0.0, batch_first=True, norm_first=True, activation="gelu"
        )
        # text_layers=0: a bag of (token + slot) embeddings, whose score adds up word by word
        self.enc = (
            nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False) if cfg.text_layers else None
        )
        self.ln = nn.LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.embed_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) long, pad 0 -> (B, E)
        # trailing columns that are padding in every row change nothing (keys masked, queries not pooled)
        used = (ids != 0).any(0).nonzero()  # (k, 1) columns holding a token in some row
        ids = ids[:, : int(used.max()) + 1 if len(used) else 1]
        pad = ids == 0
        pad[:, 0] = False  # an empty caption still attends to its first slot
        h = self.tok(ids) + self.pos[: ids.shape[1]]  # (B, T, W)
        if self.enc is not None:
            h = self.enc(h, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).float()
        return self.proj(self.ln((h * keep).sum(1) / keep.sum(1)))


class ContrastiveModel(nn.Module):
    def __init__(self, cfg: ClipConfig, vocab_size: int, text_len: int):
        super().__init__()
        self.cfg = cfg
        self.image = ImageTower(cfg)
        self.text = TextTower(cfg, vocab_size, text_len)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(x), dim=-1)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(ids), dim=-1)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Symmetric InfoNCE over the batch; captions that are identical count as positives of each other."""
        zi, zt = self.encode_image(x), self.encode_text(ids)
        logits = self.logit_scale.clamp(max=math.log(100)).exp() * zi @ zt.t()  # (B, B)
        same = (ids.unsqueeze(1) == ids.unsqueeze(0)).all(-1).float()  # duplicates in a batch are positives
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (
            torch.sum(-target * logits.log_softmax(1), 1).mean()
            + torch.sum(-target * logits.log_softmax(0).t(), 1).mean()
        )
        acc = same[torch.arange(len(ids)), logits.argmax(1)].mean()  # top-1 image->text retrieval in the batch
        return loss, {"acc": float(acc), "scale": float(self.logit_scale.detach().exp())}
