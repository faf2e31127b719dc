"""Block layouts (dalle_ds/prior/layout.py) against the one mask definition of masks.py."""

import pytest
import torch

from dalle_ds.attention.layout import (
    EMPTY,
    FULL,
    PARTIAL,
    block_layout,
    layout_on,
    layout_summary,
    transpose_image,
)
from dalle_ds.attention.masks import MaskSpec, column_major_perm, dense_mask
from dalle_ds.kernels.reference import reference_attention

# (kind, permuted): every layout a backend runs; "column" plain is the raster-order column mask
LAYOUTS = [("row", False), ("column", False), ("column", True), ("conv", False), ("causal", False)]
SHAPES = [(256, 8, 5), (77, 8, 5), (13, 4, 3)]  # (T, G, K): T = 256-like, awkward T = 77 and 13


def _ids(p):
    return f"{p[0]}{'-T' if p[1] else ''}"


def _expected(spec: MaskSpec, permuted: bool) -> torch.Tensor:
    m = dense_mask(spec)
    if permuted:
        perm = column_major_perm(spec.text_len, spec.grid)
        m = m[perm][:, perm]
    return m


@pytest.mark.parametrize("layout", LAYOUTS, ids=_ids)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s[0]}G{s[1]}")
@pytest.mark.parametrize("block", [16, 32, 64])
def test_tiles_rebuild_the_dense_mask(layout, shape, block):
    """Full tiles, partial tiles with their element masks, and empty tiles together give exactly the
    (permuted) dense mask of masks.py, and nothing at padded keys."""
    (kind, permuted), (T, G, K) = layout, shape
    spec = MaskSpec(kind, T, G, K)
    lay = block_layout(spec, block, permuted=permuted)
    L = spec.seq_len
    rebuilt = lay.dense_element_mask()
    assert torch.equal(rebuilt[:L, :L], _expected(spec, permuted))
    assert not rebuilt[:L, L:].any()


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS, ids=_ids)
@pytest.mark.parametrize("block", [32, 64])
def test_tiles_rebuild_the_dense_mask_paper_grid(layout, block):
    """The same at the paper's 256 + 32x32 and at an awkward T = 77 with a 32x32 grid."""
    kind, permuted = layout
    for T in (256, 77):
        spec = MaskSpec(kind, T, 32, 11)
        lay = block_layout(spec, block, permuted=permuted)
        assert torch.equal(lay.dense_element_mask()[: spec.seq_len, : spec.seq_len], _expected(spec, permuted))


@pytest.mark.parametrize("layout", LAYOUTS, ids=_ids)
def test_lists_hold_full_tiles_first_then_partial_each_ascending(layout):
    """kv_index lists the non-empty key blocks, full ones first then partial, each part ascending,
    padded with -1; mask ids point at partial tiles only."""
    kind, permuted = layout
    lay = block_layout(MaskSpec(kind, 77, 8, 5), 16, permuted=permuted)
    for qb in range(lay.n_q_blocks):
        cnt, nf = int(lay.kv_count[qb]), int(lay.kv_full[qb])
        idx = lay.kv_index[qb].tolist()
        row = lay.block_kind[qb]
        assert idx[:nf] == [j for j in range(lay.n_k_blocks) if row[j] == FULL]
        assert idx[nf:cnt] == [j for j in range(lay.n_k_blocks) if row[j] == PARTIAL]
        assert all(i == -1 for i in idx[cnt:])
        mids = lay.kv_mask_id[qb].tolist()
        assert all(m == -1 for m in mids[:nf] + mids[cnt:])
        assert all(m >= 0 for m in mids[nf:cnt])


@pytest.mark.parametrize("layout", LAYOUTS, ids=_ids)
def test_transposed_lists_are_the_same_tiles(layout):
    """q_index (per key block: the query blocks that read it) holds exactly the transposed tiles, with
    the same partial-tile mask ids (the dK/dV pass reads the same element masks)."""
    kind, permuted = layout
    lay = block_layout(MaskSpec(kind, 77, 8, 5), 16, permuted=permuted)
    fwd = {}
    for qb in range(lay.n_q_blocks):
        for s in range(int(lay.kv_count[qb])):
            fwd[(qb, int(lay.kv_index[qb, s]))] = int(lay.kv_mask_id[qb, s])
    bwd = {}
    for kb in range(lay.n_k_blocks):
        nf = int(lay.q_full[kb])
        for s in range(int(lay.q_count[kb])):
            qb = int(lay.q_index[kb, s])
            bwd[(qb, kb)] = int(lay.q_mask_id[kb, s])
            assert (s < nf) == (lay.block_kind[qb, kb] == FULL)
    assert fwd == bwd


def test_index_tables_are_int32_and_masks_bool():
    """The tables a kernel reads are int32, the partial-tile masks bool (P, block_q, block_k)."""
    lay = block_layout(MaskSpec("row", 256, 8, 5), 32)
    for t in (
        lay.kv_index,
        lay.kv_count,
        lay.kv_full,
        lay.kv_mask_id,
        lay.q_index,
        lay.q_count,
        lay.q_full,
        lay.q_mask_id,
    ):
        assert t.dtype == torch.int32
    assert lay.tile_masks.dtype == torch.bool
    assert lay.tile_masks.shape == (lay.n_partial, 32, 32)


