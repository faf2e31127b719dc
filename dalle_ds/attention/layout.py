"""Block layouts of the attention masks, derived from `masks.allowed` (the one mask definition).

A block-sparse kernel cuts the (L, L) score matrix into tiles of `block_q` query rows by `block_k` key
columns and visits only the tiles that hold at least one allowed entry. For every query block the
layout lists those key blocks, full ones first (every entry allowed: no element mask needed) then
partial ones (the element mask of the tile, taken from `masks.allowed`, is applied inside the tile).
The transposed lists (for every key block, the query blocks that read it) drive the dK/dV pass of a
backward kernel.

Lengths that are not block multiples work (T = 77): the sequence is padded to whole blocks. Padded
keys are never allowed, so a tile holding one is partial; padded query rows are "don't care" (their
outputs are dropped), so they never make a tile partial or non-empty.

`permuted=True` is the paper's transposed column layer (PAPER §0): positions are reordered by
`masks.column_major_perm` (image states column-major, text in place) and the layout is the layout of
the SAME mask function over the reordered positions, i.e. entry (i, j) is
`allowed(spec, perm[i], perm[j])`. For the column mask that pattern is block-diagonal causal over the
image: attention run in that order and permuted back equals attention under the plain column mask.

All index tensors are int32 on the CPU (move them with `BlockLayout.to(device)`), padded with -1 past
each row's count, so the Triton kernels and the PyTorch block-gather path read the same tables.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache

import torch

from dalle_ds.attention import masks
from dalle_ds.attention.masks import MaskSpec

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """The non-empty tiles of one mask at one block size (see the module docstring)."""

    spec: MaskSpec
    block_q: int
    block_k: int
    permuted: bool  # positions in column-major image order (column_major_perm)
    n_q_blocks: int  # NQ = ceil(L / block_q)
    n_k_blocks: int  # NK = ceil(L / block_k)
    block_kind: torch.Tensor  # (NQ, NK) int8: EMPTY / PARTIAL / FULL
    # per query block: the key blocks to visit, full ones first, each part ascending; -1 past the count
    kv_index: torch.Tensor  # (NQ, Wk) int32
    kv_count: torch.Tensor  # (NQ,) int32 non-empty key blocks
    kv_full: torch.Tensor  # (NQ,) int32 of which the first kv_full are full
    kv_mask_id: torch.Tensor  # (NQ, Wk) int32 row of `tile_masks` for partial entries, -1 otherwise
    # per key block: the query blocks that read it (the transposed lists, for dK / dV)
    q_index: torch.Tensor  # (NK, Wq) int32
    q_count: torch.Tensor  # (NK,) int32
    q_full: torch.Tensor  # (NK,) int32
    q_mask_id: torch.Tensor  # (NK, Wq) int32
    tile_masks: torch.Tensor  # (P, block_q, block_k) bool element masks of the P partial tiles
    perm: torch.Tensor | None  # (L,) long: perm[j] = original position placed at j (permuted only)
    inv_perm: torch.Tensor | None  # (L,) long: inverse of perm

    @property
    def seq_len(self) -> int:
        return self.spec.seq_len

    @property
    def n_nonempty(self) -> int:
        return int((self.block_kind != EMPTY).sum())

    @property
    def n_partial(self) -> int:
        return int((self.block_kind == PARTIAL).sum())

    @property
    def density(self) -> float:
        """Fraction of the NQ x NK tiles that are computed (non-empty)."""
        return self.n_nonempty / (self.n_q_blocks * self.n_k_blocks)

    @property
    def element_density(self) -> float:
        """Fraction of the L x L entries that are allowed (the floor any tiling can reach)."""
        return float(masks.dense_mask(self.spec).float().mean())

    def to(self, device: torch.device | str) -> BlockLayout:
        """A copy with every tensor on `device` (cached per device by `layout_on`)."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, val in kw.items():
            if isinstance(val, torch.Tensor):
                kw[name] = val.to(device)
        return BlockLayout(**kw)

    def dense_element_mask(self) -> torch.Tensor:
        """(NQ*bq, NK*bk) bool rebuilt from the tiles alone (tests: must equal the permuted dense mask)."""
        bq, bk, nq, nk = self.block_q, self.block_k, self.n_q_blocks, self.n_k_blocks
        out = torch.zeros(nq, bq, nk, bk, dtype=torch.bool, device=self.block_kind.device)
        full = self.block_kind == FULL
        out.permute(0, 2, 1, 3)[full] = True
        for qb in range(nq):
            for s in range(int(self.kv_full[qb]), int(self.kv_count[qb])):
                kb, mid = int(self.kv_index[qb, s]), int(self.kv_mask_id[qb, s])
                out[qb, :, kb, :] = self.tile_masks[mid]
        return out.view(nq * bq, nk * bk)


