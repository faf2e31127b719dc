"""Launch-side behaviour of the Triton kernels (kernels/block_sparse_attention.py): tiles that subdivide the
layout block (the autotuner's tile choices), strided inputs used without copies, the autotune key and
configs, and the ValueErrors raised before a launch that would overflow a grid axis or an int32 offset.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set before any kernel is
defined), in fp32.
"""

import os

import torch
from helpers import run_with_grads

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

from dalle_ds.attention.layout import layout_on  # noqa: E402
from dalle_ds.attention.masks import MaskSpec  # noqa: E402
from dalle_ds.kernels import block_sparse_attention as bsa  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not bsa.interpreting() else "cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


def inputs(L, B=1, H=2, D=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=gen).to(DEVICE) for _ in range(4)]


@pytest.mark.parametrize("tiles", [(1, 2), (2, 1), (2, 2)], ids=lambda t: f"split{t[0]}x{t[1]}")
@pytest.mark.parametrize(
    "spec, permuted, blocks",
    [(MaskSpec("conv", 77, 8, 5), False, (32, 32)), (MaskSpec("column", 45, 6, 3), True, (32, 64))],
    ids=["conv77_b32", "column45T_b32x64"],
)
def test_sub_tiles_of_the_layout_block_give_the_same_result(spec, permuted, blocks, tiles):
    """Kernel tiles of half the layout block along either axis (what the autotuner may pick on a GPU)
    give out, dQ, dK, dV equal to the float64 reference over the same tiles: full blocks split into full
    sub-tiles, partial ones read their slice of the element mask, padded rows (L = 77, 81) stay inert."""
    lay = layout_on(spec, DEVICE, *blocks, permuted=permuted)
    q, k, v, g = inputs(lay.seq_len, D=24)
    scale = 24**-0.5
    want = run_with_grads(lambda a, b, c: bsa.reference(a, b, c, lay), q.double(), k.double(), v.double(), g.double())
    got = run_with_grads(lambda a, b, c: bsa.BlockSparseAttentionFn.apply(a, b, c, lay, scale, tiles), q, k, v, g)
    for a, w in zip(got, want):
        torch.testing.assert_close(a.double(), w, rtol=0, atol=2e-5)


def test_strided_inputs_are_used_in_place_and_match_contiguous_ones():
    """q, k, v sliced out of one fused (B, L, 3, H, D) projection run through their strides and give
    bitwise the results of contiguous copies; a dO strided along D is copied and gives them too."""
    lay = layout_on(MaskSpec("row", 13, 4, 3), DEVICE, 16)
    L = lay.seq_len
    gen = torch.Generator().manual_seed(1)
    fused = torch.randn(2, L, 3, 2, 16, generator=gen).to(DEVICE)
    q, k, v = (fused[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, D), not contiguous
    g = torch.randn(2, 2, 16, L, generator=gen).to(DEVICE).transpose(2, 3)  # stride 16*L... along D
    assert not q.is_contiguous() and g.stride(-1) != 1
    assert bsa._unit_last(q) is q
    strided = run_with_grads(lambda a, b, c: bsa.block_sparse_attention(a, b, c, lay), q, k, v, g)
    dense = run_with_grads(
        lambda a, b, c: bsa.block_sparse_attention(a, b, c, lay),
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        g.contiguous(),
    )
    for a, b in zip(strided, dense):
        assert torch.equal(a, b)


def test_autotune_configs_vary_tiles_and_are_pruned_to_tiles_of_16():
    """On a GPU the configs cover tile splits 1x1 .. 2x2 times warps and stages, pruned to tiles of at least
    16 for the layout's block size; the key holds the layout's identity, stable and distinct per layout."""
    import triton

    configs = [triton.Config({"SPLIT_M": sm, "SPLIT_N": sn}, num_warps=4, num_stages=2) for sm, sn in bsa._SPLITS]
    splits = lambda cs: {(c.kwargs["SPLIT_M"], c.kwargs["SPLIT_N"]) for c in cs}
    assert splits(bsa._prune_configs(configs, {}, LB_M=64, LB_N=64)) == set(bsa._SPLITS)
    assert splits(bsa._prune_configs(configs, {}, LB_M=32, LB_N=16)) == {(1, 1), (2, 1)}
    assert splits(bsa._prune_configs(configs, {}, LB_M=16, LB_N=16)) == {(1, 1)}
    assert "LAYOUT_ID" in bsa._AUTOTUNE_KEY
    a = layout_on(MaskSpec("row", 13, 4, 3), DEVICE, 16)
    b = layout_on(MaskSpec("causal", 13, 4, 3), DEVICE, 16)
    c = layout_on(MaskSpec("row", 13, 4, 3), DEVICE, 32)
    assert len({bsa._layout_id(x) for x in (a, b, c)}) == 3
    assert bsa._layout_id(a) == bsa._layout_id(layout_on(MaskSpec("row", 13, 4, 3), DEVICE, 16))
    assert 0 <= bsa._layout_id(a) < 2**31


def test_tiles_smaller_than_16_are_refused():
    """A forced split leaving tiles under 16 raises ValueError instead of failing inside Triton."""
    lay = layout_on(MaskSpec("row", 13, 4, 3), DEVICE, 16)
    q = torch.zeros(1, 1, lay.seq_len, 16, device=DEVICE)
    with pytest.raises(ValueError, match="at least 16"):
        bsa.BlockSparseAttentionFn.apply(q, q, q, lay, 0.25, (2, 1))


def test_too_many_heads_or_batches_for_the_grid_are_refused():
    """Heads sit on grid axis 1 and the batch on axis 2 (65535 each): more raises ValueError before
    anything is allocated (the expanded inputs here take no memory)."""
    lay = layout_on(MaskSpec("row", 13, 4, 3), DEVICE, 16)
    one = torch.zeros(1, 1, lay.seq_len, 16, device=DEVICE)
    heads = one.expand(1, 65536, -1, -1)
    batch = one.expand(65536, 1, -1, -1)
    with pytest.raises(ValueError, match="grid axis 1"):
        bsa.block_sparse_attention(heads, heads, heads, lay)
    with pytest.raises(ValueError, match="grid axis 2"):
        bsa.block_sparse_attention(batch, batch, batch, lay)


def test_offsets_past_int32_within_one_head_are_refused():
    """Offsets inside one head are int32 (the batch/head part is int64): a tensor whose rows of one head
    span 2**31 elements or more raises ValueError; one whose batch*head extent passes 2**31 does not."""
    lay = layout_on(MaskSpec("row", 13, 4, 3), "cpu", 16)  # L = 29, padded to 32 rows
    L = lay.seq_len
    long_rows = torch.empty_strided((1, 1, L, 16), (0, 0, 2**27, 1), device="meta")  # 31 * 2**27 > 2**31
    with pytest.raises(ValueError, match="int32"):
        bsa._check_limits(lay, q=long_rows)
    many_heads = torch.empty_strided((2, 4096, L, 16), (2**31, 2**19, 16, 1), device="meta")
    bsa._check_limits(lay, q=many_heads)  # B*H*L*D > 2**31, fine with int64 head offsets
