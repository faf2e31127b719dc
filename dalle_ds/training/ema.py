"""Exponential moving average of weights (iterate averaging), shard-aware under ZeRO-3."""

from __future__ import annotations

from contextlib import contextmanager

import torch


def _local(p: torch.nn.Parameter) -> torch.Tensor:
    # Under ZeRO-3 a parameter's own data is empty and its local shard lives in ds_tensor.
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.shadow = [_local(p).detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(_local(p).float(), 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        for s, saved in zip(self.shadow, state["shadow"]):
            s.copy_(saved)

    @contextmanager
    @torch.no_grad()
    def swapped_in(self):
        """Temporarily put the averaged weights into the live parameters (e.g. to evaluate or export)."""
        backup = [_local(p).detach().clone() for p in self.params]
        for s, p in zip(self.shadow, self.params):
            _local(p).copy_(s)
        try:
            yield
        finally:
            for b, p in zip(backup, self.params):
                _local(p).copy_(b)
