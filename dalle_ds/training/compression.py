"""Compressed gradient exchange between nodes (PAPER §5.3-5.4): PowerSGD and 1-bit sign, both with error feedback.

STATUS: wired under DeepSpeed ZeRO-3 by `training/node_exchange.py` (ZeRO-3 shards within a node, these
compressors between the ranks of different nodes that hold the same shard; `prior_train.compression`).
Tested between gloo processes here (tests/training/test_compression.py) and under real 4-rank (2 nodes x 2)
and 2-rank (2 nodes x 1) DeepSpeed engines (tests/training/test_node_exchange.py).

Interface: `compressor.exchange([(name, grad), ...], group)` returns, for each gradient, the group-mean as
reconstructed from what was sent, and keeps each residual (error feedback) for the next call with the same
name; everything in one call travels in one or two collectives. `allreduce_mean(name, grad, group)` is the
one-tensor form. Every rank of the group gets bit-identical results (node replicas must stay identical):
compressed payloads are all-gathered and summed in rank order in fp32 on every rank.
`bytes_sent` counts the payload bytes this rank put on the wire, in the dtype they travel in (before any
collective's fan-out factor); `bytes_uncompressed` what the same gradients would be in fp32.

PowerSGD (Vogels et al. 2019, as the paper uses it): for a matrix G (a x c) with error buffer E,
M = G + E; P = M Q (a x r); mean P over ranks; orthogonalise P (Householder QR in fp32, after adding
1e-6·I_{a x r}, PAPER §5.4 step 4: Gram-Schmidt was unstable in low precision); Q' = M^T P (c x r);
mean Q'; decompressed = P Q'^T; E = M - decompressed. P and Q' travel in `wire_dtype` (fp16). With
`fixed_q` (the paper's choice) Q is a Gaussian drawn once from a seed shared by every rank and never
updated; otherwise Q' warm-starts the next step. Tensors that are not matrices (gains, biases) and names
in `uncompressed` (embeddings, head) go uncompressed in fp32.

1-bit: M = G + E; send sign(M) packed 8 per byte and the scale mean|M| (fp32); decompressed =
mean over ranks of scale·sign(M); E = M - scale·sign(M).
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist

from dalle_ds.registry import Registry


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


def _group_size(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _mean(t: torch.Tensor, group) -> torch.Tensor:
    """fp32 all-reduce mean (sums of two addends are order-free, and ring all-reduce hands every rank the
    same reduced chunks, so replicas agree)."""
    if _group_size(group) > 1:
        dist.all_reduce(t, group=group)
        t /= _group_size(group)
    return t


def _gathered(t: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's `t` (same shape and dtype), in group-rank order."""
    if _group_size(group) == 1:
        return [t]
    out = [torch.empty_like(t) for _ in range(_group_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def _gather_mean(t: torch.Tensor, group, wire_dtype: torch.dtype) -> torch.Tensor:
    """Mean over ranks of `t` sent in `wire_dtype`, summed in fp32 in rank order: identical on every rank."""
    parts = _gathered(t.to(wire_dtype), group)
    total = torch.zeros(t.shape, dtype=torch.float32, device=t.device)
    for part in parts:
        total += part.float()
    return total / len(parts)


def _split(flat: torch.Tensor, shapes: list[torch.Size]) -> list[torch.Tensor]:
    out, at = [], 0
    for s in shapes:
        n = s.numel()
        out.append(flat[at : at + n].view(s))
        at += n
    return out


class Compressor:
    def __init__(self, *, uncompressed: tuple[str, ...] = ()):
        self.uncompressed = uncompressed
        self.error: dict[str, torch.Tensor] = {}
        self.bytes_sent = 0
        self.bytes_uncompressed = 0

    def compressible(self, name: str, grad: torch.Tensor) -> bool:
        return grad.dim() == 2 and not any(name.startswith(u) for u in self.uncompressed)

    def exchange(self, items: list[tuple[str, torch.Tensor]], group=None) -> list[torch.Tensor]:
        """Group-means of every (name, grad): the uncompressed ones in one fp32 all-reduce, the others in
        the compressor's own collectives."""
        out: list[torch.Tensor | None] = [None] * len(items)
        plain = [i for i, (n, g) in enumerate(items) if not self.compressible(n, g)]
        packed = [i for i in range(len(items)) if i not in set(plain)]
        for _, g in items:
            self.bytes_uncompressed += g.numel() * 4
        if plain:
            flat = torch.cat([items[i][1].float().reshape(-1) for i in plain])
            self.bytes_sent += flat.numel() * 4
            for i, t in zip(plain, _split(_mean(flat, group), [items[i][1].shape for i in plain])):
                out[i] = t.to(items[i][1].dtype)
        if packed:
            for i, t in zip(packed, self._compress([items[i] for i in packed], group)):
                out[i] = t
        return out

    def allreduce_mean(self, name: str, grad: torch.Tensor, group=None) -> torch.Tensor:
        return self.exchange([(name, grad)], group)[0]

    def _with_error(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        e = self.error.get(name)
        return grad.float() + e if e is not None else grad.float().clone()

    def _compress(self, items, group) -> list[torch.Tensor]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {
            "error": {k: v.clone() for k, v in self.error.items()},
            "bytes_sent": self.bytes_sent,
            "bytes_uncompressed": self.bytes_uncompressed,
        }

    def load_state_dict(self, state: dict) -> None:
        self.error = {k: v.clone() for k, v in state["error"].items()}
        self.bytes_sent = int(state.get("bytes_sent", 0))
        self.bytes_uncompressed = int(state.get("bytes_uncompressed", 0))


class Uncompressed(Compressor):
    """Everything in fp32: the same exchange path with nothing compressed (the compressors' reference)."""

    def compressible(self, name: str, grad: torch.Tensor) -> bool:
        return False


class PowerSGD(Compressor):
    def __init__(
        self,
        rank: int,
        *,
        fixed_q: bool = True,
        seed: int = 0,
        wire_dtype: torch.dtype = torch.float16,
        uncompressed: tuple[str, ...] = (),
    ):
        super().__init__(uncompressed=uncompressed)
        if rank < 1:
            raise ValueError(f"PowerSGD rank must be >= 1, got {rank}")
        self.rank, self.fixed_q, self.seed, self.wire_dtype = rank, fixed_q, seed, wire_dtype
        self.wire_bytes = torch.finfo(wire_dtype).bits // 8
        self.q: dict[str, torch.Tensor] = {}

    def _initial_q(self, name: str, c: int, r: int, device) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + zlib.crc32(name.encode()))  # same on every rank
        return torch.randn(c, r, generator=g).to(device)

    def _compress(self, items, group):
        ms, qs = [], []
        for name, grad in items:
            a, c = grad.shape
            r = min(self.rank, a, c)
            ms.append(self._with_error(name, grad))
            if name not in self.q:
                self.q[name] = self._initial_q(name, c, r, grad.device)
            qs.append(self.q[name])
        ps = [m @ q for m, q in zip(ms, qs)]  # (a, r) each
        ps = _split(_gather_mean(torch.cat([p.reshape(-1) for p in ps]), group, self.wire_dtype), [p.shape for p in ps])
        ps = [orthogonalise(p) for p in ps]
        q_new = [m.t() @ p for m, p in zip(ms, ps)]  # (c, r) each
        q_new = _split(
            _gather_mean(torch.cat([q.reshape(-1) for q in q_new]), group, self.wire_dtype), [q.shape for q in q_new]
        )
        outs = []
        for (name, grad), m, p, q in zip(items, ms, ps, q_new):
            self.bytes_sent += (p.numel() + q.numel()) * self.wire_bytes
            out = p @ q.t()  # (a, c)
            self.error[name] = m - out
            if not self.fixed_q:
                self.q[name] = q
            outs.append(out.to(grad.dtype))
        return outs

    def state_dict(self) -> dict:
        return {**super().state_dict(), "q": {k: v.clone() for k, v in self.q.items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.q = {k: v.clone() for k, v in state["q"].items()}


_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_signs(m: torch.Tensor) -> torch.Tensor:
    """1 bit per element (1 = non-negative), 8 per byte."""
    bits = (m.reshape(-1) >= 0).to(torch.uint8)
    bits = torch.nn.functional.pad(bits, (0, (-bits.numel()) % 8)).view(-1, 8)
    return (bits * _BIT_WEIGHTS.to(bits.device)).sum(1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, n: int) -> torch.Tensor:
    """±1.0 (fp32) for the first `n` packed bits."""
    shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(1) >> shifts) & 1
    return bits.reshape(-1)[:n].float() * 2 - 1


class OneBit(Compressor):
    def _compress(self, items, group):
        ms = [self._with_error(name, grad) for name, grad in items]
        flat = torch.cat([m.reshape(-1) for m in ms])
        scales = torch.stack([m.abs().mean() for m in ms])  # (T,) fp32
        lengths = torch.tensor([m.numel() for m in ms], device=flat.device)
        packed = pack_signs(flat)
        self.bytes_sent += packed.numel() + scales.numel() * 4
        total = torch.zeros_like(flat)
        for bits, sc in zip(_gathered(packed, group), _gathered(scales, group)):  # rank order: identical sums
            total += unpack_signs(bits, flat.numel()) * torch.repeat_interleave(sc, lengths)
        mean = total / _group_size(group)
        own = unpack_signs(packed, flat.numel()) * torch.repeat_interleave(scales, lengths)
        outs = []
        for (name, grad), m, local, avg in zip(
            items, ms, _split(own, [m.shape for m in ms]), _split(mean, [m.shape for m in ms])
        ):
            self.error[name] = m - local
            outs.append(avg.to(grad.dtype))
        return outs


def _powersgd(*, rank: int, fixed_q: bool, seed: int) -> Compressor:
    return PowerSGD(rank, fixed_q=fixed_q, seed=seed)


# prior_train.compression -> factory(rank=, fixed_q=, seed=); "none" = plain ZeRO-3 over every rank, no exchange
COMPRESSORS: Registry = Registry("prior_train.compression", "compressor", off="none")
COMPRESSORS.register("fp32", lambda **_: Uncompressed())
COMPRESSORS.register("powersgd", _powersgd)
COMPRESSORS.register("onebit", lambda **_: OneBit())


def make_compressor(kind: str, *, rank: int, fixed_q: bool, seed: int) -> Compressor:
    factory = COMPRESSORS.get(kind)
    if factory is None:
        raise ValueError(f"prior_train.compression={kind!r} exchanges nothing between nodes: no compressor")
    return factory(rank=rank, fixed_q=fixed_q, seed=seed)
