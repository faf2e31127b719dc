"""The stage-2 prior: a decoder-only sparse transformer over [text | image] tokens (PAPER §0, §3).

Token stream. The target sequence is s = [text_0 .. text_{T-1}, img_0 .. img_{N-1}] (N = G*G, image
in raster order). The input at position i is x_0 = BOS, x_i = s_{i-1}; position i predicts s_i.
Positions 0..T-1 are text positions (text logits), T..T+N-1 image positions (image logits). So the
last text position's input is text_{T-2}, position T's input is text_{T-1} and it predicts img_0.
The attention masks (`masks.py`) are defined over these positions.

Text ids come from the tokenizer in [0, Vt) with pad id 0 in empty slots. A pad in slot p becomes id
Vt + p (PAPER §2: one learned pad embedding per slot), in the input and in the targets, so the text
vocabulary of the model is Vt + T and the model learns where captions end.

Each input embedding carries the position of its OWN token: text slot p -> tok_emb + text_pos_emb[p];
image raster r -> img_tok_emb + row_emb[r // G] + col_emb[r % G]; BOS has its own vector.

Blocks are pre-LN resblocks, x = x + attn_branch(x); x = x + mlp_branch(x), each branch a separate
submodule holding its own LayerNorm (the gradient-scaling code wraps each branch from outside).
Layer i uses mask kind `masks.layer_kinds(n_layers)[i]`. One output projection over the joint
vocabulary (Vt + T text ids, then Vi image ids), computed in fp32; text positions use only the text
slice and image positions only the image slice.

Sampling uses a KV cache: `init_cache`, then `prefill(text, cache, image_prefix)` for positions
0..T+m, then `decode_step(image_token, cache)` once per image token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from dalle_ds import attention
from dalle_ds.attention import masks
from dalle_ds.attention.masks import MaskSpec
from dalle_ds.config import PriorConfig

# ----------------------------------------------------------------------------------------------
# KV cache


@dataclass
class KVCache:
    """Keys and values of every layer for the positions processed so far, preallocated to (B, H, L, D).

    For each mask kind it also keeps the dense mask on the cache's device and, per query row, the
    list of keys that row may read (`key_index`, padded to the longest row, with `key_valid` marking
    the real entries), so a one-row decode step gathers only the allowed keys: T + G + 1 of them in a
    row layer instead of the whole prefix.
    """

    k: list[torch.Tensor]  # per layer (B, H, L, D)
    v: list[torch.Tensor]  # per layer (B, H, L, D)
    mask: dict[str, torch.Tensor]  # kind -> (L, L) bool
    key_index: dict[str, torch.Tensor]  # kind -> (L, W) long, allowed keys of each row, ascending
    key_valid: dict[str, torch.Tensor]  # kind -> (L, W) bool, False on padding
    length: int = 0  # positions 0..length-1 are filled
    max_len: int = field(init=False)

    def __post_init__(self) -> None:
        self.max_len = self.k[0].shape[2]

    def update_and_attend(
        self, layer: int, kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Store k, v (B, H, n, D) of positions length..length+n-1 and attend q (B, H, n, D) to the cache."""
        start, n = self.length, q.shape[2]
        end = start + n
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        if n == 1:  # decode: read only the keys this row may attend to
            idx, valid = self.key_index[kind][start], self.key_valid[kind][start]  # (W,), (W,)
            ks = self.k[layer].index_select(2, idx)  # (B, H, W, D)
            vs = self.v[layer].index_select(2, idx)
            return attention.attend_cached(q, ks, vs, valid[None, :])  # (B, H, 1, D)
        rows = self.mask[kind][start:end, :end]  # (n, end)
        return attention.attend_cached(q, self.k[layer][:, :, :end], self.v[layer][:, :, :end], rows)