def _padded_positions(spec: MaskSpec, n_blocks: int, block: int, permuted: bool) -> torch.Tensor:
    """Original position held by each slot of the padded sequence (slots >= L keep their own index)."""
    pos = torch.arange(n_blocks * block)
    if permuted:
        pos[: spec.seq_len] = masks.column_major_perm(spec.text_len, spec.grid)
    return pos


def _element_mask(spec: MaskSpec, block_q: int, block_k: int, permuted: bool) -> torch.Tensor:
    """(NQ, bq, NK, bk) bool: `masks.allowed` over the padded, possibly permuted, positions.

    Padded keys are False. Padded query rows are False too (they are ignored by the classification)."""
    L = spec.seq_len
    nq, nk = -(-L // block_q), -(-L // block_k)
    qp = _padded_positions(spec, nq, block_q, permuted)
    kp = _padded_positions(spec, nk, block_k, permuted)
    qs, ks = torch.arange(nq * block_q), torch.arange(nk * block_k)
    ok = masks.allowed(spec, qp[:, None], kp[None, :]) & (qs < L)[:, None] & (ks < L)[None, :]
    return ok.view(nq, block_q, nk, block_k)


def _lists(kind: torch.Tensor, tile_id: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per row of `kind` (R, C): non-empty columns, full first then partial, each ascending; -1 padded."""
    R, C = kind.shape
    col = torch.arange(C).expand(R, C)
    # sort key: full tiles first (0), then partial (1), then empty (2); ties by column index
    rank = torch.where(kind == FULL, 0, torch.where(kind == PARTIAL, 1, 2)) * C + col
    order = torch.argsort(rank, dim=1)
    count = (kind != EMPTY).sum(dim=1)
    nfull = (kind == FULL).sum(dim=1)
    width = max(int(count.max()), 1)
    order = order[:, :width]
    valid = torch.arange(width)[None, :] < count[:, None]
    index = torch.where(valid, order, -1)
    mask_id = torch.where(valid, torch.gather(tile_id, 1, order), -1)
    return index.int(), count.int(), nfull.int(), mask_id.int()


def block_layout(spec: MaskSpec, block_q: int = 32, block_k: int | None = None, permuted: bool = False) -> BlockLayout:
    """The block layout of `spec` for tiles of block_q x block_k (block_k defaults to block_q), cached.

    permuted=True reorders positions by `masks.column_major_perm` first (the transposed column layer;
    meaningful for any kind, block-diagonal for "column")."""
    block_k = block_q if block_k is None else block_k
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block sizes must be positive, got {block_q} x {block_k}")
    return _block_layout(spec, int(block_q), int(block_k), bool(permuted))


@lru_cache(maxsize=64)
def _block_layout(spec: MaskSpec, block_q: int, block_k: int, permuted: bool) -> BlockLayout:
    L = spec.seq_len
    el = _element_mask(spec, block_q, block_k, permuted)  # (NQ, bq, NK, bk)
    nq, nk = el.shape[0], el.shape[2]
    rows_valid = (torch.arange(nq * block_q) < L).view(nq, block_q, 1, 1)
    any_ok = el.any(dim=3).any(dim=1)  # (NQ, NK)
    all_ok = (el | ~rows_valid).all(dim=3).all(dim=1)  # padded rows are "don't care"
    kind = torch.where(all_ok, FULL, torch.where(any_ok, PARTIAL, EMPTY)).to(torch.int8)

    partial = kind == PARTIAL
    tile_id = torch.full((nq, nk), -1, dtype=torch.long)
    tile_id[partial] = torch.arange(int(partial.sum()))  # row-major order of (qb, kb)
    tile_masks = el.permute(0, 2, 1, 3)[partial].contiguous()  # (P, bq, bk)

    kv_index, kv_count, kv_full, kv_mask_id = _lists(kind, tile_id)
    q_index, q_count, q_full, q_mask_id = _lists(kind.t(), tile_id.t())
    perm = inv = None
    if permuted:
        perm = masks.column_major_perm(spec.text_len, spec.grid)
        inv = torch.argsort(perm)
    return BlockLayout(
        spec=spec,
        block_q=block_q,
        block_k=block_k,
        permuted=permuted,
        n_q_blocks=nq,
        n_k_blocks=nk,
        block_kind=kind,
        kv_index=kv_index,
        kv_count=kv_count,
        kv_full=kv_full,
        kv_mask_id=kv_mask_id,
        q_index=q_index,
        q_count=q_count,
        q_full=q_full,
        q_mask_id=q_mask_id,
        tile_masks=tile_masks,
        perm=perm,
        inv_perm=inv,
    )


_ON_DEVICE: dict[tuple, BlockLayout] = {}


def layout_on(
    spec: MaskSpec, device: torch.device | str, block_q: int = 32, block_k: int | None = None, permuted: bool = False
) -> BlockLayout:
    """`block_layout(...)` with its tensors on `device`, cached per device."""
    block_k = block_q if block_k is None else block_k
    key = (spec, block_q, block_k, bool(permuted), str(torch.device(device)))
    lay = _ON_DEVICE.get(key)
    if lay is None:
        lay = block_layout(spec, block_q, block_k, permuted)
        if torch.device(device).type != "cpu":
            lay = lay.to(device)
        _ON_DEVICE[key] = lay
    return lay


def default_permuted(spec: MaskSpec) -> bool:
    """Whether a backend runs `spec` in column-major order: yes for the column layer (the paper's
    transposition makes it block-diagonal), no otherwise."""
    return spec.kind == "column"


def layout_summary(spec: MaskSpec, block: int = 32) -> dict[str, float]:
    """Tile densities of `spec` at `block` (plain order, and column-major for the column layer)."""
    out = {"plain": block_layout(spec, block).density}
    if spec.kind == "column":
        out["transposed"] = block_layout(spec, block, permuted=True).density
    return out


def transpose_image(t: torch.Tensor, text_len: int, grid: int) -> torch.Tensor:
    """t (B, H, L, D) with its image positions transposed (raster <-> column-major), text in place: what
    `t.index_select(2, masks.column_major_perm(...))` gives, and its own inverse. As a transpose its backward
    is a transpose too, where index_select's is a scatter-add (atomics on a GPU)."""
    image = t[:, :, text_len:].unflatten(2, (grid, grid)).transpose(2, 3).flatten(2, 3)  # (B, H, G*G, D)
    return torch.cat([t[:, :, :text_len], image], dim=2)


def run_in_layout_order(lay: BlockLayout, fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """fn(q, k, v) computed in the layout's position order, taking and returning raster order: the transposed
    column layer reorders the sequence axis (dim 2) to column-major (`lay.perm`), runs, and reorders back;
    other layouts run as they are. q, k, v: (B, H, L, D)."""
    if lay.perm is None:
        return fn(q, k, v)
    T, G = lay.spec.text_len, lay.spec.grid
    q, k, v = (transpose_image(t, T, G) for t in (q, k, v))
    return transpose_image(fn(q, k, v), T, G)
