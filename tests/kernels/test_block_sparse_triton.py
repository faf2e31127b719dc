"""The Triton block-sparse attention kernels (kernels/block_sparse_attention.py): outputs and dQ/dK/dV
against a float64 reference on fresh random inputs, for every layout, T = 256-like and awkward T.

Without a GPU the kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 is set here, before
anything defines a kernel (the kernel module imports Triton and defines its kernels lazily, at the first
call). The interpreter's bf16 `tl.dot` is broken, so fp32 and fp16 are checked here, bf16 only on a GPU.
"""

import os

import torch
from helpers import layout_id, run_with_grads

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import dataclasses  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

from dalle_ds import attention  # noqa: E402
from dalle_ds.attention.layout import layout_on  # noqa: E402
from dalle_ds.attention.masks import MaskSpec, dense_mask  # noqa: E402
from dalle_ds.config import get_preset  # noqa: E402
from dalle_ds.kernels import block_sparse_attention as bsa  # noqa: E402
from dalle_ds.kernels.reference import reference_attention  # noqa: E402
from dalle_ds.prior.model import Prior  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not bsa.interpreting() else "cpu")
LAYOUTS = [("row", False), ("column", False), ("column", True), ("conv", False), ("causal", False)]
SHAPES = [(256, 8, 5, 32), (77, 8, 5, 32), (13, 4, 3, 16)]  # (T, G, K, block)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


@pytest.fixture(autouse=True, scope="module")
def _triton_backend():
    """The "triton" backend runs here: a GPU, or the interpreter this module switched on."""
    assert bsa.usable()
    yield


pytestmark = pytest.mark.usefixtures("one_thread")


def inputs(L, dtype, B=1, H=2, D=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=gen).to(device=DEVICE, dtype=dtype) for _ in range(4)]


def assert_within_2x_baseline(got, base, want, dtype):
    """Each of out, dq, dk, dv: max error vs float64 at most 2x that of plain PyTorch attention computed
    in the same precision, plus four ulps of the tensor's scale: at tiny sizes both errors are a few ulps and
    their ratio depends on the CPU's summation order (an AVX-only CPU measured 3.1x at 1e-6)."""
    eps = 4 * torch.finfo(dtype).eps
    for name, a, b, w in zip(("out", "dq", "dk", "dv"), got, base, want):
        err = (a.double() - w).abs().max().item()
        berr = (b.double() - w).abs().max().item()
        assert err <= 2 * berr + eps * w.abs().max().item(), f"{name}: error {err:.3g} vs baseline {berr:.3g}"


def check_against_reference(spec, permuted, block, dtype, **kw):
    lay = layout_on(spec, DEVICE, block, permuted=permuted)
    L = spec.seq_len
    mask = lay.dense_element_mask()[:L, :L].to(DEVICE)
    q, k, v, g = inputs(L, dtype, **kw)
    want = run_with_grads(
        lambda a, b, c: reference_attention(a, b, c, mask), q.double(), k.double(), v.double(), g.double()
    )
    base = run_with_grads(lambda a, b, c: reference_attention(a, b, c, mask, dtype=dtype), q, k, v, g)
    got = run_with_grads(lambda a, b, c: bsa.block_sparse_attention(a, b, c, lay), q, k, v, g)
    for t in got:
        assert t.dtype == dtype
    assert_within_2x_baseline(got, base, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s[0]}G{s[1]}b{s[3]}")
