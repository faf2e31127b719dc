"""Every attention pattern of the prior, defined ONCE as a function of (query index, key index).

Positions: a text segment of T slots followed by an image segment of G*G positions in raster order.
All functions take integer tensors of absolute positions (broadcastable) and return a bool tensor,
True = the query may attend to the key (attention-gym's `mask_mod` shape). The dense boolean matrix of
the reference backend, the block layouts of the sparse kernels and the rows read by the KV cache are
all derived from `allowed` below (PAPER §0).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

KINDS = ("row", "column", "conv", "causal")


@dataclass(frozen=True)
class MaskSpec:
    kind: str  # row | column | conv | causal (plain causal over the whole sequence)
    text_len: int  # T
    grid: int  # G: the image is G x G tokens
    kernel: int = 11  # K: the conv window, odd

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"mask kind {self.kind!r} is not one of {KINDS}")
        if self.kind == "conv" and self.kernel % 2 != 1:
            raise ValueError(f"conv kernel must be odd, got {self.kernel}")

    @property
    def seq_len(self) -> int:
        return self.text_len + self.grid * self.grid


def _image_pattern(spec: MaskSpec, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Image query raster index q vs image key raster index k (both relative to the image segment)."""
    g = spec.grid
    d = q - k  # how far back the key is, in raster order
    if spec.kind == "row":  # itself plus the previous G tokens (wraps into the row above)
        return (d >= 0) & (d <= g)
    if spec.kind == "column":  # same column, earlier rows, itself
        return (d >= 0) & (torch.remainder(d, g) == 0)
    if spec.kind == "causal":
        return d >= 0
    # conv: k - q = G*dr + dc with dr in [-(K-1)/2, 0], dc in [-(K-1)/2, (K-1)/2], and k <= q
    r = (spec.kernel - 1) // 2
    off = k - q
    ok = torch.zeros_like(d, dtype=torch.bool)
    for dr in range(-r, 1):  # an offset may be written with several dr when 2r >= G: try each
        dc = off - g * dr
        ok |= (dc >= -r) & (dc <= r)
    return ok & (d >= 0)


def allowed(spec: MaskSpec, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """True where absolute position q_idx may attend to absolute position kv_idx."""
    t = spec.text_len
    q_img, k_img = q_idx >= t, kv_idx >= t
    text_causal = ~q_img & ~k_img & (kv_idx <= q_idx)  # text queries: causal over text only
    img_to_text = q_img & ~k_img  # image queries see every text position
    img_to_img = q_img & k_img & _image_pattern(spec, q_idx - t, kv_idx - t)
    return text_causal | img_to_text | img_to_img


def mask_mod(spec: MaskSpec):
    """attention-gym / FlexAttention style `mask_mod(b, h, q_idx, kv_idx)`."""

    def fn(b, h, q_idx, kv_idx):  # noqa: ARG001 - batch and head do not change the pattern
        return allowed(spec, q_idx, kv_idx)

    return fn


@lru_cache(maxsize=32)
def _dense_cpu(spec: MaskSpec) -> torch.Tensor:
    idx = torch.arange(spec.seq_len)
    return allowed(spec, idx[:, None], idx[None, :])


def dense_mask(spec: MaskSpec, device: torch.device | str | None = None) -> torch.Tensor:
    """The (L, L) boolean matrix, True = may attend (text first, image in raster order)."""
    m = _dense_cpu(spec)
    return m if device is None else m.to(device)


def layer_kinds(n_layers: int) -> list[str]:
    """PAPER §3.5 schedule (1-based i): layer L is conv; else column if (i - 2) % 4 == 0, else row."""
    kinds = []
    for i in range(1, n_layers + 1):
        if i == n_layers:
            kinds.append("conv")
        elif (i - 2) % 4 == 0:
            kinds.append("column")
        else:
            kinds.append("row")
    return kinds


def column_major_perm(text_len: int, grid: int) -> torch.Tensor:
    """Positions reordered so image states are column-major (the paper's transposed column layer).

    perm[j] is the original position placed at j; text positions keep their place.
    """
    img = torch.arange(grid * grid).view(grid, grid).t().reshape(-1) + text_len
    return torch.cat([torch.arange(text_len), img])
