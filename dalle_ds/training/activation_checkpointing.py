"""Activation checkpointing of the prior's resblocks, applied from outside the model (PAPER §4.1).

Every Nth layer (both its resblocks) keeps only its input in forward and recomputes its internals in
backward, trading one extra forward of those layers for their activation memory. Uses PyTorch's
non-reentrant checkpoint, which works with ZeRO-3 parameter gathering (parameters are re-fetched by
ZeRO's module hooks during recomputation) and with the per-resblock gradient-scaling hooks. Sampling
(KV cache) and no-grad passes bypass it.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _wrap(layer: torch.nn.Module):
    inner = layer.forward

    def forward(x, kv=None):
        if kv is not None or not torch.is_grad_enabled():
            return inner(x, kv)
        return checkpoint(inner, x, use_reentrant=False)

    forward.__wrapped_inner__ = inner
    return forward


def apply(model: torch.nn.Module, every: int) -> list[int]:
    """Checkpoint layers 0, every, 2*every, ... of `model.blocks` (every=1: all). Returns their indices."""
    if every <= 0:
        return []
    done = []
    for i, layer in enumerate(model.blocks):
        if i % every == 0 and not hasattr(layer.forward, "__wrapped_inner__"):
            layer.forward = _wrap(layer)
            done.append(i)
    return done


def remove(model: torch.nn.Module) -> None:
    for layer in model.blocks:
        if hasattr(layer.forward, "__wrapped_inner__"):
            del layer.forward  # back to the class's forward
