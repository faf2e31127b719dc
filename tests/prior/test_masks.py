"""The attention masks of masks.py against an independent reading of PAPER §0 and §3.5.

The references below are written from the text of PAPER §0, not from masks.py: positions are a text
segment of T slots then G*G image positions in raster order; q, k are raster indices of an image
query and key.
  row:    k in [q - G, q]
  column: k <= q and (q - k) mod G == 0
  conv:   k <= q and k - q = G*dr + dc, dr in [-(K-1)/2, 0], dc in [-(K-1)/2, (K-1)/2]
  text queries: causal over text, never an image key; image queries: every text key.
"""

import numpy as np
import pytest
import torch

from dalle_ds.attention.masks import MaskSpec, column_major_perm, dense_mask, layer_kinds

KINDS = ("row", "column", "conv", "causal")


def _image_rule(kind: str, q: int, k: int, G: int, K: int) -> bool:
    if kind == "row":
        return q - G <= k <= q
    if kind == "column":
        return k <= q and (q - k) % G == 0
    if kind == "causal":
        return k <= q
    r = (K - 1) // 2
    if k > q:
        return False
    return any(k - q == G * dr + dc for dr in range(-r, 1) for dc in range(-r, r + 1))


def brute_force_mask(kind: str, T: int, G: int, K: int) -> np.ndarray:
    """Python loops over every (query, key) pair of the full sequence."""
    L = T + G * G
    out = np.zeros((L, L), dtype=bool)
    for i in range(L):
        for j in range(L):
            if i < T:  # text query: causal over text only
                out[i, j] = j < T and j <= i
            elif j < T:  # image query, text key: always
                out[i, j] = True
            else:
                out[i, j] = _image_rule(kind, i - T, j - T, G, K)
    return out


def vectorised_reference(kind: str, T: int, G: int, K: int) -> np.ndarray:
    """The same rules with numpy broadcasting (for the 1280 x 1280 paper grid)."""
    L = T + G * G
    i = np.arange(L)[:, None]
    j = np.arange(L)[None, :]
    q, k = i - T, j - T
    if kind == "row":
        img = (k >= q - G) & (k <= q)
    elif kind == "column":
        img = (k <= q) & ((q - k) % G == 0)
    elif kind == "causal":
        img = k <= q
    else:
        r = (K - 1) // 2
        offsets = np.array(sorted({G * dr + dc for dr in range(-r, 1) for dc in range(-r, r + 1)}))
        img = (k <= q) & np.isin(k - q, offsets)
    text_q, text_k = i < T, j < T
    return np.where(text_q, text_k & (j <= i), np.where(text_k, True, img))


def _dense(kind, T, G, K=3):
    return dense_mask(MaskSpec(kind, T, G, K)).numpy()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T,G,K", [(6, 4, 3), (5, 3, 3), (7, 5, 3), (7, 5, 5), (4, 3, 5)])
def test_dense_mask_matches_brute_force_small(kind, T, G, K):
    """Every kind on small grids (the Fig. 11 toy, 3x3, awkward text lengths) equals the loop reference."""
    np.testing.assert_array_equal(_dense(kind, T, G, K), brute_force_mask(kind, T, G, K))


@pytest.mark.parametrize("kind", KINDS)
def test_dense_mask_matches_reference_paper_grid(kind):
    """Text 256 + 32x32 image, K = 11: the dense mask equals the vectorised reference."""
    np.testing.assert_array_equal(_dense(kind, 256, 32, 11), vectorised_reference(kind, 256, 32, 11))


def test_vectorised_reference_agrees_with_loops():
    """The vectorised reference itself matches the loop reference on a small grid (so it can be trusted)."""
    for kind in KINDS:
        np.testing.assert_array_equal(vectorised_reference(kind, 7, 5, 5), brute_force_mask(kind, 7, 5, 5))


def test_fig11_row_query_sees_five_keys_farthest_one_row_up():
    """Toy (6 text, 4x4): a row query past the first row sees itself + 4 previous image keys; the
    farthest is the same column one row up."""
    T, G = 6, 4
    m = _dense("row", T, G)
    for q in range(G, G * G):
        keys = np.nonzero(m[T + q, T:])[0]
        assert len(keys) == 5
        far = keys.min()
        assert (far // G, far % G) == (q // G - 1, q % G)


def test_fig11_image_queries_see_all_text_and_text_never_sees_image():
    """Every layer kind: image queries see all text keys; text queries see no image key, text causally."""
    T, G = 6, 4
    for kind in KINDS:
        m = _dense(kind, T, G)
        assert m[T:, :T].all()
        assert not m[:T, T:].any()
        np.testing.assert_array_equal(m[:T, :T], np.tril(np.ones((T, T), dtype=bool)))


def test_every_query_sees_itself():
    """The diagonal is always allowed (no query row is empty)."""
    for kind in KINDS:
        assert np.diag(_dense(kind, 7, 5, 5)).all()


def test_layer_schedule_64_layers():
    """64 layers: column at 2, 6, ..., 62 (16), conv at 64, rows elsewhere (47)."""
    kinds = layer_kinds(64)
    cols = [i + 1 for i, k in enumerate(kinds) if k == "column"]
    assert cols == list(range(2, 63, 4)) and len(cols) == 16
    assert kinds[-1] == "conv" and kinds.count("conv") == 1
    assert kinds.count("row") == 47
    assert kinds[:4] == ["row", "column", "row", "row"]


def test_conv_wraps_at_row_edges_like_the_row_band():
    """Conv (G 4, K 3): the query at the start of row 1 sees the end of row 0 (offset -1 wraps), and
    windows never wrap from the bottom of the grid to the top (raster order, not mod G in rows)."""
    T, G = 6, 4
    m = _dense("conv", T, G, 3)[T:, T:]
    # query raster 4 = (1, 0): offsets {-5, -4, -3, -1, 0} -> keys 0, 1, 3, 4
    assert sorted(np.nonzero(m[4])[0].tolist()) == [0, 1, 3, 4]
    # query raster 7 = (1, 3): keys 2, 3, 6, 7 and 4 = (1, 0), reached by dr=-1, dc=+1 wrapping past the edge
    assert sorted(np.nonzero(m[7])[0].tolist()) == [2, 3, 4, 6, 7]
    # bottom row queries never see the top row
    assert not m[12:, :4].any()


def test_conv_k11_on_paper_grid_counts():
    """K 11 on 32x32: an interior query sees 6 rows x 11 columns minus the 5 future ones = 61 image keys."""
    T, G = 256, 32
    m = _dense("conv", T, G, 11)
    q = 10 * G + 16  # row 10, column 16
    assert m[T + q, T:].sum() == 5 * 11 + 6


def test_column_major_perm_makes_column_block_diagonal_causal():
    """Permuting the column mask to column-major image order gives G causal G x G blocks on the diagonal."""
    for T, G in [(6, 4), (7, 5), (5, 3)]:
        m = dense_mask(MaskSpec("column", T, G))
        perm = column_major_perm(T, G)
        mp = m[perm][:, perm]
        block = torch.tril(torch.ones(G, G, dtype=torch.bool))
        assert torch.equal(mp[T:, T:], torch.block_diag(*[block] * G))
        assert torch.equal(mp[:T, :], m[:T, :])  # text rows untouched
        assert mp[T:, :T].all()