def test_output_and_grads_match_float64_reference(shape, layout, dtype):
    """Forward and backward kernels: out, dQ, dK, dV within 2x plain PyTorch attention's error (same
    dtype) of a float64 reference. Covers full, partial and empty tiles, padded keys (T = 77, 13) and
    text position 0, which sees only itself."""
    (T, G, K, block), (kind, permuted) = shape, layout
    check_against_reference(MaskSpec(kind, T, G, K), permuted, block, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
@pytest.mark.parametrize("T", [256, 77])
def test_output_and_grads_match_float64_reference_paper_grid(T, layout, dtype):
    """The same at a 32x32 image grid (L = T + 1024) with 32-token tiles."""
    kind, permuted = layout
    check_against_reference(MaskSpec(kind, T, 32, 11), permuted, 32, dtype, H=1)


@pytest.mark.parametrize("blocks", [(64, 64), (64, 32), (32, 64)])
def test_rectangular_and_large_tiles(blocks):
    """block_q != block_k and 64-token tiles (the GPU default) give the same result."""
    lay = layout_on(MaskSpec("conv", 77, 8, 5), DEVICE, *blocks)
    L = lay.seq_len
    q, k, v, g = inputs(L, torch.float32)
    want = run_with_grads(lambda a, b, c: bsa.reference(a, b, c, lay), q.double(), k.double(), v.double(), g.double())
    got = run_with_grads(lambda a, b, c: bsa.block_sparse_attention(a, b, c, lay), q, k, v, g)
    for a, w in zip(got, want):
        torch.testing.assert_close(a.double(), w, rtol=0, atol=2e-5)


def test_head_dim_that_is_not_a_power_of_two():
    """Head size 24 is padded to 32 inside the kernel (masked loads) and gives the right answer."""
    lay = layout_on(MaskSpec("row", 13, 4, 3), DEVICE, 16)
    q, k, v, g = inputs(lay.seq_len, torch.float32, D=24)
    want = run_with_grads(lambda a, b, c: bsa.reference(a, b, c, lay), q.double(), k.double(), v.double(), g.double())
    got = run_with_grads(lambda a, b, c: bsa.block_sparse_attention(a, b, c, lay), q, k, v, g)
    for a, w in zip(got, want):
        torch.testing.assert_close(a.double(), w, rtol=0, atol=2e-5)


def test_rows_that_see_only_themselves_return_their_value():
    """With no text, the column layer's whole first image row (a diagonal-only tile) sees only itself:
    the kernel returns exactly those value rows."""
    spec = MaskSpec("column", 0, 16, 3)
    alone = (dense_mask(spec).sum(dim=1) == 1).to(DEVICE)
    q, k, v, _ = inputs(spec.seq_len, torch.float32)
    out = attention.attend(q, k, v, spec, backend="triton")
    assert alone.sum() == 16
    torch.testing.assert_close(out[:, :, alone], v[:, :, alone], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["row", "column", "conv", "causal"])
def test_backend_equals_sparse_and_dense_backends(kind):
    """attend(backend="triton") (column layer transposed) equals the sparse and dense backends."""
    spec = MaskSpec(kind, 77, 8, 5)
    q, k, v, g = inputs(spec.seq_len, torch.float32)
    tri = run_with_grads(lambda a, b, c: attention.attend(a, b, c, spec, backend="triton"), q, k, v, g)
    for other in ("sparse", "dense"):
        ref = run_with_grads(lambda a, b, c: attention.attend(a, b, c, spec, backend=other), q, k, v, g)
        for a, b in zip(tri, ref):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_tiny_prior_gives_the_same_logits_with_every_backend():
    """One set of weights (trained a few steps with dense) gives the same logits and loss gradients with
    the dense, sparse and triton backends: weights never depend on the backend."""
    cfg = get_preset("tiny").prior
    torch.manual_seed(0)
    model = Prior(cfg).to(DEVICE)
    gen = torch.Generator().manual_seed(1)
    text = torch.randint(1, cfg.text_vocab_size, (2, cfg.text_len), generator=gen).to(DEVICE)
    image = torch.randint(0, cfg.image_vocab_size, (2, cfg.image_len), generator=gen).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        loss, _ = model(text, image)
        opt.zero_grad()
        loss.backward()
        opt.step()
    results = {}
    for name in ("dense", "sparse", "triton"):
        model.set_attention_backend(name)
        model.zero_grad()
        loss, _ = model(text, image)
        loss.backward()
        with torch.no_grad():
            logits = torch.cat([t.flatten() for t in model.logits(text, image)])
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results[name] = (logits, grads)
    for name in ("sparse", "triton"):
        torch.testing.assert_close(results[name][0], results["dense"][0], rtol=0, atol=1e-5)
        torch.testing.assert_close(results[name][1], results["dense"][1], rtol=0, atol=1e-5)
    restored = Prior(dataclasses.replace(cfg, attention_backend="triton")).to(DEVICE)
    restored.load_state_dict(model.state_dict())
    with torch.no_grad():
        again = torch.cat([t.flatten() for t in restored.logits(text, image)])
    torch.testing.assert_close(again, results["dense"][0], rtol=0, atol=1e-5)


def test_interpreter_gets_one_autotune_config():
    """Under TRITON_INTERPRET=1 each kernel is autotuned over a single config (several fail there)."""
    if not bsa.interpreting():
        pytest.skip("compiled kernels on a GPU")
    assert len(bsa._configs()) == 1


def test_bad_inputs_are_refused():
    """float64 inputs, a length that does not match the layout, and tiles under 16 raise ValueError."""
    lay = layout_on(MaskSpec("row", 13, 4, 3), DEVICE, 16)
    q = torch.zeros(1, 1, lay.seq_len, 16, device=DEVICE)
    with pytest.raises(ValueError, match="must share one of"):
        bsa.block_sparse_attention(q.double(), q.double(), q.double(), lay)
    with pytest.raises(ValueError, match="does not match"):
        bsa.block_sparse_attention(q[:, :, :-1], q[:, :, :-1], q[:, :, :-1], lay)
    with pytest.raises(ValueError, match="at least 16"):
        bsa.block_sparse_attention(q, q, q, layout_on(MaskSpec("row", 13, 4, 3), DEVICE, 8))
