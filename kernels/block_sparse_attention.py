"""Block-sparse FlashAttention in Triton: forward and backward over the non-empty tiles of a mask.

The tiles come from `dalle_ds.prior.layout.BlockLayout` (derived from `masks.allowed`, the one mask
definition): for each query block a list of key blocks, full ones first, then partial ones whose
element mask is read from the layout's `tile_masks` (one int8 tile per partial block). Full tiles run
without any mask; padded keys (lengths that are not block multiples) only ever sit in partial tiles.

  forward   one program per (query block, batch*head): online softmax over the listed key blocks
            (no L x L matrix), fp32 accumulators, writes O and the row log-sum-exp (base 2).
  backward  FlashAttention-2 style, two kernels without atomics: one program per key block walks the
            transposed lists (query blocks that read it) for dK and dV; one per query block walks the
            forward lists for dQ. delta = rowsum(dO * O) is a torch reduction.

Inputs fp16, bf16 or fp32 (fp32 dots use IEEE precision, not TF32); accumulation is fp32.

Triton is imported lazily, at the first call, so `TRITON_INTERPRET=1` may be set by a test module
before the kernels are defined. Under the interpreter, `@triton.autotune` gets a single config (it
fails with several there) and bf16 `tl.dot` is broken (test fp32 and fp16 there, bf16 on a GPU).

API
    block_sparse_attention(q, k, v, layout, scale=None)   (B, H, L, D) in the layout's order
    BlockSparseAttentionFn.apply(q, k, v, layout, scale)  the autograd.Function behind it
    triton_attention(q, k, v, spec, block=None)           the `triton` backend (raster order in and out;
                                                           the column layer runs transposed)
    reference(q, k, v, layout, dtype=torch.float64)       plain PyTorch over the layout's tiles
    register()                                            add "triton" to dalle_ds.attention if usable
"""
from __future__ import annotations

import importlib.util
import math
import os
from functools import lru_cache

import torch

from dalle_ds.prior import layout as layout_mod
from dalle_ds.prior.layout import BlockLayout
from dalle_ds.prior.masks import MaskSpec

from .reference import reference_attention

_LOG2E = 1.4426950408889634


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def usable() -> bool:
    """Triton is installed and can run here: a CUDA GPU, or the interpreter."""
    if importlib.util.find_spec("triton") is None:
        return False
    return interpreting() or torch.cuda.is_available()


def _configs():
    import triton

    if interpreting():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2, 3)]


