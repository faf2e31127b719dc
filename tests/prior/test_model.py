"""The stage-2 prior: shapes, loss, per-slot pads, masks end to end, gradients (CPU, tiny sizes)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dalle_ds import attention
from dalle_ds.attention.masks import MaskSpec, dense_mask, layer_kinds
from dalle_ds.config import get_preset
from dalle_ds.prior.model import Prior

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_prior_cfg(**kw):
    return dataclasses.replace(get_preset("tiny").prior, **kw)


def make(cfg, seed=0):
    torch.manual_seed(seed)
    return Prior(cfg).eval()


def random_batch(cfg, B=2, caption_lens=(5, 9), seed=1):
    """Tokenizer-style text (ids >= 1, pad 0 after each caption) and random image tokens."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, cfg.text_vocab_size, (B, cfg.text_len), generator=g)
    for b, n in enumerate(caption_lens[:B]):
        text[b, n:] = 0
    image = torch.randint(0, cfg.image_vocab_size, (B, cfg.image_len), generator=g)
    return text, image


def test_logit_shapes_and_dtype():
    """logits(): text (B, T, Vt + T) and image (B, N, Vi), both fp32."""
    cfg = tiny_prior_cfg()
    text, image = random_batch(cfg)
    tl, il = make(cfg).logits(text, image)
    assert tl.shape == (2, cfg.text_len, cfg.text_vocab_size + cfg.text_len)
    assert il.shape == (2, cfg.image_len, cfg.image_vocab_size)
    assert tl.dtype == il.dtype == torch.float32


def test_loss_is_weighted_sum_of_text_and_image_ce():
    """loss = 1/8 CE_text (pads included, remapped targets) + 7/8 CE_image, each a mean over its positions."""
    cfg = tiny_prior_cfg()
    text, image = random_batch(cfg)
    model = make(cfg)
    loss, parts = model(text, image)
    tl, il = model.logits(text, image)
    slots = torch.arange(cfg.text_len)
    target_text = torch.where(text == 0, cfg.text_vocab_size + slots, text)
    ce_t = F.cross_entropy(tl.reshape(-1, tl.shape[-1]), target_text.reshape(-1))
    ce_i = F.cross_entropy(il.reshape(-1, il.shape[-1]), image.reshape(-1))
    torch.testing.assert_close(parts["loss_text"], ce_t)
    torch.testing.assert_close(parts["loss_image"], ce_i)
    torch.testing.assert_close(loss, ce_t / 8 + 7 * ce_i / 8)
    assert not parts["loss_text"].requires_grad and not parts["loss_image"].requires_grad


def test_pad_in_slot_p_becomes_id_vocab_plus_p():
    """remap_pads: a pad (0) in slot p becomes text_vocab_size + p; real tokens are kept; idempotent."""
    cfg = tiny_prior_cfg()
    model = make(cfg)
    text, _ = random_batch(cfg)
    ids = model.remap_pads(text)
    for b, n in enumerate((5, 9)):
        assert torch.equal(ids[b, :n], text[b, :n])
        assert ids[b, n:].tolist() == [cfg.text_vocab_size + p for p in range(n, cfg.text_len)]
    assert torch.equal(model.remap_pads(ids), ids)


def test_pads_in_different_slots_use_different_embeddings():
    """Captions padded from different slots train exactly the pad rows of their own slots."""
    cfg = tiny_prior_cfg()
    model = make(cfg).train()
    text, image = random_batch(cfg, caption_lens=(5, 9))
    loss, _ = model(text, image)
    loss.backward()
    row_used = model.tok_emb.weight.grad.abs().sum(1) > 0  # (Vt + T,)
    Vt, T = cfg.text_vocab_size, cfg.text_len
    assert row_used[Vt + 5 : Vt + T].all()  # pads of slots 5.. (caption 0) and 9.. (caption 1)
    assert not row_used[Vt : Vt + 5].any()  # no caption has a pad before slot 5
    assert not row_used[0]  # the raw pad id 0 is never looked up
    # the pad embedding of slot 5 is an input of caption 0 (pad there) only, not of caption 1 (real token)
    tl, il = model.logits(text, image)
    with torch.no_grad():
        model.tok_emb.weight[Vt + 5] += 1.0
    tl2, il2 = model.logits(text, image)
    assert not torch.allclose(il[0], il2[0]) and torch.equal(il[1], il2[1])


