"""Block-sparse FlashAttention in Triton: forward and backward over the non-empty tiles of a mask.

The tiles come from `dalle_ds.attention.layout.BlockLayout` (derived from `masks.allowed`, the one mask
definition): for each query block a list of key blocks, full ones first, then partial ones whose
element mask is read from the layout's `tile_masks` (one int8 tile per partial block). Full tiles run
without any mask; padded keys (lengths that are not block multiples) only ever sit in partial tiles.

  forward   one program per (query tile, head, batch): online softmax over the listed key blocks
            (no L x L matrix), fp32 accumulators, writes O and the row log-sum-exp (base 2).
  backward  FlashAttention-2 style, two kernels without atomics: one program per key tile walks the
            transposed lists (query blocks that read it) for dK and dV; one per query tile walks the
            forward lists for dQ. delta = rowsum(dO * O) is a torch reduction.

A kernel tile is the layout block or half of it along either axis, chosen by the autotuner per layout
(see "Autotuning" below). The kernels share their prologue, tile loads, tile-mask loads, online-softmax
step and dS as `@triton.jit` helpers. Inputs fp16, bf16 or fp32 (fp32 dots in TF32 where torch's own
fp32 matmuls may use it, else IEEE: `dot_precision`), used through their strides (a contiguous copy only
when the last dimension is strided); accumulation is fp32. Launches that would overflow a grid axis or an
int32 offset raise ValueError first (`_check_limits`). `kernels/aot.py` compiles the kernels ahead of time
for given GPU architectures without a GPU.

Triton is imported lazily, at the first call, so `TRITON_INTERPRET=1` may be set by a test module
before the kernels are defined. Under the interpreter, `@triton.autotune` gets a single config (it
fails with several there) and bf16 `tl.dot` is broken (test fp32 and fp16 there, bf16 on a GPU).

API
    block_sparse_attention(q, k, v, layout, scale=None)   (B, H, L, D) in the layout's order
    BlockSparseAttentionFn.apply(q, k, v, layout, scale[, tiles])  the autograd.Function behind it
    triton_attention(q, k, v, spec, block=None)           the `triton` backend (raster order in and out;
                                                           the column layer runs transposed)
    reference(q, k, v, layout, dtype=torch.float64)       plain PyTorch over the layout's tiles
"""

from __future__ import annotations

import importlib.util
import math
import os
from functools import cache

import torch

from dalle_ds.attention import layout as layout_mod
from dalle_ds.attention.layout import BlockLayout
from dalle_ds.attention.masks import MaskSpec

from .reference import reference_attention

