"""Compressed gradient exchange between nodes (PAPER §5.3-5.4): PowerSGD and 1-bit sign, both with error feedback.

STATUS: the compressors, their checkpointable state and byte accounting are here and tested with real
gloo collectives between processes (tests/training/test_compression.py). They are NOT yet wired under a
DeepSpeed ZeRO-3 engine (ZeRO-3 inside a node, these compressors between nodes); see the issue.

Interface: `compressor.allreduce_mean(name, grad, group)` returns the group-mean of `grad` as reconstructed
from what was sent, and keeps the residual (error feedback) for the next call with the same name.
`bytes_sent` counts payload bytes each rank put on the wire (before the ring factor 2(M-1)/M).

PowerSGD (Vogels et al. 2019, as the paper uses it): for a matrix G (a x c) with error buffer E,
M = G + E; P = M Q (a x r); all-reduce P; orthogonalise P (Householder QR in fp32, after adding
1e-6·I_{a x r}, PAPER §5.4 step 4: Gram-Schmidt was unstable in low precision); Q' = M^T P (c x r);
all-reduce Q'; decompressed = P Q'^T; E = M - decompressed. With `fixed_q` (the paper's choice) Q is a
Gaussian drawn once from a seed shared by every rank and never updated; otherwise Q' warm-starts the next
step. Tensors that are not matrices (gains, biases) and names in `uncompressed` (embeddings, head) go
uncompressed in fp32.

1-bit: M = G + E; send sign(M) (1 bit per element) and the scale mean|M| (fp32); decompressed =
scale·sign(M) averaged over ranks; E = M - scale·sign(M).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def orthogonalise(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Orthonormal columns spanning P (a x r): Householder QR in fp32 of P + eps·I (zero-padded).
    Stable for rank-deficient or 16-bit inputs (no division by a vanishing norm as in Gram-Schmidt)."""
    a, r = p.shape
    x = p.float() + eps * torch.eye(a, r, device=p.device)
    q, rr = torch.linalg.qr(x, mode="reduced")
    # fix signs so the result is a deterministic function of P
    signs = torch.sign(torch.diagonal(rr))
    signs[signs == 0] = 1
    return q * signs


def _mean(t: torch.Tensor, group) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
        t /= dist.get_world_size(group)
    return t


class Compressor:
    def __init__(self, *, uncompressed: tuple[str, ...] = ()):
        self.uncompressed = uncompressed
        self.error: dict[str, torch.Tensor] = {}
        self.bytes_sent = 0
        self.bytes_uncompressed = 0

    def compressible(self, name: str, grad: torch.Tensor) -> bool:
        return grad.dim() == 2 and not any(name.startswith(u) for u in self.uncompressed)

    def allreduce_mean(self, name: str, grad: torch.Tensor, group=None) -> torch.Tensor:
        self.bytes_uncompressed += grad.numel() * 4
        if not self.compressible(name, grad):
            self.bytes_sent += grad.numel() * 4
            return _mean(grad.float().clone(), group).to(grad.dtype)
        return self._compress(name, grad, group)

    def _compress(self, name, grad, group):
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"error": {k: v.clone() for k, v in self.error.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.error = {k: v.clone() for k, v in state["error"].items()}


class PowerSGD(Compressor):
    def __init__(self, rank: int, *, fixed_q: bool = True, seed: int = 0, wire_bytes: int = 2,
                 uncompressed: tuple[str, ...] = ()):
        super().__init__(uncompressed=uncompressed)
        self.rank, self.fixed_q, self.seed, self.wire_bytes = rank, fixed_q, seed, wire_bytes
        self.q: dict[str, torch.Tensor] = {}

    def _initial_q(self, name: str, c: int, r: int, device) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + sum(map(ord, name)) * 7919)  # same on every rank
        return torch.randn(c, r, generator=g).to(device)

    def _compress(self, name, grad, group):
        a, c = grad.shape
        r = min(self.rank, a, c)
        m = grad.float() + self.error.get(name, torch.zeros(a, c, device=grad.device))
        q = self.q.get(name)
        if q is None:
            q = self.q[name] = self._initial_q(name, c, r, grad.device)
        p = _mean(m @ q, group)                 # (a, r)
        p = orthogonalise(p)
        q_new = _mean(m.t() @ p, group)         # (c, r)
        self.bytes_sent += (a + c) * r * self.wire_bytes
        out = p @ q_new.t()                      # (a, c)
        self.error[name] = m - out
        if not self.fixed_q:
            self.q[name] = q_new
        return out.to(grad.dtype)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "q": {k: v.clone() for k, v in self.q.items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.q = {k: v.clone() for k, v in state["q"].items()}


class OneBit(Compressor):
    def _compress(self, name, grad, group):
        m = grad.float() + self.error.get(name, torch.zeros_like(grad, dtype=torch.float32))
        scale = m.abs().mean()
        local = torch.where(m >= 0, scale, -scale)
        self.error[name] = m - local
        self.bytes_sent += (grad.numel() + 7) // 8 + 4
        return _mean(local.clone(), group).to(grad.dtype)  # a 1-bit wire format carries sign + scale exactly
