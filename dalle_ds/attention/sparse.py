"""The `sparse` attention backend: plain PyTorch that computes only the non-empty tiles of the mask.

It reads the block layout of `dalle_ds.attention.layout` (itself derived from `masks.allowed`) and splits the
keys of every query row into at most two *pieces*, each one fused attention call:

  * the *rectangle*: a run of query blocks whose first P key blocks are all full (every image query sees
    every text key). Contiguous slices of Q, K, V, no mask: one dense attention call.
  * *groups*: the remaining tiles of each query block. Query blocks of the same shape are batched: the
    keys and values of a member's key blocks are laid side by side (a gather, or an overlapping strided
    view when the members read a sliding window of blocks, as the conv and transposed column layers do)
    and an additive 0/-inf mask covers the partial tiles and the padding slots of merged groups (a small
    cost model merges query blocks of different shapes when that saves calls).

A piece returns its output and the log-sum-exp of its scores; a row covered by both pieces combines them
(out = sum_p out_p * exp(lse_p - lse), lse = logaddexp over pieces), which is exact. The backward gives
each piece the combined output and log-sum-exp, so each piece's gradient is its part of the full softmax's
(dS = P * (dP - rowsum(dO * O)) with P = exp(S - lse)); dK and dV of gathered blocks are scattered back
with `index_add_`. Only q, k, v, the output and the log-sum-exp are kept for the backward.

On the CPU a piece is PyTorch's fused flash-attention kernel (the forward and backward that
`scaled_dot_product_attention` runs, called through the aten ops that return and take the log-sum-exp):
scores stay in cache, where a chain of bmm / softmax / cat over (rows, keys) tensors streams them through
memory several times. Elsewhere (a V100 without Triton) a piece is the same math in plain matmuls.

Tiles are 32 x 32 for the row and column layers; conv and causal rows read wider windows, where 64-row
query blocks give the fused kernel bigger matmuls for a few more masked entries (`default_blocks`).

The column layer runs in the paper's transposed (column-major) order, where its pattern is
block-diagonal causal, and the output is permuted back. Half-precision inputs are computed in fp32
and cast back.
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

DEFAULT_BLOCK = 32  # tile size of the row and column layers (32 beats 64 there: fewer wasted entries)
# (query block, key block) per mask kind where 32 x 32 is not the fastest (paper shape, CPU, see default_blocks)
WIDE_BLOCKS = {"conv": (64, 32), "causal": (64, 32)}
GROUP_OVERHEAD_TILES = 4.0  # cost model: one extra group costs about as much as this many tiles
MASK_COST = 0.25  # a masked tile costs this much more than a full one


@dataclass(frozen=True, eq=False)
class Group:
    """Query blocks computed together: nG query blocks, each with W key blocks side by side."""

    q_blocks: torch.Tensor  # (nG,) long
    q_range: tuple[int, int] | None  # (first, last + 1) when q_blocks is a contiguous run
    k_blocks: torch.Tensor  # (nG * W,) long, row-major (query block, slot), each member's blocks ascending
    width: int  # W
    mask: torch.Tensor | None  # (1, nG, bq, W * bk) additive 0 / -inf, None when every tile is full
    empty_rows: torch.Tensor | None  # (nG, bq) bool: rows with no allowed key here (their lse is -inf)
    slide: tuple[int, int] | None  # (first, step): member i reads blocks first + i * step + [0, W), else None


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


def default_blocks(spec: MaskSpec) -> tuple[int, int]:
    """(block_q, block_k) of the CPU path for `spec`. Conv rows see 7 key blocks of 32 beside the text, causal
    rows many: 64-row query blocks cost ~5% more masked entries there but fwd+bwd ran ~8% (conv) and ~20%
    (causal) faster (paper shape, 1 thread, CPU time); the row and column layers read 1-2 blocks, where 32-row
    blocks were 5% faster."""
    return WIDE_BLOCKS.get(spec.kind, (DEFAULT_BLOCK, DEFAULT_BLOCK))


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
            cost = GROUP_OVERHEAD_TILES + nG * W + MASK_COST * nG * (W - P)
            if best[i] + cost < best[j]:
                best[j], cut[j] = best[i] + cost, i
    runs, j = [], n
    while j > 0:
        runs.append((cut[j], j))
        j = cut[j]
    return runs[::-1]


def _window(members: list, W: int, n_blocks: int) -> list[int] | None:
    """Start block of each member's W-block window when the windows slide (start_i = start_0 + i * step) and
    each holds that member's blocks, aligned to end at its last block or to begin at its first; else None.
    A sliding window is read as an overlapping view of K / V instead of a gather."""
    for align in ("end", "start"):
        starts = [
            (max(f + [kb for kb, _ in p]) - W + 1) if align == "end" else min(f + [kb for kb, _ in p])
            for _, f, p in members
        ]
        step = starts[1] - starts[0] if len(starts) > 1 else 0
        if (
            step >= 0
            and all(b - a == step for a, b in zip(starts, starts[1:]))
            and starts[0] >= 0
            and starts[-1] + W <= n_blocks
            and all(st <= kb < st + W for st, (_, f, p) in zip(starts, members) for kb in f + [kb for kb, _ in p])
        ):
            return starts
    return None


def _split_off_window(members: list, n_blocks: int) -> list[list]:
    """members as one group, or as [before, longest sliding run, after] when the whole does not slide but a
    run of at least half of them does (groups of 8 or more) (a view instead of a gather for most of the work)."""
    W = max(len(f) + len(p) for _, f, p in members)
    n = len(members)
    if n < 8 or _window(members, W, n_blocks) is not None:  # small groups: the gather is cheap
        return [members]
    best = (0, 0)
    for i in range(n):
        for j in range(n, i + best[1] - best[0], -1):  # longest first
            if _window(members[i:j], W, n_blocks) is not None:
                best = (i, j)
                break
    if 2 * (best[1] - best[0]) < n:
        return [members]
    return [part for part in (members[: best[0]], members[best[0] : best[1]], members[best[1] :]) if part]


def _make_group(lay: BlockLayout, members: list) -> Group:
    """One group from its members (qb, full key blocks, [(partial key block, mask id)]), sorted by qb."""
    bq, bk, L = lay.block_q, lay.block_k, lay.seq_len
    W = max(len(f) + len(p) for _, f, p in members)
    nG = len(members)
    starts = _window(members, W, lay.n_k_blocks)
    k_blocks = torch.zeros(nG, W, dtype=torch.long)
    allow = torch.zeros(nG, bq, W, bk, dtype=torch.bool)
    for g, (qb, full, part) in enumerate(members):
        tiles = dict.fromkeys(full, None) | dict(part)  # key block -> partial mask id (None: full)
        slots = list(range(starts[g], starts[g] + W)) if starts else sorted(tiles)
        slots += [slots[-1]] * (W - len(slots))  # padding slots: any real block, masked out
        k_blocks[g] = torch.tensor(slots, dtype=torch.long)
        for s, kb in enumerate(slots):
            if kb in tiles:  # a window block the member does not read, or a repeat, stays masked
                m = tiles.pop(kb)
                allow[g, :, s] = True if m is None else lay.tile_masks[m]
        allow[g, torch.arange(qb * bq, (qb + 1) * bq) >= L] = True  # "don't care" rows: keep finite
    mask = empty = None
    if not bool(allow.all()):
        mask = torch.zeros(1, nG, bq, W * bk)
        mask.masked_fill_(~allow.view(1, nG, bq, W * bk), float("-inf"))
        empty = ~allow.view(nG, bq, W * bk).any(dim=-1)
        empty = empty if bool(empty.any()) else None
    qbs = torch.tensor([m[0] for m in members], dtype=torch.long)
    contiguous = bool((qbs[1:] - qbs[:-1] == 1).all()) if nG > 1 else True
    return Group(
        q_blocks=qbs,
        q_range=(int(qbs[0]), int(qbs[-1]) + 1) if contiguous else None,
        k_blocks=k_blocks.flatten(),
        width=W,
        mask=mask,
        empty_rows=empty,
        slide=(starts[0], starts[1] - starts[0] if nG > 1 else 0) if starts else None,
    )


def build_plan(lay: BlockLayout, merge: bool = True) -> Plan:
    """Turn a layout into a rectangle plus groups (see the module docstring)."""
    r0, r1, P = _rectangle(lay)
    # per query block: the tiles left after the rectangle, as (full list, partial list with mask ids)
    sig: dict[tuple[int, int], list] = {}  # (n_full, n_partial) -> members
    for qb in range(lay.n_q_blocks):
        cnt, nf = int(lay.kv_count[qb]), int(lay.kv_full[qb])
        idx = lay.kv_index[qb, :cnt].tolist()
        mid = lay.kv_mask_id[qb, :cnt].tolist()
        skip = P if r0 <= qb < r1 else 0  # the rectangle's key blocks are the first P full ones
        full, part = idx[skip:nf], list(zip(idx[nf:], mid[nf:]))
        if full or part:
            sig.setdefault((len(full), len(part)), []).append((qb, full, part))
    keys = sorted(sig, key=lambda s: (s[0] + s[1], -s[0]))
    widths = [f + p for f, p in keys]
    plains = [f for f, _ in keys]  # full tiles need no mask
    counts = [len(sig[s]) for s in keys]
    runs = _partition(widths, counts, plains) if merge else [(i, i + 1) for i in range(len(keys))]
    groups = []
    for i, j in runs:
        members = sorted((m for s in keys[i:j] for m in sig[s]), key=lambda m: m[0])
        groups.extend(_make_group(lay, part) for part in _split_off_window(members, lay.n_k_blocks))
    rect_rows = (r0 * lay.block_q, r1 * lay.block_q) if P else None
    return Plan(layout=lay, rect_rows=rect_rows, rect_keys=P * lay.block_k, groups=tuple(groups))


def _plan_to(plan: Plan, device: torch.device) -> Plan:
    if device.type == "cpu":
        return plan
    groups = tuple(
        Group(
            q_blocks=g.q_blocks.to(device),
            q_range=g.q_range,
            k_blocks=g.k_blocks.to(device),
            width=g.width,
            mask=None if g.mask is None else g.mask.to(device),
            empty_rows=None if g.empty_rows is None else g.empty_rows.to(device),
            slide=g.slide,
        )
        for g in plan.groups
    )
    lay = plan.layout.to(device)
    return Plan(layout=lay, rect_rows=plan.rect_rows, rect_keys=plan.rect_keys, groups=groups)


@lru_cache(maxsize=64)
def _cpu_plan(spec: MaskSpec, block_q: int, block_k: int, permuted: bool) -> Plan:
    return build_plan(layout_mod.block_layout(spec, block_q, block_k, permuted=permuted))


_PLANS: dict[tuple, Plan] = {}


def get_plan(
    spec: MaskSpec, device: torch.device | str, block: int | None = None, permuted: bool | None = None
) -> Plan:
    """The cached plan of `spec` on `device`: block x block tiles, or `default_blocks(spec)` when block is None
    (permuted defaults to True for the column layer)."""
    permuted = layout_mod.default_permuted(spec) if permuted is None else permuted
    bq, bk = default_blocks(spec) if block is None else (block, block)
    device = torch.device(device)
    key = (spec, bq, bk, permuted, str(device))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _plan_to(_cpu_plan(spec, bq, bk, permuted), device)
    return plan


# ----------------------------------------------------------------------------------------------
# One piece: attention of q (X, N, M, D) over k, v (X, N, S, D) with an additive mask (1, N, M, S) or None,
# returning the output and the log-sum-exp of the scaled, masked scores (X, N, M); and its backward given
# the combined output and log-sum-exp of every piece of those rows.


def _math_piece(q, k, v, mask, scale):
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    if mask is not None:
        s = s.add_(mask)
    lse = torch.logsumexp(s, dim=-1)
    p = s.sub_(torch.where(torch.isinf(lse), 0.0, lse)[..., None]).exp_()  # a row with no key: p = 0
    return torch.matmul(p, v), lse


def _math_piece_backward(dout, q, k, v, out, lse, mask, scale):
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    if mask is not None:
        s = s.add_(mask)
    p = s.sub_(lse[..., None]).exp_()  # P of the whole softmax (lse of all pieces)
    ds = torch.matmul(dout, v.transpose(-1, -2)).sub_((dout * out).sum(dim=-1, keepdim=True)).mul_(p)
    dq = torch.matmul(ds, k).mul_(scale)
    dk = torch.matmul(ds.transpose(-1, -2), q).mul_(scale)
    return dq, dk, torch.matmul(p.transpose(-1, -2), dout)


def _flash_piece(q, k, v, mask, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask, scale=scale)


def _flash_piece_backward(dout, q, k, v, out, lse, mask, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, False, attn_mask=mask, scale=scale
    )


def _pieces(device: torch.device, fused: bool | None):
    """(forward, backward) of a piece: the fused CPU kernel on the CPU (fused=None), else plain matmuls."""
    fused = device.type == "cpu" if fused is None else fused
    return (_flash_piece, _flash_piece_backward) if fused else (_math_piece, _math_piece_backward)


# ----------------------------------------------------------------------------------------------
# The autograd function. Shapes: X = B * H flattened, Lp = NQ * bq padded rows, D head size.


def _blocks(t: torch.Tensor, n: int, b: int) -> torch.Tensor:
    return t.view(t.shape[0], n, b, t.shape[-1])  # (X, N, b, D)


def _gather(t: torch.Tensor, n: int, b: int, g: Group) -> torch.Tensor:
    """Rows of the group's key blocks side by side: (X, nG, W*b, D); a view (no copy) for a sliding window."""
    X, D = t.shape[0], t.shape[-1]
    if g.slide is not None:  # t is contiguous (X, n*b, D): member i starts at block first + i*step
        first, step = g.slide
        return t.as_strided((X, len(g.q_blocks), g.width * b, D), (t.stride(0), step * b * D, D, 1), first * b * D)
    return _blocks(t, n, b).index_select(1, g.k_blocks).view(X, len(g.q_blocks), g.width * b, D)


