"""KV-cached decoding equals the full pass; sampling paths agree; priming; top-k / nucleus filtering."""

import dataclasses
import math

import pytest
import torch

from dalle_ds.attention.masks import layer_kinds
from dalle_ds.config import PriorConfig, get_preset
from dalle_ds.prior.model import Prior
from dalle_ds.sampling.decode import filter_logits, sample_image_tokens

pytestmark = pytest.mark.usefixtures("one_thread")


def all_kinds_cfg() -> PriorConfig:
    """Every layer kind (row, column, conv; causal added below), text 7, grid 5, conv 3, 5 layers."""
    return PriorConfig(
        text_len=7,
        text_vocab_size=50,
        image_grid=5,
        image_vocab_size=24,
        d_model=32,
        n_layers=5,
        n_heads=4,
        conv_kernel=3,
    )


CONFIGS = {
    "tiny": lambda: get_preset("tiny").prior,
    "all_kinds_t7_g5": all_kinds_cfg,
    "shapes_shape": lambda: dataclasses.replace(get_preset("shapes").prior, d_model=48, n_heads=4, n_layers=3),
}


def make(cfg, seed=0, causal_layer=None):
    torch.manual_seed(seed)
    model = Prior(cfg).eval()
    if causal_layer is not None:  # the schedule never uses "causal"; switch one layer to cover it
        attn = model.blocks[causal_layer].attn_branch.attn
        attn.spec = dataclasses.replace(attn.spec, kind="causal")
    return model


def random_inputs(cfg, B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, cfg.text_vocab_size, (B, cfg.text_len), generator=g)
    text[0, cfg.text_len // 2 :] = 0  # one caption with pads
    image = torch.randint(0, cfg.image_vocab_size, (B, cfg.image_len), generator=g)
    return text, image


def cached_image_logits(model, text, image, m=0):
    """Logits of image tokens m..N-1 from prefill(text, image[:, :m]) + one decode_step per token."""
    cache = model.init_cache(text.shape[0])
    out = [model.prefill(text, cache, image[:, :m])]
    for r in range(m, model.image_len - 1):
        out.append(model.decode_step(image[:, r], cache))
    return torch.stack(out, dim=1)  # (B, N - m, Vi)


def test_all_kinds_config_covers_every_kind():
    """The test config's schedule has row, column and conv layers (causal is switched in by hand)."""
    assert set(layer_kinds(all_kinds_cfg().n_layers)) == {"row", "column", "conv"}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_decode_matches_full_pass(name):
    """prefill + decode_step give the full pass's logits at every image position (fp32, atol 1e-5)."""
    cfg = CONFIGS[name]()
    model = make(cfg)
    text, image = random_inputs(cfg)
    with torch.no_grad():
        _, full = model.logits(text, image)
        cached = cached_image_logits(model, text, image)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_cached_decode_matches_full_pass_with_causal_layer():
    """The same holds when one layer uses the plain causal mask."""
    cfg = all_kinds_cfg()
    model = make(cfg, causal_layer=2)
    text, image = random_inputs(cfg)
    with torch.no_grad():
        _, full = model.logits(text, image)
        cached = cached_image_logits(model, text, image)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("m", [1, 5, 12])
def test_prefill_with_image_prefix_matches_full_pass(m):
    """Prefilling text + the first m image tokens (image-to-image) gives the full pass's logits after it."""
    cfg = all_kinds_cfg()
    model = make(cfg)
    text, image = random_inputs(cfg)
    with torch.no_grad():
        _, full = model.logits(text, image)
        cached = cached_image_logits(model, text, image, m=m)
    torch.testing.assert_close(cached, full[:, m:], atol=1e-5, rtol=1e-5)


def test_decode_step_refuses_a_full_cache():
    """After the last image position, decode_step raises instead of writing past the cache."""
    cfg = get_preset("tiny").prior
    model = make(cfg)
    text, image = random_inputs(cfg)
    with torch.no_grad():
        cache = model.init_cache(2)
        model.prefill(text, cache, image[:, :-1])
        with pytest.raises(ValueError, match="full"):
            model.decode_step(image[:, -1], cache)


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.7, top_k=5), dict(top_p=0.8)])
def test_sampling_with_and_without_cache_gives_same_tokens(kw):
    """With the same generator seed the cached and the full-forward paths sample identical tokens."""
    cfg = all_kinds_cfg()
    model = make(cfg)
    text, _ = random_inputs(cfg)
    a = sample_image_tokens(model, text, generator=torch.Generator().manual_seed(3), use_cache=True, **kw)
    b = sample_image_tokens(model, text, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
    assert a.shape == (2, cfg.image_len) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) < cfg.image_vocab_size


def test_priming_keeps_the_primed_tokens():
    """Image-to-image: the first m tokens are the prime, both paths agree on the rest."""
    cfg = all_kinds_cfg()
    model = make(cfg)
    text, image = random_inputs(cfg)
    prime = image[:, : 2 * cfg.image_grid]  # the top two rows
    a = sample_image_tokens(model, text, prime=prime, generator=torch.Generator().manual_seed(4))
    b = sample_image_tokens(model, text, prime=prime, generator=torch.Generator().manual_seed(4), use_cache=False)
    assert torch.equal(a[:, : prime.shape[1]], prime)
    assert torch.equal(a, b)


def test_sampling_restores_training_mode():
    """sample_image_tokens runs in eval mode and leaves the module's training flag as it found it."""
    cfg = get_preset("tiny").prior
    model = make(cfg).train()
    text, _ = random_inputs(cfg)
    sample_image_tokens(model, text, generator=torch.Generator().manual_seed(0))
    assert model.training


def test_filter_logits_top_k():
    """top_k 2 keeps the two largest logits and sets the rest to -inf; top_k 0 is off."""
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5], [0.0, -1.0, 4.0, 5.0]])
    out = filter_logits(logits, top_k=2)
    inf = float("-inf")
    assert torch.equal(out, torch.tensor([[inf, 3.0, 2.0, inf], [inf, inf, 4.0, 5.0]]))
    assert torch.equal(filter_logits(logits, top_k=0), logits)


def test_filter_logits_top_p():
    """Probabilities (0.5, 0.3, 0.15, 0.05): top_p 0.7 keeps {0.5, 0.3}; 0.85 adds 0.15; 0.4 keeps only 0.5."""
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    logits = probs.log()[None]
    inf = float("-inf")
    keep = lambda p: torch.isfinite(filter_logits(logits, top_p=p))[0].tolist()  # noqa: E731
    assert keep(0.7) == [False, True, False, True]
    assert keep(0.85) == [True, True, False, True]
    assert keep(0.4) == [False, True, False, False]
    assert keep(1.0) == [True] * 4
    out = filter_logits(logits, top_p=0.7)
    assert out[0, 0] == inf and math.isclose(out[0, 1].item(), math.log(0.5), rel_tol=1e-6)


def test_filter_logits_top_k_and_top_p_keep_at_least_one():
    """A tiny nucleus still keeps the most likely token; top_k 1 with top_p is the argmax."""
    logits = torch.tensor([[0.1, 0.2, 5.0, 0.3]])
    assert torch.isfinite(filter_logits(logits, top_p=1e-6)).sum() == 1
    out = filter_logits(logits, top_k=1, top_p=0.5)
    assert torch.isfinite(out).tolist() == [[False, False, True, False]]
