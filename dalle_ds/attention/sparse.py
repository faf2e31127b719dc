"""The `sparse` attention backend: plain PyTorch that computes only the non-empty tiles of the mask.

It reads the block layout of `dalle_ds.attention.layout` (itself derived from `masks.allowed`) and turns it
into a plan of a few large batched matmuls:

  * a *rectangle*: a run of query blocks whose first P key blocks are all full (every image query
    sees every text key). Those scores are one plain `bmm` over contiguous slices: no gather, no mask.
  * *groups*: the remaining tiles of each query block, gathered per query block (keys and values of
    its key blocks side by side) and batched with the other query blocks of the same shape. Within
    a group the full tiles come first and need no mask; an additive 0/-inf bias is added to the
    partial tiles' slice only (plus padding slots when a group merges query blocks of different
    shapes, which a small cost model does when it saves kernel launches).

One softmax spans the rectangle and the group of each row (row max and row sum are combined across
the two), exactly as dense attention. A custom `autograd.Function` keeps the exponentiated scores
and writes the backward by hand: dP = dO V^T, dS = P * (dP - rowsum(dO * O)), dQ = dS K,
dK = dS^T Q, dV = P^T dO, with the 1/rowsum folded into the small (L, D) operands instead of the
score tiles. Keys and values of the gathered groups are scattered back with `index_add_`.

The column layer runs in the paper's transposed (column-major) order, where its pattern is
block-diagonal causal, and the output is permuted back. Half-precision inputs are computed in fp32
and cast back. Works on any device (it is only torch ops); on a GPU the `triton` backend is faster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from dalle_ds.attention import layout as layout_mod
from dalle_ds.attention.layout import FULL, BlockLayout
from dalle_ds.attention.masks import MaskSpec

DEFAULT_BLOCK = 32  # tile size of the CPU path (32 beats 64 at the paper shape: fewer wasted entries)
GROUP_OVERHEAD_TILES = 4.0  # cost model: one extra group costs about as much as this many tiles
BIAS_COST = 0.25  # a biased tile costs this much more than an unbiased one


@dataclass(frozen=True, eq=False)
class Group:
    """Query blocks computed together: nG query blocks, each with W gathered key blocks."""

    q_blocks: torch.Tensor  # (nG,) long
    q_range: tuple[int, int] | None  # (first, last + 1) when q_blocks is a contiguous run
    k_blocks: torch.Tensor  # (nG * W,) long, row-major (query block, slot)
    width: int  # W
    n_plain: int  # slots [0, n_plain) are full tiles for every member: no bias
    bias: torch.Tensor | None  # (nG, bq, (W - n_plain) * bk) additive 0 / -inf, or None


@dataclass(frozen=True, eq=False)
class Plan:
    """How `sparse_attention` computes one layout (cached per layout and device)."""

    layout: BlockLayout
    rect_rows: tuple[int, int] | None  # padded row range [r0, r1) of the rectangle
    rect_keys: int  # it covers keys [0, rect_keys)
    groups: tuple[Group, ...]

    @property
    def n_tiles(self) -> int:
        """Tiles actually computed (including padding slots of merged groups)."""
        lay = self.layout
        n = 0
        if self.rect_rows is not None:
            n += (self.rect_rows[1] - self.rect_rows[0]) // lay.block_q * (self.rect_keys // lay.block_k)
        return n + sum(len(g.q_blocks) * g.width for g in self.groups)


def _rectangle(lay: BlockLayout) -> tuple[int, int, int]:
    """(first qblock, end qblock, P): the largest contiguous run of query blocks whose key blocks
    0..P-1 are all full, maximising run length * P. P = 0 when there is none worth using."""
    full = lay.block_kind == FULL  # (NQ, NK)
    prefix = full.int().cumprod(dim=1).sum(dim=1)  # leading full key blocks per query block
    best = (0, 0, 0)
    for p in sorted(set(prefix.tolist())):
        if p == 0:
            continue
        ok = (prefix >= p).tolist()
        start = None
        for i, flag in enumerate(ok + [False]):
            if flag and start is None:
                start = i
            elif not flag and start is not None:
                if (i - start) * p > (best[1] - best[0]) * best[2]:
                    best = (start, i, p)
                start = None
    if (best[1] - best[0]) < 2:  # a one-block rectangle saves nothing over a group
        return 0, 0, 0
    return best


def _partition(widths: list[int], counts: list[int], plains: list[int]) -> list[tuple[int, int]]:
    """Split signatures (sorted by width) into contiguous runs minimising the cost model (a tiny DP)."""
    n = len(widths)
    best = [0.0] + [math.inf] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            W = max(widths[i:j])
            P = min(plains[i:j])
            nG = sum(counts[i:j])
            biased = W - P
            cost = GROUP_OVERHEAD_TILES + nG * W + BIAS_COST * nG * biased
            if best[i] + cost < best[j]:
                best[j], cut[j] = best[i] + cost, i
    runs, j = [], n
    while j > 0:
        runs.append((cut[j], j))
        j = cut[j]
    return runs[::-1]


def build_plan(lay: BlockLayout, merge: bool = True) -> Plan:
    """Turn a layout into a rectangle plus groups (see the module docstring)."""
    bq, bk, nq = lay.block_q, lay.block_k, lay.n_q_blocks
    L = lay.seq_len
    r0, r1, P = _rectangle(lay)
    # per query block: the tiles left after the rectangle, as (full list, partial list with mask ids)
    rest = []
    for qb in range(nq):
        cnt, nf = int(lay.kv_count[qb]), int(lay.kv_full[qb])
        idx = lay.kv_index[qb, :cnt].tolist()
        mid = lay.kv_mask_id[qb, :cnt].tolist()
        skip = P if r0 <= qb < r1 else 0  # the rectangle's key blocks are the first P full ones
        full = idx[skip:nf]
        part = list(zip(idx[nf:], mid[nf:]))
        if full or part:
            rest.append((qb, full, part))
    # signatures (n_full, n_partial) -> query blocks
    sig: dict[tuple[int, int], list] = {}
    for item in rest:
        sig.setdefault((len(item[1]), len(item[2])), []).append(item)
    keys = sorted(sig, key=lambda s: (s[0] + s[1], -s[0]))
    widths = [f + p for f, p in keys]
    plains = [f for f, _ in keys]  # leading full slots: no bias needed there
    counts = [len(sig[s]) for s in keys]
    runs = _partition(widths, counts, plains) if merge else [(i, i + 1) for i in range(len(keys))]

    groups = []
    for i, j in runs:
        members = [item for s in keys[i:j] for item in sig[s]]
        members.sort(key=lambda it: it[0])
        W = max(widths[i:j])
        n_plain = min(plains[i:j])
        nG = len(members)
        k_blocks = torch.zeros(nG, W, dtype=torch.long)
        biased = W - n_plain
        need_bias = biased > 0
        allow = torch.ones(nG, bq, biased, bk, dtype=torch.bool) if need_bias else None
        for g, (qb, full, part) in enumerate(members):
            slots = full + [kb for kb, _ in part]
            pad = W - len(slots)
            k_blocks[g, : len(slots)] = torch.tensor(slots, dtype=torch.long)
            if pad:
                k_blocks[g, len(slots) :] = slots[0]  # any real block; masked out below
            if need_bias:
                for s, (kb, m) in enumerate(part):
                    allow[g, :, len(full) + s - n_plain] = lay.tile_masks[m]
                if pad:
                    allow[g, :, len(slots) - n_plain :] = False
                pad_rows = torch.arange(qb * bq, (qb + 1) * bq) >= L  # "don't care" rows: keep finite
                allow[g, pad_rows] = True
        bias = None
        if need_bias:
            bias = torch.zeros(nG, bq, biased * bk)
            bias.masked_fill_(~allow.view(nG, bq, biased * bk), float("-inf"))
        qbs = torch.tensor([m[0] for m in members], dtype=torch.long)
        contiguous = bool((qbs[1:] - qbs[:-1] == 1).all()) if nG > 1 else True
        q_range = (int(qbs[0]), int(qbs[-1]) + 1) if contiguous else None
        groups.append(
            Group(q_blocks=qbs, q_range=q_range, k_blocks=k_blocks.flatten(), width=W, n_plain=n_plain, bias=bias)
        )
    rect_rows = (r0 * bq, r1 * bq) if P else None
    return Plan(layout=lay, rect_rows=rect_rows, rect_keys=P * bk, groups=tuple(groups))


def _plan_to(plan: Plan, device: torch.device) -> Plan:
    if device.type == "cpu":
        return plan
    groups = tuple(
        Group(
            q_blocks=g.q_blocks.to(device),
            q_range=g.q_range,
            k_blocks=g.k_blocks.to(device),
            width=g.width,
            n_plain=g.n_plain,
            bias=None if g.bias is None else g.bias.to(device),
        )
        for g in plan.groups
    )
    lay = plan.layout.to(device)
    return Plan(layout=lay, rect_rows=plan.rect_rows, rect_keys=plan.rect_keys, groups=groups)


@lru_cache(maxsize=64)
def _cpu_plan(spec: MaskSpec, block: int, permuted: bool) -> Plan:
    return build_plan(layout_mod.block_layout(spec, block, permuted=permuted))


_PLANS: dict[tuple, Plan] = {}


def get_plan(
    spec: MaskSpec, device: torch.device | str, block: int = DEFAULT_BLOCK, permuted: bool | None = None
) -> Plan:
    """The cached plan of `spec` on `device` (permuted defaults to True for the column layer)."""
    permuted = layout_mod.default_permuted(spec) if permuted is None else permuted
    device = torch.device(device)
    key = (spec, block, permuted, str(device))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _plan_to(_cpu_plan(spec, block, permuted), device)
    return plan


# ----------------------------------------------------------------------------------------------
# The autograd function. Shapes: X = B * H flattened, Lp = NQ * bq padded rows, D head size.


def _blocks(t: torch.Tensor, n: int, b: int) -> torch.Tensor:
    return t.view(t.shape[0], n, b, t.shape[-1])  # (X, N, b, D)


def _gather(t: torch.Tensor, n: int, b: int, g: Group) -> torch.Tensor:
    """Rows of the group's key blocks side by side: (X, nG, W*b, D)."""
    X, D = t.shape[0], t.shape[-1]
    return _blocks(t, n, b).index_select(1, g.k_blocks).view(X, len(g.q_blocks), g.width * b, D)