def _rows(t: torch.Tensor, n: int, b: int, g: Group) -> torch.Tensor:
    """The group's query rows: (X, nG, b, ...)."""
    tb = t.view(t.shape[0], n, b, *t.shape[2:])
    if g.q_range is not None:
        return tb[:, g.q_range[0] : g.q_range[1]]
    return tb.index_select(1, g.q_blocks)


def _put_rows(dst: torch.Tensor, n: int, b: int, g: Group, src: torch.Tensor, add: bool) -> None:
    db = dst.view(dst.shape[0], n, b, *dst.shape[2:])
    if g.q_range is not None:
        rows = db[:, g.q_range[0] : g.q_range[1]]
        if add:
            rows.add_(src)
        else:
            rows.copy_(src)
    elif add:
        db.index_add_(1, g.q_blocks, src)
    else:
        db.index_copy_(1, g.q_blocks, src)


def _scatter_add_blocks(dst: torch.Tensor, n: int, b: int, g: Group, src: torch.Tensor) -> None:
    """dst's key blocks += the group's gradient src (X, nG, W*b, D), slot by slot: src is read through views
    (the fused kernel returns it transposed in memory, where flattening (nG, W) would copy it), and a window
    sliding by step > 0 puts one slot's blocks on an evenly strided slice of dst (no index; with step 0
    every member reads the same blocks, which index_add_ sums)."""
    nG, W = len(g.q_blocks), g.width
    blocks, parts = _blocks(dst, n, b), src.unflatten(2, (W, b))  # (X, n, b, D), (X, nG, W, b, D)
    slots = g.k_blocks.view(nG, W)
    first, step = g.slide if g.slide is not None else (0, 0)
    for w in range(W):
        if step > 0:  # a sliding window: member i's slot w is block first + w + i * step
            blocks[:, first + w : first + w + (nG - 1) * step + 1 : step].add_(parts[:, :, w])
        else:
            blocks.index_add_(1, slots[:, w], parts[:, :, w])


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: Plan, scale: float, fused: bool | None):  # q, k, v: (X, Lp, D) / (X, Lkp, D)
        lay = plan.layout
        bq, bk, nq, nk = lay.block_q, lay.block_k, lay.n_q_blocks, lay.n_k_blocks
        piece, _ = _pieces(q.device, fused)
        out = torch.zeros_like(q)  # rows with no tile at all stay 0
        lse = torch.full(q.shape[:2], float("-inf"), dtype=q.dtype, device=q.device)
        for g in plan.groups:
            mask = None if g.mask is None else g.mask.to(q.dtype)
            o, m = piece(_rows(q, nq, bq, g), _gather(k, nk, bk, g), _gather(v, nk, bk, g), mask, scale)
            if g.empty_rows is not None:  # the fused kernel reports 0 there: it must add nothing below
                m = m.masked_fill(g.empty_rows, float("-inf"))
            _put_rows(out, nq, bq, g, o, add=False)
            _put_rows(lse, nq, bq, g, m, add=False)
        if plan.rect_rows is not None:  # combine with the groups' part of the same rows
            r0, r1 = plan.rect_rows
            R = plan.rect_keys
            o, m = piece(q[:, None, r0:r1], k[:, None, :R], v[:, None, :R], None, scale)
            m_old = lse[:, r0:r1]
            m_new = torch.logaddexp(m_old, m[:, 0])
            out[:, r0:r1].mul_((m_old - m_new).exp_()[..., None]).add_(o[:, 0] * (m[:, 0] - m_new).exp_()[..., None])
            lse[:, r0:r1] = m_new
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale, ctx.fused = plan, scale, fused
        return out

    @staticmethod
    def backward(ctx, dout):
        plan, scale = ctx.plan, ctx.scale
        q, k, v, out, lse = ctx.saved_tensors
        lay = plan.layout
        bq, bk, nq, nk = lay.block_q, lay.block_k, lay.n_q_blocks, lay.n_k_blocks
        _, piece_backward = _pieces(q.device, ctx.fused)
        dout = dout.contiguous()
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for g in plan.groups:
            mask = None if g.mask is None else g.mask.to(q.dtype)
            rows = [_rows(t, nq, bq, g) for t in (dout, q)]
            kg, vg = _gather(k, nk, bk, g), _gather(v, nk, bk, g)
            dqg, dkg, dvg = piece_backward(*rows, kg, vg, _rows(out, nq, bq, g), _rows(lse, nq, bq, g), mask, scale)
            _put_rows(dq, nq, bq, g, dqg, add=True)
            _scatter_add_blocks(dk, nk, bk, g, dkg)
            _scatter_add_blocks(dv, nk, bk, g, dvg)
        if plan.rect_rows is not None:
            r0, r1 = plan.rect_rows
            R = plan.rect_keys
            args = (dout[:, None, r0:r1], q[:, None, r0:r1], k[:, None, :R], v[:, None, :R], out[:, None, r0:r1])
            dqr, dkr, dvr = piece_backward(*args, lse[:, None, r0:r1], None, scale)
            dq[:, r0:r1] += dqr[:, 0]
            dk[:, :R] += dkr[:, 0]
            dv[:, :R] += dvr[:, 0]
        return dq, dk, dv, None, None, None


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: Plan,
    scale: float | None = None,
    fused: bool | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v over the plan's non-empty tiles; q, k, v (B, H, L, D) in the
    plan's order (permute first for a permuted layout). Returns (B, H, L, D) in q's dtype. fused: use the
    fused CPU kernel (default: on the CPU) or plain matmuls (False; the only choice elsewhere)."""
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
    out = _BlockSparseAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), plan, scale, fused)
    return out[:, :L].reshape(B, H, L, D).to(dtype)


def sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MaskSpec, block: int | None = None
) -> torch.Tensor:
    """The `sparse` backend: q, k, v (B, H, L, D) in the model's order -> (B, H, L, D). block: square tiles of
    this size, or None for `default_blocks(spec)`."""
    plan = get_plan(spec, q.device, block)
    return layout_mod.run_in_layout_order(plan.layout, lambda a, b, c: block_sparse_attention(a, b, c, plan), q, k, v)
