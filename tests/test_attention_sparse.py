"""The `sparse` attention backend (dalle_ds/attention/sparse.py): outputs and dQ/dK/dV against a float64
reference on fresh random inputs, for every layout, T = 256-like and awkward T, and in the prior."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import layout_id, run_with_grads

from dalle_ds import attention
from dalle_ds.attention.layout import block_layout
from dalle_ds.attention.masks import MaskSpec, dense_mask
from dalle_ds.attention.sparse import (
    Group,
    Plan,
    _gather,
    block_sparse_attention,
    build_plan,
    get_plan,
    sparse_attention,
)
from dalle_ds.config import get_preset
from dalle_ds.kernels.reference import reference_attention
from dalle_ds.prior.model import Prior

LAYOUTS = [("row", False), ("column", False), ("column", True), ("conv", False), ("causal", False)]
SHAPES = [(256, 8, 5), (77, 8, 5), (13, 4, 3)]


pytestmark = pytest.mark.usefixtures("one_thread")


def inputs(L, dtype, B=2, H=2, D=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=gen).to(dtype) for _ in range(4)]  # q, k, v, dO


def baselines(q, k, v, g, mask):
    """out, dq, dk, dv of PyTorch's two fp32 attention paths under `mask`: matmul + softmax, and SDPA with the
    boolean mask (what the `dense` backend runs; on the CPU its fused kernel's dq is ~2.4x less accurate)."""
    math_path = run_with_grads(lambda a, b, c: reference_attention(a, b, c, mask, dtype=torch.float32), q, k, v, g)
    sdpa = run_with_grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask), q, k, v, g)
    return math_path, sdpa


def assert_within_2x_baseline(got, bases, want, dtype):
    """Each of out, dq, dk, dv: max error vs float64 at most 2x that of PyTorch's own attention in the same
    precision (the larger error of its two paths, `baselines`), plus one ulp of the tensor's scale, so ulp-level
    noise at tiny sizes cannot flip it."""
    eps = torch.finfo(dtype).eps
    for name, a, w, *bs in zip(("out", "dq", "dk", "dv"), got, want, *bases):
        err = (a.double() - w).abs().max().item()
        berr = max((b.double() - w).abs().max().item() for b in bs)
        assert err <= 2 * berr + eps * w.abs().max().item(), f"{name}: error {err:.3g} vs baseline {berr:.3g}"


def plan_for(spec, permuted, block=16):
    return build_plan(block_layout(spec, block, permuted=permuted))


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s[0]}G{s[1]}")
def test_fp32_output_and_grads_match_float64_reference(layout, shape):
    """fp32 outputs and dQ/dK/dV are within 2x the error of plain fp32 PyTorch attention, vs float64."""
    (kind, permuted), (T, G, K) = layout, shape
    spec = MaskSpec(kind, T, G, K)
    plan = plan_for(spec, permuted)
    L = spec.seq_len
    mask = plan.layout.dense_element_mask()[:L, :L]
    q, k, v, g = inputs(L, torch.float32)
    want = run_with_grads(
        lambda a, b, c: reference_attention(a, b, c, mask), q.double(), k.double(), v.double(), g.double()
    )
    base = baselines(q, k, v, g, mask)
    got = run_with_grads(lambda a, b, c: block_sparse_attention(a, b, c, plan), q, k, v, g)
    assert_within_2x_baseline(got, base, want, torch.float32)


