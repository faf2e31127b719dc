"""Plain-PyTorch masked attention: the reference every attention kernel is compared with."""

from __future__ import annotations

import math

import torch


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """softmax(q kᵀ / √D, masked) v computed in `dtype`; q, k, v (B, H, L, D); mask (Lq, Lk) bool, True = attend.

    Rows with no allowed key return zeros (never happens for the prior's masks: every query sees itself).
    """
    qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
    scores = qd @ kd.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, Lq, Lk)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (probs @ vd).to(q.dtype)  # (B, H, Lq, D)