@lru_cache(maxsize=None)
def _kernels():
    """Define the kernels (first call only, so TRITON_INTERPRET is read when the test set it)."""
    import triton
    import triton.language as tl

    key = ["L", "D", "BLOCK_M", "BLOCK_N"]

    @triton.autotune(configs=_configs(), key=key)
    @triton.jit
    def fwd_kernel(Q, K, V, O, LSE,
                   KV_INDEX, KV_COUNT, KV_FULL, KV_MASK_ID, TILE_MASKS,
                   sqz, sqh, sqm, skz, skh, skm, svz, svh, svm, soz, soh, som,
                   H, L, W, qk_scale,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                   PRECISION: tl.constexpr):
        qb = tl.program_id(0)
        zh = tl.program_id(1)
        z, h = zh // H, zh % H
        rm = tl.arange(0, BLOCK_M)
        rn = tl.arange(0, BLOCK_N)
        rd = tl.arange(0, BLOCK_D)
        offs_m = qb * BLOCK_M + rm
        dmask = rd[None, :] < D
        q = tl.load(Q + z * sqz + h * sqh + offs_m[:, None] * sqm + rd[None, :],
                    mask=(offs_m[:, None] < L) & dmask, other=0.0)
        k_base = K + z * skz + h * skh
        v_base = V + z * svz + h * svh
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        n_full = tl.load(KV_FULL + qb)
        n_tot = tl.load(KV_COUNT + qb)
        # full tiles: every entry allowed, no element mask
        for j in range(0, n_full):
            kb = tl.load(KV_INDEX + qb * W + j)
            offs_n = kb * BLOCK_N + rn
            lmask = (offs_n[:, None] < L) & dmask
            k = tl.load(k_base + offs_n[:, None] * skm + rd[None, :], mask=lmask, other=0.0)
            v = tl.load(v_base + offs_n[:, None] * svm + rd[None, :], mask=lmask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        # partial tiles: the element mask of the tile (from masks.allowed via the layout)
        for j in range(n_full, n_tot):
            kb = tl.load(KV_INDEX + qb * W + j)
            mid = tl.load(KV_MASK_ID + qb * W + j)
            offs_n = kb * BLOCK_N + rn
            lmask = (offs_n[:, None] < L) & dmask
            k = tl.load(k_base + offs_n[:, None] * skm + rd[None, :], mask=lmask, other=0.0)
            v = tl.load(v_base + offs_n[:, None] * svm + rd[None, :], mask=lmask, other=0.0)
            allow = tl.load(TILE_MASKS + mid * (BLOCK_M * BLOCK_N) + rm[:, None] * BLOCK_N + rn[None, :]) != 0
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            s = tl.where(allow, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        seen = l_i > 0.0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]           # a row that sees nothing -> 0
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))  # base 2
        tl.store(O + z * soz + h * soh + offs_m[:, None] * som + rd[None, :], out.to(O.dtype.element_ty),
                 mask=(offs_m[:, None] < L) & dmask)
        tl.store(LSE + zh * L + offs_m, lse, mask=offs_m < L)

    @triton.autotune(configs=_configs(), key=key)
    @triton.jit
    def bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                        Q_INDEX, Q_COUNT, Q_FULL, Q_MASK_ID, TILE_MASKS,
                        sqz, sqh, sqm, skz, skh, skm, svz, svh, svm, sdz, sdh, sdm,
                        H, L, W, qk_scale, sm_scale,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                        BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
        kb = tl.program_id(0)
        zh = tl.program_id(1)
        z, h = zh // H, zh % H
        rm = tl.arange(0, BLOCK_M)
        rn = tl.arange(0, BLOCK_N)
        rd = tl.arange(0, BLOCK_D)
        dmask = rd[None, :] < D
        offs_n = kb * BLOCK_N + rn
        nmask = (offs_n[:, None] < L) & dmask
        k = tl.load(K + z * skz + h * skh + offs_n[:, None] * skm + rd[None, :], mask=nmask, other=0.0)
        v = tl.load(V + z * svz + h * svh + offs_n[:, None] * svm + rd[None, :], mask=nmask, other=0.0)
        q_base = Q + z * sqz + h * sqh
        do_base = DO + z * sdz + h * sdh
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        n_full = tl.load(Q_FULL + kb)
        n_tot = tl.load(Q_COUNT + kb)
        for i in range(0, n_tot):
            qb = tl.load(Q_INDEX + kb * W + i)
            offs_m = qb * BLOCK_M + rm
            mmask = (offs_m[:, None] < L) & dmask
            q = tl.load(q_base + offs_m[:, None] * sqm + rd[None, :], mask=mmask, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * sdm + rd[None, :], mask=mmask, other=0.0)
            lse = tl.load(LSE + zh * L + offs_m, mask=offs_m < L, other=float("inf"))  # padded rows: p = 0
            delta = tl.load(DELTA + zh * L + offs_m, mask=offs_m < L, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            p = tl.exp2(s - lse[:, None])                       # (BLOCK_M, BLOCK_N)
            if i >= n_full:                                     # partial tile: apply its element mask
                mid = tl.load(Q_MASK_ID + kb * W + i)
                allow = tl.load(TILE_MASKS + mid * (BLOCK_M * BLOCK_N) + rm[:, None] * BLOCK_N
                                + rn[None, :]) != 0
                p = tl.where(allow, p, 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        dk = dk * sm_scale
        tl.store(DK + z * skz + h * skh + offs_n[:, None] * skm + rd[None, :], dk.to(DK.dtype.element_ty),
                 mask=nmask)
        tl.store(DV + z * svz + h * svh + offs_n[:, None] * svm + rd[None, :], dv.to(DV.dtype.element_ty),
                 mask=nmask)

    @triton.autotune(configs=_configs(), key=key)
    @triton.jit
    def bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                      KV_INDEX, KV_COUNT, KV_FULL, KV_MASK_ID, TILE_MASKS,
                      sqz, sqh, sqm, skz, skh, skm, svz, svh, svm, sdz, sdh, sdm,
                      H, L, W, qk_scale, sm_scale,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                      BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
        qb = tl.program_id(0)
        zh = tl.program_id(1)
        z, h = zh // H, zh % H
        rm = tl.arange(0, BLOCK_M)
        rn = tl.arange(0, BLOCK_N)
        rd = tl.arange(0, BLOCK_D)
        dmask = rd[None, :] < D
        offs_m = qb * BLOCK_M + rm
        mmask = (offs_m[:, None] < L) & dmask
        q = tl.load(Q + z * sqz + h * sqh + offs_m[:, None] * sqm + rd[None, :], mask=mmask, other=0.0)
        do = tl.load(DO + z * sdz + h * sdh + offs_m[:, None] * sdm + rd[None, :], mask=mmask, other=0.0)
        lse = tl.load(LSE + zh * L + offs_m, mask=offs_m < L, other=float("inf"))
        delta = tl.load(DELTA + zh * L + offs_m, mask=offs_m < L, other=0.0)
        k_base = K + z * skz + h * skh
        v_base = V + z * svz + h * svh
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        n_full = tl.load(KV_FULL + qb)
        n_tot = tl.load(KV_COUNT + qb)
        for j in range(0, n_tot):
            kb = tl.load(KV_INDEX + qb * W + j)
            offs_n = kb * BLOCK_N + rn
            lmask = (offs_n[:, None] < L) & dmask
            k = tl.load(k_base + offs_n[:, None] * skm + rd[None, :], mask=lmask, other=0.0)
            v = tl.load(v_base + offs_n[:, None] * svm + rd[None, :], mask=lmask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            p = tl.exp2(s - lse[:, None])
            if j >= n_full:
                mid = tl.load(KV_MASK_ID + qb * W + j)
                allow = tl.load(TILE_MASKS + mid * (BLOCK_M * BLOCK_N) + rm[:, None] * BLOCK_N
                                + rn[None, :]) != 0
                p = tl.where(allow, p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        dq = dq * sm_scale
        tl.store(DQ + z * sqz + h * sqh + offs_m[:, None] * sqm + rd[None, :], dq.to(DQ.dtype.element_ty),
                 mask=mmask)

    return fwd_kernel, bwd_dkdv_kernel, bwd_dq_kernel


# ----------------------------------------------------------------------------------------------
# Python side

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lay: BlockLayout) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must be (B, H, L, D) of one shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] != lay.seq_len:
        raise ValueError(f"sequence length {q.shape[2]} does not match the layout's {lay.seq_len}")
    if q.dtype not in _SUPPORTED or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of {_SUPPORTED}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if lay.kv_index.device != q.device:
        raise ValueError(f"the layout's tables are on {lay.kv_index.device}, the inputs on {q.device}: "
                         "get the layout with dalle_ds.prior.layout.layout_on(spec, device, ...)")
    if min(lay.block_q, lay.block_k) < 16:
        raise ValueError(f"Triton's tl.dot needs tiles of at least 16, got {lay.block_q} x {lay.block_k}")


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
    return dict(BLOCK_M=lay.block_q, BLOCK_N=lay.block_k, D=D, BLOCK_D=max(16, 1 << (D - 1).bit_length()),
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _forward(q, k, v, lay: BlockLayout, scale: float):
    fwd, _, _ = _kernels()
    B, H, L, _ = q.shape
    o = torch.empty_like(q)
    lse = torch.empty(B * H, L, device=q.device, dtype=torch.float32)
    grid = (lay.n_q_blocks, B * H)
    fwd[grid](q, k, v, o, lse, lay.kv_index, lay.kv_count, lay.kv_full, lay.kv_mask_id, _tile_masks(lay),
              *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
              H, L, lay.kv_index.shape[1], scale * _LOG2E, **_meta(q, lay))
    return o, lse


def _backward(do, q, k, v, o, lse, lay: BlockLayout, scale: float):
    _, dkdv, dqk = _kernels()
    B, H, L, _ = q.shape
    do = do.contiguous()
    delta = (do.float() * o.float()).sum(dim=-1).reshape(B * H, L)   # rowsum(dO * O)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    tm, meta = _tile_masks(lay), _meta(q, lay)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    dkdv[(lay.n_k_blocks, B * H)](q, k, v, do, lse, delta, dk, dv,
                                  lay.q_index, lay.q_count, lay.q_full, lay.q_mask_id, tm, *strides,
                                  H, L, lay.q_index.shape[1], scale * _LOG2E, scale, **meta)
    dqk[(lay.n_q_blocks, B * H)](q, k, v, do, lse, delta, dq,
                                 lay.kv_index, lay.kv_count, lay.kv_full, lay.kv_mask_id, tm, *strides,
                                 H, L, lay.kv_index.shape[1], scale * _LOG2E, scale, **meta)
    return dq, dk, dv


class BlockSparseAttentionFn(torch.autograd.Function):
    """Block-sparse attention with the Triton forward and backward kernels."""

    @staticmethod
    def forward(ctx, q, k, v, lay: BlockLayout, scale: float):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = _forward(q, k, v, lay, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.lay, ctx.scale = lay, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.lay, ctx.scale)
        return dq, dk, dv, None, None


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                           scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v over the layout's tiles; q, k, v (B, H, L, D) in the layout's
    order (already permuted for a permuted layout); the layout's tensors on q's device."""
    _check(q, k, v, layout)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return BlockSparseAttentionFn.apply(q, k, v, layout, scale)


def default_block(device: torch.device) -> int:
    """Tile size of the backend: 64 on a GPU (bigger tiles feed the tensor cores), 32 elsewhere."""
    return 64 if device.type == "cuda" else 32


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MaskSpec,
                     block: int | None = None) -> torch.Tensor:
    """The `triton` backend: q, k, v (B, H, L, D) in raster order -> (B, H, L, D). The column layer
    runs in column-major order (block-diagonal) and is permuted back."""
    block = default_block(q.device) if block is None else block
    permuted = layout_mod.default_permuted(spec)
    lay = layout_mod.layout_on(spec, q.device, block, permuted=permuted)
    if lay.perm is not None:
        q, k, v = (t.index_select(2, lay.perm) for t in (q, k, v))
        return block_sparse_attention(q, k, v, lay).index_select(2, lay.inv_perm)
    return block_sparse_attention(q, k, v, lay)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
              dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Plain PyTorch over the same tiles: the layout's element mask rebuilt tile by tile, then
    `reference_attention` in `dtype` (q, k, v in the layout's order)."""
    L = layout.seq_len
    mask = layout.dense_element_mask()[:L, :L].to(q.device)
    return reference_attention(q, k, v, mask, dtype=dtype)


def register() -> bool:
    """Register the `triton` backend in `dalle_ds.attention` when Triton can run here."""
    if not usable():
        return False
    from dalle_ds import attention

    attention.register_backend("triton", triton_attention)
    return True
