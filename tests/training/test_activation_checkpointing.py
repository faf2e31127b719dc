"""Activation checkpointing of resblocks every N layers: same gradients, layers recomputed, cache path untouched."""

import copy

import torch

from dalle_ds.config import load_config
from dalle_ds.prior.model import Prior
from dalle_ds.training import activation_checkpointing
from dalle_ds.training.grad_scaling import ResblockGradScaler, ScalingPolicy, prior_blocks


def _setup():
    cfg = load_config("tiny", overrides=["prior.n_layers=4"])
    torch.manual_seed(0)
    p = cfg.prior
    text = torch.randint(1, p.text_vocab_size, (2, p.text_len))
    image = torch.randint(0, p.image_vocab_size, (2, p.image_len))
    return Prior(p), text, image


def test_checkpointing_every_2_gives_identical_gradients_and_recomputes():
    """Layers 0 and 2 run their forward twice (forward + recompute), layers 1 and 3 once; every gradient is
    bit-identical to the run without checkpointing, also with per-resblock scaling hooks attached. (Counted
    with pre-hooks: non-reentrant recomputation stops early, so post-forward hooks do not rerun; the scale and
    filter Functions live in the original graph, which backward still uses.)"""
    base, text, image = _setup()
    ref, ck = copy.deepcopy(base), copy.deepcopy(base)
    assert activation_checkpointing.apply(ck, 2) == [0, 2]
    for m in (ref, ck):
        ResblockGradScaler(prior_blocks(m), ScalingPolicy(init_log2=3, min_log2=0))
    calls = [0] * 4
    for i, layer in enumerate(ck.blocks):
        layer.mlp_branch.register_forward_pre_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    ref(text, image)[0].backward()
    ck(text, image)[0].backward()
    assert calls == [2, 1, 2, 1]
    for (n, a), b in zip(ref.named_parameters(), ck.parameters()):
        assert torch.equal(a.grad, b.grad), n
    activation_checkpointing.remove(ck)
    assert activation_checkpointing.apply(ck, 0) == []


def test_filter_still_works_in_checkpointed_layers():
    """An injected NaN in a checkpointed block is caught: all gradients finite, that block flagged."""
    import math

    m, text, image = _setup()
    activation_checkpointing.apply(m, 1)
    s = ResblockGradScaler(prior_blocks(m), ScalingPolicy(init_log2=3, min_log2=0))
    s.inject = {2: ("activation", math.nan)}
    m(text, image)[0].backward()
    assert all(p.grad.isfinite().all() for p in m.parameters())
    assert s.nonfinite_blocks() == [2]


def test_kv_cache_path_bypasses_checkpointing():
    base, text, _ = _setup()
    ck = copy.deepcopy(base)
    activation_checkpointing.apply(ck, 1)
    with torch.no_grad():
        a = base.prefill(text, base.init_cache(2))
        b = ck.prefill(text, ck.init_cache(2))
    assert torch.equal(a, b)