def test_head_slices_are_separate():
    """Changing the image rows of the output projection never changes text logits, and vice versa."""
    cfg = tiny_prior_cfg()
    model = make(cfg)
    text, image = random_batch(cfg)
    tl, il = model.logits(text, image)
    Vt = cfg.text_vocab_size + cfg.text_len
    with torch.no_grad():
        model.head.weight[Vt:] += 1.0
    tl2, il2 = model.logits(text, image)
    assert torch.equal(tl, tl2) and not torch.allclose(il, il2)
    with torch.no_grad():
        model.head.weight[:Vt] += 1.0
    tl3, il3 = model.logits(text, image)
    assert torch.equal(il2, il3) and not torch.allclose(tl2, tl3)


def test_tied_head_is_the_embeddings_and_learns_through_both_uses():
    """With tie_embeddings the logits are h @ E^T + bias for the text (tok_emb) and image (img_tok_emb)
    tables, against an independent recomputation from the final hidden states; the loss gradient of
    each table is the sum of its input-side and output-side parts; there is no separate head matrix."""
    cfg = tiny_prior_cfg(tie_embeddings=True)
    model = make(cfg)
    assert not hasattr(model, "head")
    untied = Prior(tiny_prior_cfg())
    Vt = cfg.text_vocab_size + cfg.text_len
    assert untied.num_params() - model.num_params() == (Vt + cfg.image_vocab_size) * cfg.d_model
    text, image = random_batch(cfg)
    with torch.no_grad():
        model.head_bias.normal_()
    tl, il = model.logits(text, image)
    h = model._trunk(model._embed_prefix(text, image[:, :-1])).double()  # (B, T + N, D)
    T = cfg.text_len
    ref_t = h[:, :T] @ model.tok_emb.weight.double().T + model.head_bias[:Vt].double()
    ref_i = h[:, T:] @ model.img_tok_emb.weight.double().T + model.head_bias[Vt:].double()
    torch.testing.assert_close(tl.double(), ref_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(il.double(), ref_i, rtol=1e-5, atol=1e-5)

    # output-side gradient of the image table alone: d loss / d E_img through the logits only
    model.zero_grad()
    loss, _ = model(text, image)
    loss.backward()
    full = model.img_tok_emb.weight.grad.clone()
    with torch.no_grad():
        hi = model._trunk(model._embed_prefix(text, image[:, :-1]))[:, T:]  # (B, N, D)
    w = model.img_tok_emb.weight.detach().clone().requires_grad_()
    out = F.cross_entropy((hi.float() @ w.T + model.head_bias[Vt:].detach()).flatten(0, 1), image.flatten())
    (g_out,) = torch.autograd.grad((1 - cfg.text_loss_weight) * out, w)
    assert g_out.abs().sum() > 0 and not torch.allclose(full, g_out)  # the input side adds its own part
    used = torch.zeros(cfg.image_vocab_size, dtype=torch.bool)
    used[image[:, :-1].flatten()] = True  # rows never read as inputs
    torch.testing.assert_close(full[~used], g_out[~used], rtol=1e-4, atol=1e-7)


def test_changing_image_token_never_changes_earlier_positions():
    """Image token r (input position T + r + 1) cannot change any logit at positions <= T + r."""
    cfg = tiny_prior_cfg()
    model = make(cfg)
    text, image = random_batch(cfg)
    tl, il = model.logits(text, image)
    for r in (0, 5, cfg.image_len - 2):
        image2 = image.clone()
        image2[:, r] = (image[:, r] + 1) % cfg.image_vocab_size
        tl2, il2 = model.logits(text, image2)
        assert torch.equal(tl, tl2)
        assert torch.equal(il[:, : r + 1], il2[:, : r + 1])
        assert not torch.equal(il[:, r + 1 :], il2[:, r + 1 :])


def test_changing_text_token_never_changes_earlier_text_logits():
    """Text slot p (input position p + 1) cannot change text logits at positions <= p."""
    cfg = tiny_prior_cfg()
    model = make(cfg)
    text, image = random_batch(cfg)
    tl, il = model.logits(text, image)
    for p in (0, 3, cfg.text_len - 1):
        text2 = text.clone()
        text2[:, p] = text[:, p] % (cfg.text_vocab_size - 1) + 1
        tl2, il2 = model.logits(text2, image)
        assert torch.equal(tl[:, : p + 1], tl2[:, : p + 1])
        assert not torch.equal(il, il2)  # every image position sees all text


@pytest.mark.parametrize("n_layers", [1, 2, 4])
def test_outputs_depend_exactly_on_inputs_the_layer_stack_reaches(n_layers):
    """Position i's logits change when input position j changes iff the composed masks of all layers
    connect i to j (boolean product of the per-layer masks, diagonal included)."""
    cfg = tiny_prior_cfg(n_layers=n_layers, text_len=5, image_grid=5, conv_kernel=3)
    T, L = cfg.text_len, cfg.seq_len
    reach = torch.eye(L, dtype=torch.bool)
    for kind in layer_kinds(n_layers):
        m = dense_mask(MaskSpec(kind, T, cfg.image_grid, cfg.conv_kernel)).int()
        reach = (m @ reach.int()) > 0  # (L, L): output position i <- input position j
    if n_layers <= 2:  # with 3+ layers every earlier position is reached; with 1-2 the masks show
        assert (~reach & torch.tril(torch.ones(L, L, dtype=torch.bool))).any()

    model = make(cfg)
    text, image = random_batch(cfg, caption_lens=(3, 5))
    tl, il = model.logits(text, image)
    for j in [1, 3, T, T + 1, T + 7, T + 13, L - 1]:  # input positions (0 is BOS)
        text2, image2 = text.clone(), image.clone()
        if j <= T:
            text2[:, j - 1] = text[:, j - 1] % (cfg.text_vocab_size - 1) + 1
        else:
            r = j - T - 1
            image2[:, r] = (image[:, r] + 1) % cfg.image_vocab_size
        tl2, il2 = model.logits(text2, image2)
        changed = torch.cat([(tl != tl2).any(-1), (il != il2).any(-1)], dim=1).any(0)  # (L,)
        assert torch.equal(changed, reach[:, j]), f"input position {j}"


def test_backward_reaches_every_parameter():
    """One backward pass gives every parameter a finite, non-zero gradient."""
    cfg = tiny_prior_cfg()
    model = make(cfg).train()
    text, image = random_batch(cfg)
    loss, _ = model(text, image)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_branches_are_separate_submodules():
    """Each layer exposes attn_branch and mlp_branch, each with its own LayerNorm (for per-resblock wrapping)."""
    model = make(tiny_prior_cfg())
    kinds = [layer.attn_branch.attn.spec.kind for layer in model.blocks]
    assert kinds == layer_kinds(model.cfg.n_layers)
    for layer in model.blocks:
        assert isinstance(layer.attn_branch.ln, torch.nn.LayerNorm)
        assert isinstance(layer.mlp_branch.ln, torch.nn.LayerNorm)


def test_unknown_attention_backend_is_refused():
    """attend() and Prior() raise a ValueError naming the available backends for an unknown backend."""
    spec = MaskSpec("row", 3, 2)
    q = torch.randn(1, 1, spec.seq_len, 4)
    with pytest.raises(ValueError, match="available backends: .*dense"):
        attention.attend(q, q, q, spec, backend="nope")
    with pytest.raises(ValueError, match="nope"):
        Prior(tiny_prior_cfg(attention_backend="nope"))


def test_dense_backend_is_masked_softmax():
    """The dense backend equals softmax(q k^T / sqrt(D) with disallowed keys at -inf) v."""
    spec = MaskSpec("conv", 5, 3, 3)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, spec.seq_len, 8, generator=g, dtype=torch.float64) for _ in range(3))
    m = dense_mask(spec)
    s = (q @ k.transpose(-1, -2)) / 8**0.5
    ref = torch.softmax(s.masked_fill(~m, float("-inf")), -1) @ v
    torch.testing.assert_close(attention.attend(q, k, v, spec), ref)