def test_awkward_text_length_pads_keys_into_partial_tiles():
    """T = 77 (not a block multiple): the last key block holds padded keys, so it is never full; padded
    query rows are "don't care" and never make a tile partial."""
    spec = MaskSpec("row", 77, 8, 5)  # L = 141 = 4 * 32 + 13
    lay = block_layout(spec, 32)
    assert lay.n_q_blocks == lay.n_k_blocks == 5
    assert not (lay.block_kind[:, -1] == FULL).any()
    # every tile of the last query block that is full for its 13 real rows is classified full
    el = dense_mask(spec)[128:, :128].view(13, 4, 32)
    for kb in range(4):
        assert (lay.block_kind[4, kb] == FULL) == bool(el[:, kb].all())


def test_block_sizes_may_differ():
    """block_q != block_k works (tiles of 64 query rows by 32 keys)."""
    spec = MaskSpec("conv", 77, 8, 5)
    lay = block_layout(spec, 64, 32)
    assert lay.tile_masks.shape[1:] == (64, 32)
    assert torch.equal(lay.dense_element_mask()[:141, :141], dense_mask(spec))


def test_paper_densities():
    """At 256 + 32x32 with 32-token blocks: row, transposed column and conv compute 20-31% of the
    tiles, against 51% for plain causal attention and for the untransposed column mask."""
    d = {
        name: block_layout(MaskSpec(kind, 256, 32, 11), 32, permuted=p).density
        for name, kind, p in [
            ("row", "row", False),
            ("column", "column", False),
            ("column_t", "column", True),
            ("conv", "conv", False),
            ("causal", "causal", False),
        ]
    }
    assert d["row"] == pytest.approx(355 / 1600)
    assert d["column_t"] == pytest.approx(324 / 1600)
    assert d["conv"] == pytest.approx(495 / 1600)
    assert d["causal"] == pytest.approx(820 / 1600) == pytest.approx(d["column"])
    assert layout_summary(MaskSpec("column", 256, 32, 11)) == {"plain": d["column"], "transposed": d["column_t"]}


def test_transposed_column_is_block_diagonal_causal_over_the_image():
    """In column-major order every image query block (one image column when block == G) reads all text
    blocks (full) plus exactly one image block, its own, which is causal (partial, lower triangle)."""
    T, G = 64, 16
    lay = block_layout(MaskSpec("column", T, G, 5), G, permuted=True)
    n_text = T // G
    tri = torch.ones(G, G, dtype=torch.bool).tril()
    for qb in range(n_text, lay.n_q_blocks):
        assert lay.kv_index[qb, : lay.kv_full[qb]].tolist() == list(range(n_text))
        assert int(lay.kv_count[qb]) == n_text + 1
        assert int(lay.kv_index[qb, n_text]) == qb
        assert torch.equal(lay.tile_masks[int(lay.kv_mask_id[qb, n_text])], tri)


@pytest.mark.parametrize("T,G", [(256, 8), (77, 8), (5, 3)])
def test_column_layer_in_permuted_order_equals_plain_column_mask(T, G):
    """Attention computed in column-major order with the permuted layout, permuted back, equals
    attention under the plain (raster-order) column mask."""
    spec = MaskSpec("column", T, G, 3)
    lay = block_layout(spec, 16, permuted=True)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, spec.seq_len, 8, generator=g, dtype=torch.float64) for _ in range(3))
    want = reference_attention(q, k, v, dense_mask(spec))
    p = lay.perm
    mask_p = lay.dense_element_mask()[: spec.seq_len, : spec.seq_len]
    got = reference_attention(q[:, :, p], k[:, :, p], v[:, :, p], mask_p)[:, :, lay.inv_perm]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_every_layout_has_rows_that_see_only_themselves_and_empty_and_partial_tiles():
    """The test shapes exercise what the kernels must handle: a row whose only key is itself (text
    position 0), empty tiles, partial tiles and full tiles."""
    for kind, permuted in LAYOUTS:
        for T, G, K in SHAPES:
            spec = MaskSpec(kind, T, G, K)
            assert dense_mask(spec)[0].sum() == 1
            kinds = set(block_layout(spec, 16, permuted=permuted).block_kind.flatten().tolist())
            assert {EMPTY, PARTIAL} <= kinds, (kind, permuted, T)


def test_layouts_are_cached():
    """block_layout is computed once per (spec, blocks, permuted); layout_on reuses it on the CPU."""
    spec = MaskSpec("row", 256, 8, 5)
    assert block_layout(spec, 32) is block_layout(spec, 32)
    assert layout_on(spec, "cpu", 32) is block_layout(spec, 32)


@pytest.mark.parametrize(("text_len", "grid"), [(5, 7), (0, 4), (13, 1)])
def test_transpose_image_is_the_column_major_permutation(text_len, grid):
    """transpose_image == index_select by column_major_perm, is its own inverse, and its backward is the
    inverse permutation of the gradient (awkward sizes)."""
    L = text_len + grid * grid
    x = torch.randn(2, 3, L, 5, dtype=torch.float64, requires_grad=True)
    perm = column_major_perm(text_len, grid)
    y = transpose_image(x, text_len, grid)
    assert torch.equal(y, x.index_select(2, perm))
    assert torch.equal(transpose_image(y, text_len, grid), x)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, g.index_select(2, torch.argsort(perm)))