def _key_lists(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, L) bool -> per row the allowed key indices in ascending order, padded: (L, W) long, (L, W) bool."""
    counts = mask.sum(dim=1)  # (L,)
    width = int(counts.max())
    # a stable sort of "not allowed" puts the allowed keys first, in ascending index order
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :width]  # (L, W)
    valid = torch.arange(width, device=mask.device)[None, :] < counts[:, None]  # (L, W)
    return torch.where(valid, order, torch.zeros_like(order)), valid  # padding reads key 0, masked out


# ----------------------------------------------------------------------------------------------
# Blocks


class SelfAttention(nn.Module):
    """Multi-head self-attention under one mask kind; the mask comes from `masks.py` via `attention`."""

    def __init__(self, cfg: PriorConfig, spec: MaskSpec, layer_idx: int):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.spec, self.layer_idx = spec, layer_idx
        self.backend = cfg.attention_backend  # any registered backend; weights do not depend on it
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, kv: KVCache | None = None) -> torch.Tensor:
        B, L, D = x.shape  # (B, L, D); with a cache, L is the number of new positions
        q, k, v = self.qkv(x).split(D, dim=2)  # 3 x (B, L, D)
        q, k, v = (t.view(B, L, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H, L, Dh)
        if kv is None:
            y = attention.attend(q, k, v, self.spec, backend=self.backend)
        else:
            y = kv.update_and_attend(self.layer_idx, self.spec.kind, q, k, v)
        y = y.transpose(1, 2).reshape(B, L, D)  # (B, L, D)
        return self.proj(y)


class AttentionBranch(nn.Module):
    """The attention resblock branch: LN -> masked attention -> projection (-> dropout)."""

    def __init__(self, cfg: PriorConfig, spec: MaskSpec, layer_idx: int):
        super().__init__()
        self.ln = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg, spec, layer_idx)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, kv: KVCache | None = None) -> torch.Tensor:
        return self.drop(self.attn(self.ln(x), kv))  # (B, L, D)


class MLPBranch(nn.Module):
    """The MLP resblock branch: LN -> d -> mlp_ratio*d -> GELU -> d (-> dropout)."""

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.ln = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(self.ln(x)))))  # (B, L, D)


class Layer(nn.Module):
    """One transformer layer = two resblocks. Wrappers of a branch must pass `kv=` through."""

    def __init__(self, cfg: PriorConfig, spec: MaskSpec, layer_idx: int):
        super().__init__()
        self.attn_branch = AttentionBranch(cfg, spec, layer_idx)
        self.mlp_branch = MLPBranch(cfg)

    def forward(self, x: torch.Tensor, kv: KVCache | None = None) -> torch.Tensor:
        x = x + (self.attn_branch(x) if kv is None else self.attn_branch(x, kv=kv))
        x = x + self.mlp_branch(x)
        return x  # (B, L, D)


# ----------------------------------------------------------------------------------------------
# The prior


class Prior(nn.Module):
    def __init__(self, cfg: PriorConfig):
        super().__init__()
        attention.get_backend(cfg.attention_backend)  # fail at build time, not in the first forward
        self.cfg = cfg
        T, G, D = cfg.text_len, cfg.image_grid, cfg.d_model
        self.text_len, self.grid, self.image_len = T, G, G * G
        self.text_vocab = cfg.text_vocab_size + T  # BPE ids, then one pad id per slot
        self.image_vocab = cfg.image_vocab_size

        self.bos = nn.Parameter(torch.zeros(D))  # input at position 0
        self.tok_emb = nn.Embedding(self.text_vocab, D)  # text ids incl. per-slot pads
        self.text_pos_emb = nn.Embedding(T, D)  # slot p of the text token
        self.img_tok_emb = nn.Embedding(self.image_vocab, D)
        self.row_emb = nn.Embedding(G, D)  # PAPER §3.3: broadcast row + column
        self.col_emb = nn.Embedding(G, D)

        self.kinds = masks.layer_kinds(cfg.n_layers)
        self.blocks = nn.ModuleList(
            Layer(cfg, MaskSpec(kind, T, G, cfg.conv_kernel), i) for i, kind in enumerate(self.kinds)
        )
        self.ln_f = nn.LayerNorm(D)
        # One head over the joint vocabulary [text ids | pad ids | image ids], applied in fp32. Tied, its
        # weights are the input embeddings (only a bias of its own): the 12b preset does this, since the
        # paper's 12.0 B leaves room for the 0.1 B of vocabulary matrices once, not twice.
        if cfg.tie_embeddings:
            self.head_bias = nn.Parameter(torch.zeros(self.text_vocab + self.image_vocab))
        else:
            self.head = nn.Linear(D, self.text_vocab + self.image_vocab)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.normal_(self.bos, std=0.02)
        # GPT-2: each resblock adds its output to the residual stream, so after 2 * n_layers branches
        # the stream's variance grows with their number; scaling the last projection of every branch
        # by 1/sqrt(2 * n_layers) keeps the stream (and the final LN's input) at O(1) at init.
        std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for layer in self.blocks:
            nn.init.normal_(layer.attn_branch.attn.proj.weight, std=std)
            nn.init.normal_(layer.mlp_branch.proj.weight, std=std)

    def set_attention_backend(self, name: str) -> None:
        """Switch every layer to another registered backend (weights are backend-independent)."""
        attention.get_backend(name)
        for layer in self.blocks:
            layer.attn_branch.attn.backend = name

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- embeddings --------------------------------------------------------------------------

    def remap_pads(self, text: torch.Tensor) -> torch.Tensor:
        """Tokenizer ids (B, T) with pad 0 -> model ids: a pad in slot p becomes Vt + p (idempotent)."""
        slots = torch.arange(text.shape[1], device=text.device)
        return torch.where(text == 0, self.cfg.text_vocab_size + slots, text)  # (B, T)

    def _embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Model text ids (B, n) of slots 0..n-1 -> (B, n, D)."""
        slots = torch.arange(ids.shape[1], device=ids.device)
        return self.tok_emb(ids) + self.text_pos_emb(slots)[None]

    def _embed_image(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Image ids (B, n) of raster indices start..start+n-1 -> (B, n, D)."""
        r = torch.arange(start, start + ids.shape[1], device=ids.device)
        return self.img_tok_emb(ids) + (self.row_emb(r // self.grid) + self.col_emb(r % self.grid))[None]

    def _embed_prefix(self, text: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
        """Inputs of positions 0..T+m: [BOS, text_0..text_{T-1}, img_0..img_{m-1}] -> (B, 1+T+m, D)."""
        B = text.shape[0]
        parts = [self.bos.expand(B, 1, -1), self._embed_text(self.remap_pads(text))]
        if image is not None and image.shape[1] > 0:
            parts.append(self._embed_image(image))
        return torch.cat(parts, dim=1)

    # -- full pass ----------------------------------------------------------------------------

    def _trunk(self, x: torch.Tensor, kv: KVCache | None = None) -> torch.Tensor:
        for layer in self.blocks:
            x = layer(x, kv)
        return self.ln_f(x)  # (B, L, D)

    def _head(self, image: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight (V, D) and bias (V,) of the text (Vt + T ids) or the image (Vi ids) part of the head."""
        Vt = self.text_vocab
        if self.cfg.tie_embeddings:
            weight = self.img_tok_emb.weight if image else self.tok_emb.weight
            bias = self.head_bias
        else:
            weight = self.head.weight[Vt:] if image else self.head.weight[:Vt]
            bias = self.head.bias
        return weight, bias[Vt:] if image else bias[:Vt]

    def _text_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(B, n, D) at text positions -> (B, n, Vt + T) in fp32."""
        weight, bias = self._head(image=False)
        return F.linear(h.float(), weight.float(), bias.float())

    def _image_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(B, n, D) at image positions -> (B, n, Vi) in fp32."""
        weight, bias = self._head(image=True)
        return F.linear(h.float(), weight.float(), bias.float())

    def _check(self, text: torch.Tensor, image: torch.Tensor | None, full: bool) -> None:
        if text.dim() != 2 or text.shape[1] != self.text_len:
            raise ValueError(f"text must be (B, {self.text_len}) token ids, got {tuple(text.shape)}")
        if image is not None:
            n = image.shape[1] if image.dim() == 2 else -1
            ok = n == self.image_len if full else 0 <= n < self.image_len
            if not ok or image.shape[0] != text.shape[0]:
                want = f"(B, {self.image_len})" if full else f"(B, m) with m < {self.image_len}"
                raise ValueError(f"image must be {want} raster-order token ids, got {tuple(image.shape)}")

    def logits(self, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full uncached pass. text (B, T) tokenizer ids, image (B, N) raster ids ->
        text logits (B, T, Vt + T) and image logits (B, N, Vi), fp32, position i predicting s_i."""
        self._check(text, image, full=True)
        T = self.text_len
        x = self._embed_prefix(text, image[:, :-1])  # (B, T + N, D): the last image token is only a target
        h = self._trunk(x)  # (B, T + N, D)
        return self._text_logits(h[:, :T]), self._image_logits(h[:, T:])

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Loss = w * CE_text + (1 - w) * CE_image (PAPER §3.4), each a mean over its own positions."""
        text_logits, image_logits = self.logits(text, image)
        loss_text = F.cross_entropy(text_logits.flatten(0, 1), self.remap_pads(text).flatten())
        loss_image = F.cross_entropy(image_logits.flatten(0, 1), image.flatten())
        w = self.cfg.text_loss_weight
        loss = w * loss_text + (1.0 - w) * loss_image
        return loss, {"loss_text": loss_text.detach(), "loss_image": loss_image.detach()}

    # -- KV-cached decoding ---------------------------------------------------------------------

    def init_cache(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """An empty cache for `batch_size` sequences (defaults: the parameters' device and dtype)."""
        p = self.blocks[0].attn_branch.attn.qkv.weight  # what keys and values are computed in
        device = p.device if device is None else torch.device(device)
        dtype = p.dtype if dtype is None else dtype
        L, H, Dh = self.cfg.seq_len, self.cfg.n_heads, self.cfg.head_dim
        shape = (batch_size, H, L, Dh)
        k = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.blocks]
        v = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.blocks]
        mask, key_index, key_valid = {}, {}, {}
        for layer in self.blocks:
            spec = layer.attn_branch.attn.spec
            if spec.kind not in mask:
                mask[spec.kind] = attention.mask_on(spec, device)
                key_index[spec.kind], key_valid[spec.kind] = _key_lists(mask[spec.kind])
        return KVCache(k=k, v=v, mask=mask, key_index=key_index, key_valid=key_valid)

    def prefill(self, text: torch.Tensor, cache: KVCache, image_prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Run positions 0..T+m (BOS, the T text tokens, the first m image tokens) into an empty cache.

        text (B, T) tokenizer ids; image_prefix (B, m) raster ids, m < N (image-to-image priming).
        Returns the logits of image token m, (B, Vi) fp32.
        """
        self._check(text, image_prefix, full=False)
        if cache.length != 0:
            raise ValueError(f"prefill needs an empty cache, this one holds {cache.length} positions")
        x = self._embed_prefix(text, image_prefix)  # (B, 1 + T + m, D)
        h = self._trunk(x, cache)
        cache.length = x.shape[1]
        return self._image_logits(h[:, -1])  # (B, Vi)

    def decode_step(self, image_token: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Append image token r (B,) at position T + r + 1; return the logits of token r + 1, (B, Vi)."""
        pos = cache.length
        r = pos - self.text_len - 1  # raster index of the token being fed
        if r < 0:
            raise ValueError("decode_step needs a prefilled cache (call prefill first)")
        if pos >= cache.max_len:
            raise ValueError(f"the cache is full: all {self.image_len} image positions have been decoded")
        x = self._embed_image(image_token.view(-1, 1), start=r)  # (B, 1, D)
        h = self._trunk(x, cache)
        cache.length = pos + 1
        return self._image_logits(h[:, -1])  # (B, Vi)
