"""The `dense` backend, the reference every other backend must equal: SDPA with the boolean (L, L) mask of
`masks.dense_mask`. Also the KV-cache path of decoding, which reads rows of the same mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dalle_ds.attention import masks
from dalle_ds.attention.masks import MaskSpec

# The dense mask on each device, so a GPU forward does not copy it host -> device in every layer.
_DEVICE_MASKS: dict[tuple[MaskSpec, str], torch.Tensor] = {}


def mask_on(spec: MaskSpec, device: torch.device | str) -> torch.Tensor:
    """The (L, L) boolean mask of `spec` on `device` (True = attend), cached per device."""
    key = (spec, str(torch.device(device)))
    m = _DEVICE_MASKS.get(key)
    if m is None:
        m = _DEVICE_MASKS[key] = masks.dense_mask(spec, device)
    return m


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MaskSpec) -> torch.Tensor:
    """SDPA with the boolean mask (has a backward on CPU, unlike FlexAttention). q, k, v: (B, H, L, D)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_on(spec, q.device))  # (B, H, L, D)


def attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_rows: torch.Tensor) -> torch.Tensor:
    """Attention of the newest query rows against (a gather of) the KV cache.

    q: (B, H, Lq, D) the newest positions; k, v: (B, H, Lk, D) the cached keys/values they may read;
    mask_rows: (Lq, Lk) bool, rows of the same dense mask (True = attend). Every row must allow at
    least one key (the diagonal always is). Returns (B, H, Lq, D).
    """
    if mask_rows.shape != (q.shape[-2], k.shape[-2]):
        raise ValueError(f"mask_rows must be (Lq, Lk) = ({q.shape[-2]}, {k.shape[-2]}), got {tuple(mask_rows.shape)}")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_rows)