_LOG2E = 1.4426950408889634


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason() -> str | None:
    """None where Triton is installed and can run here (a CUDA GPU of compute capability 8.0+, or the
    interpreter), else why not."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    if interpreting():
        return None
    if not torch.cuda.is_available():
        return "no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter)"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"Triton 3.x needs compute capability 8.0+, this GPU is sm{major}{minor} (use the sparse backend)"
    return None


def usable() -> bool:
    """Triton is installed and can run here."""
    return unavailable_reason() is None


# Autotuning: tile sizes as a subdivision of the layout block.
#
# The layout is built for one block size (LB_M x LB_N): its lists name layout blocks and its tile masks
# are LB_M x LB_N. A kernel tile larger than the layout block, or one straddling two layout blocks, would
# need lists the layout does not have, so the tile size cannot vary freely; it can *subdivide* the layout
# block. Each config picks SPLIT_M, SPLIT_N in {1, 2}: the kernel tile is BLOCK_M = LB_M // SPLIT_M by
# BLOCK_N = LB_N // SPLIT_N, the grid has SPLIT programs per layout block along its own axis, and each
# program walks the layout's list for its block as before, visiting every listed block as SPLIT
# sub-tiles along the other axis (a full block gives full sub-tiles; a partial one gives sub-tiles that
# read their slice of the block's element mask). Smaller tiles mean more programs and fewer registers
# per program; larger ones feed the tensor cores better; which wins depends on the GPU, D, the batch
# and the layout. Configs whose tiles would fall under 16 (tl.dot's minimum) are pruned (`_prune_configs`);
# SPLIT 1 x 1 (tile = layout block) is always kept. The key holds the layout's identity (LAYOUT_ID, a
# stable hash of its mask spec, block sizes and order; an unused kernel argument), so each layout is
# tuned on its own: a row layer and a causal layer of the same length do very different work per
# program. The interpreter gets exactly one config (several fail there): tile = layout block.

_SPLITS = ((1, 1), (1, 2), (2, 1), (2, 2))
_AUTOTUNE_KEY = ["L", "D", "LB_M", "LB_N", "LAYOUT_ID"]


def _configs():
    import triton

    if interpreting():
        return [triton.Config({"SPLIT_M": 1, "SPLIT_N": 1}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"SPLIT_M": sm, "SPLIT_N": sn}, num_warps=w, num_stages=s)
        for sm, sn in _SPLITS
        for w in (4, 8)
        for s in (1, 2, 3)
    ]


def _prune_configs(configs, named_args, **kwargs):
    """Keep the configs whose tiles are at least 16 x 16 for this layout's block size (never empty:
    `_check` requires layout blocks of at least 16, and SPLIT 1 x 1 is in every config set)."""
    lb_m, lb_n = kwargs["LB_M"], kwargs["LB_N"]
    return [c for c in configs if lb_m // c.kwargs["SPLIT_M"] >= 16 and lb_n // c.kwargs["SPLIT_N"] >= 16]


@cache
def _kernels():
    """The three kernels (forward, dK/dV, dQ), autotuned (first call only, so TRITON_INTERPRET is read
    when the test set it)."""
    import triton

    return tuple(
        triton.autotune(configs=_configs(), key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_configs})(
            kernel
        )
        for kernel in _jit_kernels()
    )


@cache
def _jit_kernels():
    """The three kernels as plain `@triton.jit` functions, without autotuning (forced tiles, and
    `kernels/aot.py`, which compiles them ahead of time); for the interpreter under TRITON_INTERPRET=1."""
    return _define_kernels(interpreting())


def _define_kernels(interpret: bool):
    """Define the shared `@triton.jit` helpers and the kernels that use them (like the Triton fused
    attention tutorial): program ids and head pointers, row tiles with boundary masks (a list step's two
    tiles in one helper), the partial blocks' element masks, the online-softmax step (forward) and the
    P / dS tile (backward). Few, larger helpers in the inner loops: each helper call costs the interpreter
    about a millisecond (it re-patches triton.language per call)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _program(H, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
        """This program's tile along grid axis 0, the layout block holding it and the tile's offset inside
        that block; its head h (axis 1), batch z (axis 2) and zh = z * H + h (int64)."""
        tile = tl.program_id(0)
        h = tl.program_id(1)
        z = tl.program_id(2)
        return tile, tile // SPLIT, (tile % SPLIT) * BLOCK, z, h, z.to(tl.int64) * H + h

    @triton.jit
    def _head(PTR, z, h, s_z, s_h):
        """Pointer to element (z, h, 0, 0) of a (B, H, L, D) tensor; int64 offset (B*H*L*D may pass 2**31;
        offsets inside one head stay int32, see `_check_limits`)."""
        return PTR + z.to(tl.int64) * s_z + h.to(tl.int64) * s_h

    @triton.jit
    def _load_rows(base, offs, s_l, rd, L, D: tl.constexpr):
        """Rows `offs` of one head as a (len(offs), BLOCK_D) tile, zero past L and past D."""
        return tl.load(
            base + offs[:, None] * s_l + rd[None, :], mask=(offs[:, None] < L) & (rd[None, :] < D), other=0.0
        )

    @triton.jit
    def _store_rows(base, offs, s_l, rd, L, D: tl.constexpr, x):
        """Store the fp32 tile x to rows `offs` of one head (in the tensor's dtype), skipping rows past L
        and columns past D."""
        mask = (offs[:, None] < L) & (rd[None, :] < D)
        tl.store(base + offs[:, None] * s_l + rd[None, :], x.to(base.dtype.element_ty), mask=mask)

    @triton.jit
    def _load_row_stats(LSE, DELTA, zh, offs_m, L):
        """The forward's log-sum-exp (base 2) and rowsum(dO * O) of rows offs_m; a padded row gets
        lse = inf, so its probabilities are 0."""
        lse = tl.load(LSE + zh * L + offs_m, mask=offs_m < L, other=float("inf"))
        delta = tl.load(DELTA + zh * L + offs_m, mask=offs_m < L, other=0.0)
        return lse, delta

    @triton.jit
    def _load_sub_tile(
        INDEX,
        row,
        W,
        t,
        a_base,
        s_a,
        b_base,
        s_b,
        rd,
        L,
        D: tl.constexpr,
        SPLIT: tl.constexpr,
        LB: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Step t of a program's walk over list `row` of a (rows, W) block table, SPLIT sub-tiles per listed
        layout block: the list slot, the sub-tile's offset inside its block, the sequence positions it
        covers and its rows of two tensors of one head (k and v, or q and dO), zero past L and past D."""
        slot = t // SPLIT
        off = (t % SPLIT) * BLOCK
        offs = tl.load(INDEX + row * W + slot) * LB + off + tl.arange(0, BLOCK)
        mask = (offs[:, None] < L) & (rd[None, :] < D)
        a = tl.load(a_base + offs[:, None] * s_a + rd[None, :], mask=mask, other=0.0)
        b = tl.load(b_base + offs[:, None] * s_b + rd[None, :], mask=mask, other=0.0)
        return slot, off, offs, a, b

    @triton.jit
    def _tile_mask(
        TILE_MASKS,
        mid,
        r0,
        c0,
        LB_M: tl.constexpr,
        LB_N: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """The (BLOCK_M, BLOCK_N) slice at (r0, c0) of partial block `mid`'s element mask (from
        masks.allowed via the layout), as bool."""
        rows = r0 + tl.arange(0, BLOCK_M)
        cols = c0 + tl.arange(0, BLOCK_N)
        return tl.load(TILE_MASKS + mid * (LB_M * LB_N) + rows[:, None] * LB_N + cols[None, :]) != 0

    @triton.jit
    def _softmax_step(m_i, l_i, acc, q, k, v, qk_scale, allow, MASKED: tl.constexpr, PRECISION: tl.constexpr):
        """One online-softmax step over a (BLOCK_M, BLOCK_N) tile: base-2 scores q k^T * qk_scale (-inf
        where `allow` is False when MASKED; `allow` is None otherwise), raise the running row max m_i,
        rescale the running sum l_i and output acc, add this tile's p and p @ v. When MASKED, a row with
        nothing allowed yet keeps m = -inf and adds 0 (no -inf - -inf)."""
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            s = tl.where(allow, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_ref = m_new
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return m_new, l_i, acc

    @triton.jit
    def _bwd_tile(q, k, v, do, lse, delta, qk_scale, allow, MASKED: tl.constexpr, PRECISION: tl.constexpr):
        """P (recomputed from the forward's lse; 0 where `allow` is False when MASKED, `allow` None
        otherwise) and dS = P * (dO V^T - delta) for a (BLOCK_M, BLOCK_N) tile."""
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(allow, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        return p, p * (dp - delta[:, None])

    @triton.jit
    def fwd_kernel(
        Q,
        K,
        V,
        O,
        LSE,
        KV_INDEX,
        KV_COUNT,
        KV_FULL,
        KV_MASK_ID,
        TILE_MASKS,
        sqz,
        sqh,
        sqm,
        skz,
        skh,
        skm,
        svz,
        svh,
        svm,
        soz,
        soh,
        som,
        H,
        L,
        W,
        LAYOUT_ID,  # unused in the body: in the autotune key so each layout is tuned on its own
        qk_scale,
        LB_M: tl.constexpr,
        LB_N: tl.constexpr,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
        SPLIT_M: tl.constexpr,
        SPLIT_N: tl.constexpr,
    ):
        """One program per (query tile, head, batch): online softmax over the key blocks listed for its
        layout query block, SPLIT_N sub-tiles each, full blocks first (no element mask), then partial."""
        BLOCK_M: tl.constexpr = LB_M // SPLIT_M
        BLOCK_N: tl.constexpr = LB_N // SPLIT_N
        tile, qb, r0, z, h, zh = _program(H, SPLIT_M, BLOCK_M)
        rd = tl.arange(0, BLOCK_D)
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        q = _load_rows(_head(Q, z, h, sqz, sqh), offs_m, sqm, rd, L, D)
        k_base = _head(K, z, h, skz, skh)
        v_base = _head(V, z, h, svz, svh)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        n_full = tl.load(KV_FULL + qb) * SPLIT_N  # counted in sub-tiles
        n_tot = tl.load(KV_COUNT + qb) * SPLIT_N
        # full blocks: every entry allowed, no element mask
        for t in range(0, n_full):
            j, c0, offs_n, k, v = _load_sub_tile(
                KV_INDEX, qb, W, t, k_base, skm, v_base, svm, rd, L, D, SPLIT_N, LB_N, BLOCK_N
            )
            m_i, l_i, acc = _softmax_step(m_i, l_i, acc, q, k, v, qk_scale, None, False, PRECISION)
        # partial blocks: the element mask of the block (from masks.allowed via the layout)
        for t in range(n_full, n_tot):
            j, c0, offs_n, k, v = _load_sub_tile(
                KV_INDEX, qb, W, t, k_base, skm, v_base, svm, rd, L, D, SPLIT_N, LB_N, BLOCK_N
            )
            allow = _tile_mask(TILE_MASKS, tl.load(KV_MASK_ID + qb * W + j), r0, c0, LB_M, LB_N, BLOCK_M, BLOCK_N)
            m_i, l_i, acc = _softmax_step(m_i, l_i, acc, q, k, v, qk_scale, allow, True, PRECISION)
        seen = l_i > 0.0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]  # a row that sees nothing -> 0
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))  # base 2
        _store_rows(_head(O, z, h, soz, soh), offs_m, som, rd, L, D, out)
        tl.store(LSE + zh * L + offs_m, lse, mask=offs_m < L)

    @triton.jit
    def bwd_dkdv_kernel(
        Q,
        K,
        V,
        DO,
        LSE,
        DELTA,
        DK,
        DV,
        Q_INDEX,
        Q_COUNT,
        Q_FULL,
        Q_MASK_ID,
        TILE_MASKS,
        sqz,
        sqh,
        sqm,
        skz,
        skh,
        skm,
        svz,
        svh,
        svm,
        sdoz,
        sdoh,
        sdom,
        sdkz,
        sdkh,
        sdkm,
        sdvz,
        sdvh,
        sdvm,
        H,
        L,
        W,
        LAYOUT_ID,  # unused in the body: in the autotune key so each layout is tuned on its own
        qk_scale,
        sm_scale,
        LB_M: tl.constexpr,
        LB_N: tl.constexpr,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
        SPLIT_M: tl.constexpr,
        SPLIT_N: tl.constexpr,
    ):
        """One program per (key tile, head, batch): walks the query blocks that read its layout key block
        (the transposed lists), SPLIT_M sub-tiles each, and accumulates dK and dV without atomics."""
        BLOCK_M: tl.constexpr = LB_M // SPLIT_M
        BLOCK_N: tl.constexpr = LB_N // SPLIT_N
        tile, kb, c0, z, h, zh = _program(H, SPLIT_N, BLOCK_N)
        rd = tl.arange(0, BLOCK_D)
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        k = _load_rows(_head(K, z, h, skz, skh), offs_n, skm, rd, L, D)
        v = _load_rows(_head(V, z, h, svz, svh), offs_n, svm, rd, L, D)
        q_base = _head(Q, z, h, sqz, sqh)
        do_base = _head(DO, z, h, sdoz, sdoh)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        n_full = tl.load(Q_FULL + kb) * SPLIT_M  # counted in sub-tiles
        n_tot = tl.load(Q_COUNT + kb) * SPLIT_M
        # full blocks (no element mask), then partial ones (their element mask)
        for t in range(0, n_full):
            i, r0, offs_m, q, do = _load_sub_tile(
                Q_INDEX, kb, W, t, q_base, sqm, do_base, sdom, rd, L, D, SPLIT_M, LB_M, BLOCK_M
            )
            lse, delta = _load_row_stats(LSE, DELTA, zh, offs_m, L)
            p, ds = _bwd_tile(q, k, v, do, lse, delta, qk_scale, None, False, PRECISION)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        for t in range(n_full, n_tot):
            i, r0, offs_m, q, do = _load_sub_tile(
                Q_INDEX, kb, W, t, q_base, sqm, do_base, sdom, rd, L, D, SPLIT_M, LB_M, BLOCK_M
            )
            lse, delta = _load_row_stats(LSE, DELTA, zh, offs_m, L)
            allow = _tile_mask(TILE_MASKS, tl.load(Q_MASK_ID + kb * W + i), r0, c0, LB_M, LB_N, BLOCK_M, BLOCK_N)
            p, ds = _bwd_tile(q, k, v, do, lse, delta, qk_scale, allow, True, PRECISION)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        dk = dk * sm_scale
        _store_rows(_head(DK, z, h, sdkz, sdkh), offs_n, sdkm, rd, L, D, dk)
        _store_rows(_head(DV, z, h, sdvz, sdvh), offs_n, sdvm, rd, L, D, dv)

    @triton.jit
    def bwd_dq_kernel(
        Q,
        K,
        V,
        DO,
        LSE,
        DELTA,
        DQ,
        KV_INDEX,
        KV_COUNT,
        KV_FULL,
        KV_MASK_ID,
        TILE_MASKS,
        sqz,
        sqh,
        sqm,
        skz,
        skh,
        skm,
        svz,
        svh,
        svm,
        sdoz,
        sdoh,
        sdom,
        sdqz,
        sdqh,
        sdqm,
        H,
        L,
        W,
        LAYOUT_ID,  # unused in the body: in the autotune key so each layout is tuned on its own
        qk_scale,
        sm_scale,
        LB_M: tl.constexpr,
        LB_N: tl.constexpr,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
        SPLIT_M: tl.constexpr,
        SPLIT_N: tl.constexpr,
    ):
        """One program per (query tile, head, batch): walks the forward lists of its layout query block,
        SPLIT_N sub-tiles per listed key block, and accumulates dQ."""
        BLOCK_M: tl.constexpr = LB_M // SPLIT_M
        BLOCK_N: tl.constexpr = LB_N // SPLIT_N
        tile, qb, r0, z, h, zh = _program(H, SPLIT_M, BLOCK_M)
        rd = tl.arange(0, BLOCK_D)
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        q = _load_rows(_head(Q, z, h, sqz, sqh), offs_m, sqm, rd, L, D)
        do = _load_rows(_head(DO, z, h, sdoz, sdoh), offs_m, sdom, rd, L, D)
        lse, delta = _load_row_stats(LSE, DELTA, zh, offs_m, L)
        k_base = _head(K, z, h, skz, skh)
        v_base = _head(V, z, h, svz, svh)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        n_full = tl.load(KV_FULL + qb) * SPLIT_N  # counted in sub-tiles
        n_tot = tl.load(KV_COUNT + qb) * SPLIT_N
        # full blocks (no element mask), then partial ones (their element mask)
        for t in range(0, n_full):
            j, c0, offs_n, k, v = _load_sub_tile(
                KV_INDEX, qb, W, t, k_base, skm, v_base, svm, rd, L, D, SPLIT_N, LB_N, BLOCK_N
            )
            p, ds = _bwd_tile(q, k, v, do, lse, delta, qk_scale, None, False, PRECISION)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        for t in range(n_full, n_tot):
            j, c0, offs_n, k, v = _load_sub_tile(
                KV_INDEX, qb, W, t, k_base, skm, v_base, svm, rd, L, D, SPLIT_N, LB_N, BLOCK_N
            )
            allow = _tile_mask(TILE_MASKS, tl.load(KV_MASK_ID + qb * W + j), r0, c0, LB_M, LB_N, BLOCK_M, BLOCK_N)
            p, ds = _bwd_tile(q, k, v, do, lse, delta, qk_scale, allow, True, PRECISION)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        dq = dq * sm_scale
        _store_rows(_head(DQ, z, h, sdqz, sdqh), offs_m, sdqm, rd, L, D, dq)

    if interpret:
        # Triton's interpreter re-executes each kernel's source in its module's globals, without the
        # closure, so the interpreted helpers are published there too (compiled kernels keep resolving
        # their helpers from the closure, which takes precedence over globals in Triton's JIT).
        helpers = (_program, _head, _load_rows, _store_rows, _load_row_stats, _load_sub_tile, _tile_mask)
        globals().update({f.__name__: f for f in (*helpers, _softmax_step, _bwd_tile)})
    return fwd_kernel, bwd_dkdv_kernel, bwd_dq_kernel


# ----------------------------------------------------------------------------------------------
# Python side

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lay: BlockLayout) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"q, k, v must be (B, H, L, D) of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[2] != lay.seq_len:
        raise ValueError(f"sequence length {q.shape[2]} does not match the layout's {lay.seq_len}")
    if q.dtype not in _SUPPORTED or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of {_SUPPORTED}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if lay.kv_index.device != q.device:
        raise ValueError(
            f"the layout's tables are on {lay.kv_index.device}, the inputs on {q.device}: "
            "get the layout with dalle_ds.attention.layout.layout_on(spec, device, ...)"
        )
    if min(lay.block_q, lay.block_k) < 16:
        raise ValueError(f"Triton's tl.dot needs tiles of at least 16, got {lay.block_q} x {lay.block_k}")
    if lay.block_q & (lay.block_q - 1) or lay.block_k & (lay.block_k - 1):
        raise ValueError(f"Triton tiles must be powers of two, got layout blocks {lay.block_q} x {lay.block_k}")


# Launch limits. Grid: axis 0 holds the tiles along the sequence (up to 2**31 - 1 programs), axis 1 the
# heads and axis 2 the batch (CUDA allows 65535 on each of those two). Pointer offsets: the (batch, head)
# part is int64 in the kernels (`_head`), the part inside one head int32, so each tensor must address its
# rows of one head (padded to whole layout blocks) below 2**31 elements; so must the tile-mask table.
_INT32_MAX = 2**31 - 1
_GRID_YZ_MAX = 65535


def _check_limits(lay: BlockLayout, **tensors: torch.Tensor) -> None:
    """ValueError before a launch that would overflow a grid axis or an int32 offset (see above);
    `tensors` are (B, H, L, D) with unit stride along D, named for the message."""
    B, H, L, D = next(iter(tensors.values())).shape
    if H > _GRID_YZ_MAX:
        raise ValueError(f"{H} heads: the kernels put heads on grid axis 1, which CUDA limits to {_GRID_YZ_MAX}")
    if B > _GRID_YZ_MAX:
        raise ValueError(f"batch {B}: the kernels put the batch on grid axis 2, which CUDA limits to {_GRID_YZ_MAX}")
    max_split = max(max(s) for s in _SPLITS)
    if max(lay.n_q_blocks, lay.n_k_blocks) * max_split > _INT32_MAX:
        raise ValueError(f"{max(lay.n_q_blocks, lay.n_k_blocks)} blocks: too many tiles for grid axis 0")
    rows = max(lay.n_q_blocks * lay.block_q, lay.n_k_blocks * lay.block_k)  # padded length
    for name, t in tensors.items():
        span = (rows - 1) * t.stride(2) + D - 1
        if span > _INT32_MAX:
            raise ValueError(
                f"{name} spans {span} elements within one head (rows of stride {t.stride(2)}), over int32's "
                f"{_INT32_MAX}: the kernels index inside a head with int32 offsets (split the sequence or heads)"
            )
    if max(1, lay.tile_masks.shape[0]) * lay.block_q * lay.block_k > _INT32_MAX:
        raise ValueError(f"{lay.tile_masks.shape[0]} partial tiles: the tile-mask table passes int32 offsets")


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """t itself where its last dimension has unit stride (the kernels take the other three strides, so
    views such as q, k, v sliced out of one fused projection need no copy), else a contiguous copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _layout_id(lay: BlockLayout) -> int:
    """A stable 31-bit identity of the layout (mask spec, block sizes, order) for the autotune key: the
    same in every process, so Triton's on-disk autotune cache can reuse it."""
    import zlib

    return zlib.crc32(repr((lay.spec, lay.block_q, lay.block_k, lay.permuted)).encode()) & _INT32_MAX


_TILE_MASKS: dict[int, tuple[BlockLayout, torch.Tensor]] = {}


def _tile_masks(lay: BlockLayout) -> torch.Tensor:
    """The layout's partial-tile masks as int8 (same bytes as bool); never empty (Triton needs a pointer)."""
    hit = _TILE_MASKS.get(id(lay))
    if hit is not None and hit[0] is lay:
        return hit[1]
    tm = lay.tile_masks
    if tm.shape[0] == 0:
        tm = torch.zeros(1, lay.block_q, lay.block_k, dtype=torch.bool, device=tm.device)
    tm = tm.contiguous().view(torch.int8)
    _TILE_MASKS[id(lay)] = (lay, tm)
    return tm


def _meta(q: torch.Tensor, lay: BlockLayout) -> dict:
    D = q.shape[-1]
    return dict(
        LB_M=lay.block_q,
        LB_N=lay.block_k,
        D=D,
        BLOCK_D=max(16, 1 << (D - 1).bit_length()),
        PRECISION=dot_precision(q.dtype),
    )


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot`'s input_precision for `dtype` inputs. 16-bit inputs run on tensor cores whatever it says.
    fp32 inputs take TF32 (tensor cores, 10-bit mantissa) where torch's fp32 matmuls may:
    `torch.get_float32_matmul_precision()` is "high" or "medium", as `training/precision.configure_matmul`
    sets it for an fp32 config on sm80+ with allow_tf32; otherwise, and in the interpreter, IEEE fp32."""
    if dtype == torch.float32 and (interpreting() or torch.get_float32_matmul_precision() == "highest"):
        return "ieee"
    return "tf32"


def _launch(which: int, n_blocks: int, split_name: str, B: int, H: int, args: tuple, meta: dict, tiles) -> None:
    """Launch kernel `which` (0 forward, 1 dK/dV, 2 dQ) with one program per tile along grid axis 0
    (`n_blocks` layout blocks times the config's `split_name` sub-tiles), heads on axis 1, batch on axis 2.
    `tiles` = (SPLIT_M, SPLIT_N) bypasses the autotuner (tests run sub-tiles in the interpreter this way)."""
    if tiles is None:
        _kernels()[which][lambda cfg: (n_blocks * cfg[split_name], H, B)](*args, **meta)
        return
    split = dict(zip(("SPLIT_M", "SPLIT_N"), tiles))
    if min(meta["LB_M"] // split["SPLIT_M"], meta["LB_N"] // split["SPLIT_N"]) < 16 or any(
        s not in (1, 2) for s in tiles
    ):
        raise ValueError(f"tiles {tiles} must be SPLIT_M, SPLIT_N in (1, 2) leaving tiles of at least 16")
    _jit_kernels()[which][(n_blocks * split[split_name], H, B)](*args, **meta, **split)


def _forward(q, k, v, lay: BlockLayout, scale: float, tiles=None):
    B, H, L, _ = q.shape
    _check_limits(lay, q=q, k=k, v=v)  # before allocating anything
    o = torch.empty_like(q)
    _check_limits(lay, o=o)
    lse = torch.empty(B * H, L, device=q.device, dtype=torch.float32)
    args = (
        q,
        k,
        v,
        o,
        lse,
        lay.kv_index,
        lay.kv_count,
        lay.kv_full,
        lay.kv_mask_id,
        _tile_masks(lay),
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *o.stride()[:3],
        H,
        L,
        lay.kv_index.shape[1],
        _layout_id(lay),
        scale * _LOG2E,
    )
    _launch(0, lay.n_q_blocks, "SPLIT_M", B, H, args, _meta(q, lay), tiles)
    return o, lse


def _backward(do, q, k, v, o, lse, lay: BlockLayout, scale: float, tiles=None):
    B, H, L, _ = q.shape
    do = _unit_last(do)
    _check_limits(lay, do=do)
    delta = (do.float() * o.float()).sum(dim=-1).reshape(B * H, L)  # rowsum(dO * O)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _check_limits(lay, dq=dq, dk=dk, dv=dv)
    tm, meta, lay_id = _tile_masks(lay), _meta(q, lay), _layout_id(lay)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    dkdv_args = (q, k, v, do, lse, delta, dk, dv, lay.q_index, lay.q_count, lay.q_full, lay.q_mask_id, tm)
    dkdv_args += (*strides, *dk.stride()[:3], *dv.stride()[:3], H, L, lay.q_index.shape[1], lay_id)
    _launch(1, lay.n_k_blocks, "SPLIT_N", B, H, (*dkdv_args, scale * _LOG2E, scale), meta, tiles)
    dq_args = (q, k, v, do, lse, delta, dq, lay.kv_index, lay.kv_count, lay.kv_full, lay.kv_mask_id, tm)
    dq_args += (*strides, *dq.stride()[:3], H, L, lay.kv_index.shape[1], lay_id)
    _launch(2, lay.n_q_blocks, "SPLIT_M", B, H, (*dq_args, scale * _LOG2E, scale), meta, tiles)
    return dq, dk, dv


class BlockSparseAttentionFn(torch.autograd.Function):
    """Block-sparse attention with the Triton forward and backward kernels. q, k, v are used through
    their strides (no copies) where their last dimension has unit stride. `tiles` = (SPLIT_M, SPLIT_N)
    fixes the kernels' tile subdivision instead of autotuning it (tests)."""

    @staticmethod
    def forward(ctx, q, k, v, lay: BlockLayout, scale: float, tiles: tuple[int, int] | None = None):
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        o, lse = _forward(q, k, v, lay, scale, tiles)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.lay, ctx.scale, ctx.tiles = lay, scale, tiles
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.lay, ctx.scale, ctx.tiles)
        return dq, dk, dv, None, None, None


def block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, scale: float | None = None
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v over the layout's tiles; q, k, v (B, H, L, D) in the layout's
    order (already permuted for a permuted layout); the layout's tensors on q's device."""
    _check(q, k, v, layout)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return BlockSparseAttentionFn.apply(q, k, v, layout, scale)


def default_block(device: torch.device) -> int:
    """Tile size of the backend: 64 on a GPU (bigger tiles feed the tensor cores), 32 elsewhere."""
    return 64 if device.type == "cuda" else 32


def triton_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MaskSpec, block: int | None = None
) -> torch.Tensor:
    """The `triton` backend: q, k, v (B, H, L, D) in raster order -> (B, H, L, D). The column layer
    runs in column-major order (block-diagonal) and is permuted back."""
    block = default_block(q.device) if block is None else block
    lay = layout_mod.layout_on(spec, q.device, block, permuted=layout_mod.default_permuted(spec))
    return layout_mod.run_in_layout_order(lay, lambda a, b, c: block_sparse_attention(a, b, c, lay), q, k, v)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Plain PyTorch over the same tiles: the layout's element mask rebuilt tile by tile, then
    `reference_attention` in `dtype` (q, k, v in the layout's order)."""
    L = layout.seq_len
    mask = layout.dense_element_mask()[:L, :L].to(q.device)
    return reference_attention(q, k, v, mask, dtype=dtype)
