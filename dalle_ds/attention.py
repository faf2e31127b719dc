"""Attention dispatch: one interface, several backends (DESIGN: `attention.py`).

    attend(q, k, v, spec, backend="dense")   full-sequence attention under the mask `spec`
    attend_cached(q, k, v, mask_rows)         KV-cache decoding: new query rows against the cache

Every backend computes the same function: softmax(q k^T / sqrt(D) + mask) v, where the mask is the
one defined in `dalle_ds.prior.masks` (True = may attend). Weights never depend on the backend, so a
model trained with one samples with another.

Backends live in the `BACKENDS` registry (name -> function with the signature of `_dense`). `dense`
is the reference: PyTorch SDPA with the boolean (L, L) mask. `sparse` (PyTorch block-gather) and
`triton` (kernels/) are added by their own modules with `register_backend(name, fn)`; asking for a
name that is not registered raises a ValueError that says which ones are.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from dalle_ds.prior import masks
from dalle_ds.prior.masks import MaskSpec

# fn(q, k, v, spec) -> out; q, k, v, out: (B, H, L, D) over the whole sequence, L == spec.seq_len
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, MaskSpec], torch.Tensor]

# Names the config accepts but that are implemented elsewhere (registered when their module loads).
PLANNED_BACKENDS = ("sparse", "triton")

# The dense mask on each device, so a GPU forward does not copy it host -> device in every layer.
_DEVICE_MASKS: dict[tuple[MaskSpec, str], torch.Tensor] = {}


def mask_on(spec: MaskSpec, device: torch.device | str) -> torch.Tensor:
    """The (L, L) boolean mask of `spec` on `device` (True = attend), cached per device."""
    key = (spec, str(torch.device(device)))
    m = _DEVICE_MASKS.get(key)
    if m is None:
        m = _DEVICE_MASKS[key] = masks.dense_mask(spec, device)
    return m


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MaskSpec) -> torch.Tensor:
    """Reference backend: SDPA with the boolean mask (has a backward on CPU, unlike FlexAttention)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_on(spec, q.device))  # (B, H, L, D)


BACKENDS: dict[str, AttentionFn] = {"dense": _dense}


def register_backend(name: str, fn: AttentionFn) -> None:
    """Add (or replace) a backend. Called by the module that implements it."""
    BACKENDS[name] = fn


def get_backend(name: str) -> AttentionFn:
    """The backend function for `name`; a clear ValueError for unknown or not-yet-available ones.

    "auto" is the Triton kernels on a GPU and the sparse PyTorch path elsewhere.
    """
    if name == "auto":
        name = "triton" if torch.cuda.is_available() and "triton" in BACKENDS else "sparse"
    fn = BACKENDS.get(name)
    if fn is not None:
        return fn
    available = ", ".join(sorted(BACKENDS))
    if name in PLANNED_BACKENDS:
        raise ValueError(f"attention backend {name!r} is not available in this build (its module has "
                         f"not registered it); available backends: {available}")
    raise ValueError(f"unknown attention backend {name!r}; available backends: {available}")


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MaskSpec,
           backend: str = "dense") -> torch.Tensor:
    """Masked attention over the whole sequence. q, k, v: (B, H, L, D) with L == spec.seq_len."""
    fn = get_backend(backend)
    if q.shape[-2] != spec.seq_len or k.shape[-2] != spec.seq_len:
        raise ValueError(f"attend covers the whole sequence: expected length {spec.seq_len} "
                         f"(text {spec.text_len} + image {spec.grid}x{spec.grid}), got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    return fn(q, k, v, spec)  # (B, H, L, D)


def attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_rows: torch.Tensor) -> torch.Tensor:
    """Attention of the newest query rows against (a gather of) the KV cache.

    q: (B, H, Lq, D) the newest positions; k, v: (B, H, Lk, D) the cached keys/values they may read;
    mask_rows: (Lq, Lk) bool, rows of the same dense mask (True = attend). Every row must allow at
    least one key (the diagonal always is). Returns (B, H, Lq, D).
    """
    if mask_rows.shape != (q.shape[-2], k.shape[-2]):
        raise ValueError(f"mask_rows must be (Lq, Lk) = ({q.shape[-2]}, {k.shape[-2]}), "
                         f"got {tuple(mask_rows.shape)}")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_rows)

from dalle_ds import attention_sparse  # noqa: E402,F401  registers "sparse" (and "triton" where Triton can run)