def _rows(t: torch.Tensor, n: int, b: int, g: Group) -> torch.Tensor:
    """The group's query rows: (X, nG, b, ...)."""
    tb = t.view(t.shape[0], n, b, *t.shape[2:])
    if g.q_range is not None:
        return tb[:, g.q_range[0] : g.q_range[1]]
    return tb.index_select(1, g.q_blocks)


def _add_rows(dst: torch.Tensor, n: int, b: int, g: Group, src: torch.Tensor) -> None:
    db = dst.view(dst.shape[0], n, b, *dst.shape[2:])
    if g.q_range is not None:
        db[:, g.q_range[0] : g.q_range[1]] += src
    else:
        db.index_add_(1, g.q_blocks, src)


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: Plan, scale: float):  # q, k, v: (X, Lp, D) / (X, Lkp, D)
        lay = plan.layout
        bq, bk, nq, nk = lay.block_q, lay.block_k, lay.n_q_blocks, lay.n_k_blocks
        X, Lp, D = q.shape
        qs = q * scale
        m = torch.full((X, Lp), float("-inf"), dtype=q.dtype, device=q.device)  # row max
        s_rect, s_groups = None, []
        if plan.rect_rows is not None:
            r0, r1 = plan.rect_rows
            s_rect = torch.bmm(qs[:, r0:r1], k[:, : plan.rect_keys].transpose(1, 2))  # (X, R, Kr)
            m[:, r0:r1] = s_rect.amax(dim=-1)
        kv_groups = []
        for g in plan.groups:
            kg, vg = _gather(k, nk, bk, g), _gather(v, nk, bk, g)  # (X, nG, W*bk, D)
            kv_groups.append((kg, vg))
            s = torch.matmul(_rows(qs, nq, bq, g), kg.transpose(-1, -2))  # (X, nG, bq, W*bk)
            if g.bias is not None:
                s[..., g.n_plain * bk :] += g.bias
            mg = s.amax(dim=-1)  # (X, nG, bq)
            cur = _rows(m, nq, bq, g)
            if g.q_range is not None:
                torch.maximum(cur, mg, out=cur)
            else:
                m.view(X, nq, bq).index_copy_(1, g.q_blocks, torch.maximum(cur, mg))
            s_groups.append(s)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # a row with no key at all -> output 0
        out = torch.zeros_like(q)
        lsum = torch.zeros_like(m)
        if s_rect is not None:
            e_rect = s_rect.sub_(m[:, r0:r1, None]).exp_()  # in place: E = exp(S - m)
            lsum[:, r0:r1] += e_rect.sum(dim=-1)
            out[:, r0:r1] = torch.bmm(e_rect, v[:, : plan.rect_keys])
        for g, s, (_, vg) in zip(plan.groups, s_groups, kv_groups):
            e = s.sub_(_rows(m, nq, bq, g)[..., None]).exp_()
            _add_rows(lsum, nq, bq, g, e.sum(dim=-1))
            _add_rows(out, nq, bq, g, torch.matmul(e, vg))
        rinv = torch.where(lsum > 0, 1.0 / lsum, torch.zeros_like(lsum))
        out.mul_(rinv[..., None])
        # exp-scores and gathered keys/values are kept for the backward (saved, so that saved-tensor
        # hooks such as activation checkpointing see them); the rectangle's E only when there is one
        ctx.save_for_backward(
            qs, k, v, out, rinv, *([] if s_rect is None else [s_rect]), *s_groups, *(t for kv in kv_groups for t in kv)
        )
        ctx.plan, ctx.scale = plan, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        plan, scale = ctx.plan, ctx.scale
        qs, k, v, out, rinv, *rest = ctx.saved_tensors
        e_rect = rest.pop(0) if plan.rect_rows is not None else None
        n = len(plan.groups)
        e_groups, kv_groups = rest[:n], list(zip(rest[n::2], rest[n + 1 :: 2]))
        lay = plan.layout
        bq, bk, nq, nk = lay.block_q, lay.block_k, lay.n_q_blocks, lay.n_k_blocks
        X = qs.shape[0]
        don = dout.contiguous() * rinv[..., None]  # dO / l
        deltan = (don * out).sum(dim=-1)  # rowsum(dO * O) / l
        dq, dk, dv = torch.zeros_like(qs), torch.zeros_like(k), torch.zeros_like(v)
        if plan.rect_rows is not None:
            r0, r1 = plan.rect_rows
            kr = plan.rect_keys
            e = e_rect
            ds = torch.bmm(don[:, r0:r1], v[:, :kr].transpose(1, 2))  # dP / l
            ds.sub_(deltan[:, r0:r1, None]).mul_(e)  # dS
            dq[:, r0:r1] = torch.bmm(ds, k[:, :kr])
            dk[:, :kr] += torch.bmm(ds.transpose(1, 2), qs[:, r0:r1])
            dv[:, :kr] += torch.bmm(e.transpose(1, 2), don[:, r0:r1])
        for g, e, (kg, vg) in zip(plan.groups, e_groups, kv_groups):
            nG = len(g.q_blocks)
            dog = _rows(don, nq, bq, g)  # (X, nG, bq, D)
            ds = torch.matmul(dog, vg.transpose(-1, -2))
            ds.sub_(_rows(deltan, nq, bq, g)[..., None]).mul_(e)
            _add_rows(dq, nq, bq, g, torch.matmul(ds, kg))
            dkg = torch.matmul(ds.transpose(-1, -2), _rows(qs, nq, bq, g))  # (X, nG, W*bk, D)
            dvg = torch.matmul(e.transpose(-1, -2), dog)
            _blocks(dk, nk, bk).index_add_(1, g.k_blocks, dkg.view(X, nG * g.width, bk, -1))
            _blocks(dv, nk, bk).index_add_(1, g.k_blocks, dvg.view(X, nG * g.width, bk, -1))
        dq.mul_(scale)
        return dq, dk, dv, None, None


def block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, scale: float | None = None
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v over the plan's non-empty tiles; q, k, v (B, H, L, D) in the
    plan's order (permute first for a permuted layout). Returns (B, H, L, D) in q's dtype."""
    lay = plan.layout
    B, H, L, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    dtype = q.dtype
    cdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    pq, pk = lay.n_q_blocks * lay.block_q - L, lay.n_k_blocks * lay.block_k - L
    q, k, v = (t.to(cdt).reshape(B * H, L, D) for t in (q, k, v))
    if pq:
        q = F.pad(q, (0, 0, 0, pq))
    if pk:
        k, v = F.pad(k, (0, 0, 0, pk)), F.pad(v, (0, 0, 0, pk))
    out = _BlockSparseAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), plan, scale)
    return out[:, :L].reshape(B, H, L, D).to(dtype)


def sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MaskSpec, block: int = DEFAULT_BLOCK
) -> torch.Tensor:
    """The `sparse` backend: q, k, v (B, H, L, D) in the model's order -> (B, H, L, D)."""
    plan = get_plan(spec, q.device, block)
    return layout_mod.run_in_layout_order(plan.layout, lambda a, b, c: block_sparse_attention(a, b, c, plan), q, k, v)