@pytest.mark.parametrize("fused", [None, False], ids=["fused", "matmuls"])
@pytest.mark.parametrize("blocks", [(32, 32), (64, 32)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_float64_is_exact_up_to_rounding(layout, blocks, fused):
    """In float64 the block-sparse result equals the dense reference to 1e-12 (same function), with square and
    64 x 32 tiles, through the fused CPU kernel and through the plain-matmul pieces other devices use."""
    kind, permuted = layout
    spec = MaskSpec(kind, 77, 8, 5)
    plan = build_plan(block_layout(spec, *blocks, permuted=permuted))
    L = spec.seq_len
    mask = plan.layout.dense_element_mask()[:L, :L]
    q, k, v, g = inputs(L, torch.float64)
    want = run_with_grads(lambda a, b, c: reference_attention(a, b, c, mask), q, k, v, g)
    got = run_with_grads(lambda a, b, c: block_sparse_attention(a, b, c, plan, fused=fused), q, k, v, g)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=0, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
@pytest.mark.parametrize("T", [256, 77])
def test_fp32_matches_reference_paper_grid(layout, T):
    """The same check at a 32x32 grid (L = T + 1024) with 32-token tiles."""
    kind, permuted = layout
    spec = MaskSpec(kind, T, 32, 11)
    plan = plan_for(spec, permuted, block=32)
    L = spec.seq_len
    mask = plan.layout.dense_element_mask()[:L, :L]
    q, k, v, g = inputs(L, torch.float32, B=1, H=2, D=32)
    want = run_with_grads(
        lambda a, b, c: reference_attention(a, b, c, mask), q.double(), k.double(), v.double(), g.double()
    )
    base = baselines(q, k, v, g, mask)
    got = run_with_grads(lambda a, b, c: block_sparse_attention(a, b, c, plan), q, k, v, g)
    assert_within_2x_baseline(got, base, want, torch.float32)


@pytest.mark.parametrize("kind", ["row", "column", "conv", "causal"])
def test_backend_equals_dense_backend_within_1e5_at_paper_shape(kind):
    """attend(backend="sparse") equals attend(backend="dense") (SDPA, boolean mask) within 1e-5 in fp32
    at 256 + 32x32 tokens, head size 64: outputs and gradients. The column layer runs transposed."""
    spec = MaskSpec(kind, 256, 32, 11)
    q, k, v, g = inputs(spec.seq_len, torch.float32, B=1, H=2, D=64)
    dense = run_with_grads(lambda a, b, c: attention.attend(a, b, c, spec, backend="dense"), q, k, v, g)
    sparse = run_with_grads(lambda a, b, c: attention.attend(a, b, c, spec, backend="sparse"), q, k, v, g)
    for a, b in zip(sparse, dense):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_backend_is_registered():
    """Importing dalle_ds.attention registers "sparse"; a prior can be built with it."""
    assert attention.get_backend("sparse") is sparse_attention
    Prior(dataclasses.replace(get_preset("tiny").prior, attention_backend="sparse"))


def test_column_layer_runs_transposed():
    """The backend's column plan is the permuted (block-diagonal) layout: far fewer tiles than raster order."""
    spec = MaskSpec("column", 256, 32, 11)
    plan = get_plan(spec, "cpu")
    assert plan.layout.permuted
    assert plan.layout.density < 0.6 * block_layout(spec, 32).density


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_plan_computes_about_the_nonempty_tiles(kind):
    """At the paper shape the plan's matmuls cover at most 5% more tiles than the non-empty ones, and
    image-query x text-key scores come from one rectangle (no gather)."""
    plan = get_plan(MaskSpec(kind, 256, 32, 11), "cpu")
    assert plan.n_tiles <= 1.05 * plan.layout.n_nonempty
    assert plan.rect_rows == (256, 1280) and plan.rect_keys == 256


def test_conv_plan_reads_sliding_windows_as_views():
    """At the paper shape the conv layer runs on 64 x 32 tiles and its image rows read their key blocks as one
    sliding window per query block: an overlapping view of K and V (no gather), equal to the gathered copy."""
    spec = MaskSpec("conv", 256, 32, 11)
    plan = get_plan(spec, "cpu")
    assert (plan.layout.block_q, plan.layout.block_k) == (64, 32)
    big = max(plan.groups, key=lambda g: len(g.q_blocks))
    assert big.slide is not None and len(big.q_blocks) >= 12
    k = torch.randn(2, spec.seq_len, 8)
    view = _gather(k, plan.layout.n_k_blocks, 32, big)
    assert view.data_ptr() >= k.data_ptr() and view.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
    copy = k.view(2, -1, 32, 8).index_select(1, big.k_blocks).view_as(view)
    assert torch.equal(view, copy)


@pytest.mark.parametrize("fused", [None, False], ids=["fused", "matmuls"])
def test_a_row_with_no_key_in_its_group_takes_the_rectangle_alone(fused):
    """A group row whose keys are all masked (none of the prior's masks makes one: every query sees itself) adds
    nothing: the fused kernel reports log-sum-exp 0 for such a row, which the plan overrides with -inf, so the
    rows equal attention over the rectangle's keys alone, gradients included."""
    lay = block_layout(MaskSpec("conv", 64, 4, 3), 16)  # L = 80: rows 64..79 are the one image block
    blocked = Group(
        q_blocks=torch.tensor([4]),
        q_range=(4, 5),
        k_blocks=torch.tensor([4]),
        width=1,
        mask=torch.full((1, 1, 16, 16), float("-inf")),
        empty_rows=torch.ones(1, 16, dtype=torch.bool),
        slide=None,
    )
    plan = Plan(layout=lay, rect_rows=(64, 80), rect_keys=64, groups=(blocked,))
    q, k, v, g = inputs(80, torch.float64)
    mask = torch.zeros(80, 80, dtype=torch.bool)
    mask[64:, :64] = True  # rows 0..63 have no piece at all: output 0, like a row with no tile
    want = run_with_grads(lambda a, b, c: reference_attention(a, b, c, mask), q, k, v, g)
    got = run_with_grads(lambda a, b, c: block_sparse_attention(a, b, c, plan, fused=fused), q, k, v, g)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["row", "conv", "causal"])
def test_merged_and_unmerged_groups_agree(kind):
    """Merging query blocks of different shapes into one padded group (cost model) changes nothing."""
    spec = MaskSpec(kind, 77, 8, 5)
    lay = block_layout(spec, 16)
    merged, single = build_plan(lay, merge=True), build_plan(lay, merge=False)
    assert len(merged.groups) < len(single.groups)
    q, k, v, g = inputs(spec.seq_len, torch.float64)
    for a, b in zip(
        run_with_grads(lambda x, y, z: block_sparse_attention(x, y, z, merged), q, k, v, g),
        run_with_grads(lambda x, y, z: block_sparse_attention(x, y, z, single), q, k, v, g),
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_rows_that_see_only_themselves_return_their_value():
    """A query whose only allowed key is itself (text position 0; with no text, the whole first image
    row of the column layer) outputs exactly its own value row, and its gradient goes to that v only."""
    for spec in (MaskSpec("row", 13, 4, 3), MaskSpec("column", 0, 8, 3)):
        alone = dense_mask(spec).sum(dim=1) == 1
        q, k, v, g = inputs(spec.seq_len, torch.float64)
        out = sparse_attention(q, k, v, spec)
        torch.testing.assert_close(out[:, :, alone], v[:, :, alone], rtol=0, atol=1e-12)
    assert alone.sum() == 8


def test_activation_checkpointing_gives_the_same_gradients():
    """Under torch.utils.checkpoint (non-reentrant: saved-tensor hooks drop and recompute what the
    backward keeps) the gradients equal those of a plain forward+backward."""
    from torch.utils.checkpoint import checkpoint

    spec = MaskSpec("conv", 77, 8, 5)
    q, k, v, g = inputs(spec.seq_len, torch.float64)
    plain = run_with_grads(lambda a, b, c: sparse_attention(a, b, c, spec), q, k, v, g)
    ckpt = run_with_grads(lambda a, b, c: checkpoint(sparse_attention, a, b, c, spec, use_reentrant=False), q, k, v, g)
    for a, b in zip(ckpt, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_keep_their_dtype(dtype):
    """bf16 / fp16 inputs are computed in fp32 and returned (with their gradients) in their dtype."""
    spec = MaskSpec("row", 77, 8, 5)
    q, k, v, g = inputs(spec.seq_len, dtype)
    got = run_with_grads(lambda a, b, c: sparse_attention(a, b, c, spec), q, k, v, g)
    ref = run_with_grads(lambda a, b, c: sparse_attention(a, b, c, spec), q.float(), k.float(), v.float(), g.float())
    for a, r in zip(got, ref):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), r, rtol=0, atol=4 * torch.finfo(dtype).eps * r.abs().max().item())


def test_tiny_prior_trained_with_sparse_loads_and_decodes_with_dense():
    """A tiny prior trained for a few steps with `sparse` gives the same logits with `dense` once its
    weights are loaded there, and KV-cached decoding (the mask's rows) reproduces the full pass."""
    cfg = dataclasses.replace(get_preset("tiny").prior, attention_backend="sparse")
    torch.manual_seed(0)
    model = Prior(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    text = torch.randint(1, cfg.text_vocab_size, (2, cfg.text_len), generator=gen)
    image = torch.randint(0, cfg.image_vocab_size, (2, cfg.image_len), generator=gen)
    for _ in range(3):
        loss, _ = model(text, image)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    dense_model = Prior(dataclasses.replace(cfg, attention_backend="dense")).eval()
    dense_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        t_s, i_s = model.logits(text, image)
        t_d, i_d = dense_model.logits(text, image)
        torch.testing.assert_close(t_s, t_d, rtol=0, atol=1e-5)
        torch.testing.assert_close(i_s, i_d, rtol=0, atol=1e-5)
        cache = dense_model.init_cache(2)
        steps = [dense_model.prefill(text, cache)]
        for r in range(cfg.image_len - 1):
            steps.append(dense_model.decode_step(image[:, r], cache))
        torch.testing.assert_close(torch.stack(steps, dim=1), i_s, rtol=0, atol=1e-5)


def test_auto_backend_is_sparse_on_cpu_and_default():
    """`auto` (the default backend) resolves to the sparse path on a machine without a GPU."""
    from dalle_ds.attention import BACKENDS, get_backend
    from dalle_ds.config import PriorConfig

    assert PriorConfig().attention_backend == "auto"
    if not torch.cuda.is_available():
        assert get_backend("auto") is BACKENDS["sparse"]


def test_auto_backend_matrix_and_a_missing_triton_on_an_sm80_gpu_is_an_error():
    """`auto`: sparse on CPU and below sm80 (V100, T4), triton on sm80+; there, a Triton that cannot run
    raises naming the two fixes instead of quietly running the slower path."""
    from dalle_ds.attention import choose_auto

    assert choose_auto(False, None, "no GPU") == "sparse"
    assert choose_auto(True, (7, 0), "sm70") == choose_auto(True, (7, 5), None) == "sparse"
    assert choose_auto(True, (8, 0), None) == choose_auto(True, (9, 0), None) == "triton"
    with pytest.raises(ValueError, match=r"sm90.*not installed.*pip install -e \..*attention_backend=sparse"):
        choose_auto(True, (9, 0), "the triton package is not installed")
