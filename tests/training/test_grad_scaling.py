"""Per-resblock gradient scaling (PAPER §4.2): exact when nothing overflows, the inf/NaN filter, the policy,
and the fp16 underflow experiment that motivates it."""

import copy
import math

import pytest
import torch

from dalle_ds.config import load_config
from dalle_ds.prior.model import Prior
from dalle_ds.training.grad_scaling import ResblockGradScaler, ScalingPolicy, prior_blocks, scaler_for
from dalle_ds.training.step_pipeline import StepPipeline


def _cfg():
    return load_config("tiny", overrides=["tokenizer.bpe_dropout=0"])


def _batches(cfg, n, micro=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = cfg.prior
    return [
        (
            torch.randint(1, p.text_vocab_size, (micro, p.text_len), generator=g),
            torch.randint(0, p.image_vocab_size, (micro, p.image_len), generator=g),
        )
        for _ in range(n)
    ]


def _engine(model, stage):
    from dalle_ds.training.distributed import init_distributed
    from dalle_ds.training.engine import build_engine

    init_distributed()
    ds = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 4.0,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    if stage == 3:
        ds["zero_optimization"].update(
            stage3_param_persistence_threshold=0, overlap_comm=False, contiguous_gradients=False
        )
    return build_engine(model, ds, lr=1e-3, betas=(0.9, 0.96), eps=1e-8, weight_decay=0.045, lr_lambda=lambda s: 1.0)


def _full_params(engine):
    from dalle_ds.training.checkpoint import gathered_state_dict

    return gathered_state_dict(engine.module)


def _train(engine, batches, inject=None, scaler=None):
    """Train on `batches`; with a scaler, through a step pipeline that holds it."""
    losses = []
    steps = StepPipeline(engine, [scaler] if scaler is not None else [])
    for i, (text, image) in enumerate(batches):
        if scaler is not None:
            scaler.inject = dict(inject[i]) if inject and i in inject else {}
        loss, _ = engine(text, image)
        engine.backward(loss)
        steps.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_pow2_scaling_is_bit_identical_in_fp32(stage):
    """With power-of-two scales that change during the run (2^6, doubling every step) and no faults, fp32
    training gives bit-identical parameters to the same run without scaling (ZeRO-0, ZeRO-2 and ZeRO-3)."""
    cfg = _cfg()
    torch.manual_seed(0)
    base = Prior(cfg.prior)
    batches = _batches(cfg, 4)
    plain = _engine(copy.deepcopy(base), stage)
    scaled = _engine(copy.deepcopy(base), stage)
    scaler = scaler_for(scaled, scaled.module, ScalingPolicy(mode="pow2", init_log2=6, min_log2=0, growth_interval=1))
    l_plain, l_scaled = _train(plain, batches), _train(scaled, batches, scaler=scaler)
    assert l_plain == l_scaled
    a, b = _full_params(plain), _full_params(scaled)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.mlp_branch.fc.weight"], base.state_dict()["blocks.0.mlp_branch.fc.weight"])
    assert scaler.scales == [2.0**10] * 2 * cfg.prior.n_layers  # grew every clean step
    # and the scale really reached the branch: a scaler with unscaling disabled changes the gradients
    m = copy.deepcopy(base)
    s = ResblockGradScaler(prior_blocks(m), ScalingPolicy(init_log2=6, min_log2=0), unscale_params="defer")
    m(*batches[0])[0].backward()
    ref = copy.deepcopy(base)
    ref(*batches[0])[0].backward()
    g, r = m.blocks[1].mlp_branch.fc.weight.grad, ref.blocks[1].mlp_branch.fc.weight.grad
    assert torch.allclose(g, r * 64, rtol=1e-5, atol=0) and not torch.equal(g, r)
    assert torch.equal(s.fp32_grads()[3][2], r)  # deferred unscale gives back the exact gradient


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("where,value", [("param", math.inf), ("activation", math.nan), ("activation", math.inf)])
def test_filter_confines_a_fault_to_its_block(where, value):
    """A non-finite value injected into one resblock's backward: no non-finite gradient anywhere, only that
    block is flagged and backs off; every block after it (and, for a weight-gradient fault, every other
    parameter) has exactly the clean gradient; earlier blocks stay finite."""
    cfg = _cfg()
    torch.manual_seed(0)
    base = Prior(cfg.prior)
    text, image = _batches(cfg, 1)[0]
    clean = copy.deepcopy(base)
    faulty = copy.deepcopy(base)
    pol = ScalingPolicy(mode="pow2", init_log2=4, min_log2=0, growth_interval=10**6, on_nonfinite="zero_block")
    s_clean = ResblockGradScaler(prior_blocks(clean), pol)
    s_faulty = ResblockGradScaler(prior_blocks(faulty), pol)
    k = 5  # blocks.2.mlp_branch
    s_faulty.inject = {k: (where, value)}
    clean(text, image)[0].backward()
    faulty(text, image)[0].backward()
    gc, gf = _grads(clean), _grads(faulty)
    assert all(g.isfinite().all() for g in gf.values())
    assert s_clean.nonfinite_blocks() == []
    assert s_faulty.nonfinite_blocks() == [k]
    s_faulty.update([k])
    assert s_faulty.scales[k] == 2.0**3 and all(s == 2.0**4 for i, s in enumerate(s_faulty.scales) if i != k)
    names = s_faulty.names
    for n in gc:
        owner = next((i for i, b in enumerate(names) if n.startswith(b + ".")), None)
        if owner == k:
            continue
        later = owner is not None and owner > k
        if where == "param" or later or n in ("head.weight", "head.bias", "ln_f.weight", "ln_f.bias"):
            assert torch.equal(gc[n], gf[n]), n
    if where == "activation":  # the filtered element is missing from the earlier blocks' stream gradient
        assert not torch.equal(gc["blocks.0.attn_branch.ln.weight"], gf["blocks.0.attn_branch.ln.weight"])


@pytest.mark.parametrize("stage,policy", [(0, "skip"), (2, "zero_block"), (3, "skip"), (3, "zero_block")])
def test_engine_recovers_from_an_injected_overflow(stage, policy):
    """Through the DeepSpeed engine: a NaN injected into one block on step 2 never reaches a parameter; with
    `skip` the step leaves every parameter unchanged, with `zero_block` only the other blocks move; only that
    block backs off; training goes on and later steps update the model."""
    cfg = _cfg()
    torch.manual_seed(0)
    engine = _engine(Prior(cfg.prior), stage)
    scaler = scaler_for(
        engine,
        engine.module,
        ScalingPolicy(mode="pow2", init_log2=4, min_log2=0, growth_interval=10**6, on_nonfinite=policy),
    )
    batches = _batches(cfg, 5)
    k = 2
    _train(engine, batches[:2], scaler=scaler)
    before = _full_params(engine)
    _train(engine, batches[2:3], inject={0: {k: ("activation", math.nan)}}, scaler=scaler)
    after = _full_params(engine)
    assert all(v.isfinite().all() for v in after.values())
    assert scaler.last_bad == [k]
    assert scaler.scales[k] == 2.0**3 and all(s == 2.0**4 for i, s in enumerate(scaler.scales) if i != k)
    if policy == "skip":
        assert scaler.skipped == 1
        assert all(torch.equal(before[n], after[n]) for n in before)
    else:
        assert scaler.skipped == 0
        assert not torch.equal(before["blocks.0.mlp_branch.fc.weight"], after["blocks.0.mlp_branch.fc.weight"])
    losses = _train(engine, batches[3:], scaler=scaler)
    final = _full_params(engine)
    assert all(math.isfinite(x) for x in losses) and scaler.last_bad == []
    assert not torch.equal(after["head.weight"], final["head.weight"])


def test_paper_policy_window_growth_and_clamp():
    """fp16 policy: ×2^(1/1000) per clean step, ÷√2 at most once per 125-step window, clamp [M·2^7, M·2^24],
    start M·2^13; the state round-trips through state_dict."""
    pol = ScalingPolicy(mode="paper", world=8)
    s = ResblockGradScaler([("a", torch.nn.Linear(2, 2)), ("b", torch.nn.Linear(2, 2))], pol)
    assert s.scales == [8 * 2.0**13] * 2
    s.update([0])
    assert s.scales[0] == pytest.approx(8 * 2**13 / math.sqrt(2))
    assert s.scales[1] == pytest.approx(8 * 2**13 * 2**0.001)
    for _ in range(10):
        s.update([0])  # inside the window: flagged (and skipped) but no second division
    assert s.scales[0] == pytest.approx(8 * 2**13 / math.sqrt(2))
    for _ in range(114):
        s.update([])
    s.update([0])  # step 125 after the first back-off: divides again
    assert s.scales[0] == pytest.approx(8 * 2**13 / 2 * 2 ** (114 / 1000))
    for _ in range(12000):
        s.update([])
    assert s.scales[1] == 8 * 2.0**24  # clamped
    t = ResblockGradScaler([("a", torch.nn.Linear(2, 2)), ("b", torch.nn.Linear(2, 2))], pol)
    t.load_state_dict(s.state_dict())
    assert t.scales == s.scales and t.state_dict() == s.state_dict()


# ----------------------------------------------------------------------------------------------
# The paper's claim, small: fp16 gradients of late resblocks underflow under one global loss scale


class _Branch(torch.nn.Module):
    """Pre-LN fp16 MLP branch; returns fp32 to the fp32 identity stream."""

    def __init__(self, d):
        super().__init__()
        self.ln = torch.nn.LayerNorm(d)
        self.fc = torch.nn.Linear(d, 2 * d).half()
        self.proj = torch.nn.Linear(2 * d, d).half()

    def forward(self, x):
        return self.proj(torch.nn.functional.gelu(self.fc(self.ln(x).half()))).float()


class _Stack(torch.nn.Module):
    """x_{b+1} = gain·x_b + branch_b(x_b): the stream gradient shrinks by 1/gain per block with depth."""

    def __init__(self, depth, d, gain):
        super().__init__()
        self.branches = torch.nn.ModuleList(_Branch(d) for _ in range(depth))
        self.gain = gain

    def forward(self, x):
        for b in self.branches:
            x = self.gain * x + b(x)
        return x


def underflow_experiment(depth=48, d=32, gain=2.0, batch=64, seed=0):
    """Fraction of the last quarter of blocks' fp16 parameter-gradient entries that are exactly zero while
    the fp64 reference is not: one global loss scale (the largest power of two with no overflow) vs
    per-resblock scales (dynamic: start at 2^24, halve on overflow until clean)."""
    torch.manual_seed(seed)
    model = _Stack(depth, d, gain)
    x = torch.randn(batch, d)
    r = torch.randn(batch, d)
    final_grad = 2.0**-40  # loss divided by a large global batch (PAPER §4.3)

    def loss_of(m):
        return (m(x) * r).sum() * final_grad

    ref = copy.deepcopy(model).double()
    for b in ref.branches:
        b.forward = (lambda bb: lambda z: bb.proj(torch.nn.functional.gelu(bb.fc(bb.ln(z)))))(b)
    (ref(x.double()) * r.double()).sum().mul(final_grad).backward()
    late = range(3 * depth // 4, depth)

    def flushed(grads_per_block):
        z = n = 0
        for i in late:
            for g, p in zip(grads_per_block[i], [p for p in ref.branches[i].parameters() if p.dim() == 2]):
                nz = p.grad != 0
                z += int(((g == 0) & nz).sum())
                n += int(nz.sum())
        return z / n

    def weight_grads(m):
        return [[p.grad for p in b.parameters() if p.dim() == 2] for b in m.branches]

    # one global loss scale: the largest power of two that does not overflow any fp16 gradient
    S = 2.0**40
    while True:
        m = copy.deepcopy(model)
        (loss_of(m) * S).backward()
        if all(torch.isfinite(p.grad).all() for p in m.parameters()):
            break
        S /= 2
    global_frac = flushed(weight_grads(m))
    # per-resblock scales (parameter gradients stay scaled in fp16 storage, unscaled in fp32 later)
    m = copy.deepcopy(model)
    blocks = [(f"b{i}", b) for i, b in enumerate(m.branches)]
    scaler = ResblockGradScaler(
        blocks, ScalingPolicy(mode="pow2", init_log2=50, min_log2=-24, max_log2=60), unscale_params="defer"
    )
    for _ in range(64):
        m.zero_grad()
        loss_of(m).backward()
        bad = scaler.nonfinite_blocks()
        scaler.update(bad)
        if not bad:
            break
    per_block = [
        [g for g, p in zip(gs, [p for p in b.parameters()]) if p.dim() == 2]
        for gs, b in zip(scaler.fp32_grads(), m.branches)
    ]
    per_frac = flushed([[p.grad for p in b.parameters() if p.dim() == 2] for b in m.branches])
    assert all(torch.isfinite(g).all() for gs in per_block for g in gs)
    # the same scales, but parameter gradients unscaled inside the fp16 tensor hook (unscale_params="hook", what
    # the DeepSpeed wiring did before it moved the unscale after the reduce): the stored fp16 weight gradients flush
    m2 = copy.deepcopy(model)
    s2 = ResblockGradScaler([(f"b{i}", b) for i, b in enumerate(m2.branches)], scaler.policy, unscale_params="hook")
    s2.scales = list(scaler.scales)
    loss_of(m2).backward()
    hook_frac = flushed(weight_grads(m2))
    return {
        "hook_unscaled_fp16_flushed": hook_frac,
        "global_scale_log2": math.log2(S),
        "global_flushed": global_frac,
        "per_resblock_flushed": per_frac,
        "scale_log2_first_last": (math.log2(scaler.scales[0]), math.log2(scaler.scales[-1])),
    }


def test_fp16_underflow_global_vs_per_resblock(capsys):
    """With depth-decaying gradients, one loss scale flushes most late-block fp16 weight gradients to zero;
    per-resblock scales keep them (PAPER §4.1-4.2)."""
    out = underflow_experiment()
    with capsys.disabled():
        print(f"\nfp16 underflow experiment: {out}")
    assert out["global_flushed"] > 0.5
    assert out["per_resblock_flushed"] < 0.01
    assert out["global_scale_log2"] < out["scale_log2_first_last"][1] - 20  # late blocks found far larger scales


def test_zero_block_under_zero3_zeroes_exactly_that_blocks_shards():
    """ZeRO-3, fault on the very first step with policy zero_block: the flagged block's local gradient shards
    are zeroed, so AdamW (no momentum yet) leaves its biases and gains untouched and only decays its matrices,
    while every other block moves."""
    cfg = _cfg()
    torch.manual_seed(0)
    engine = _engine(Prior(cfg.prior), 3)
    scaler = scaler_for(
        engine, engine.module, ScalingPolicy(mode="pow2", init_log2=4, min_log2=0, on_nonfinite="zero_block")
    )
    before = _full_params(engine)
    _train(engine, _batches(cfg, 1), inject={0: {3: ("activation", math.inf)}}, scaler=scaler)
    after = _full_params(engine)
    k = "blocks.1.mlp_branch."
    for n in before:
        if n.startswith(k):
            want = before[n] * (1 - 1e-3 * 0.045) if before[n].dim() >= 2 else before[n]
            assert torch.allclose(after[n], want, rtol=0, atol=1e-9), n
        elif n.startswith("blocks.") and n.endswith("weight") and before[n].dim() >= 2:
            assert (after[n] - before[n]).abs().max() > 1e-5, n
    assert scaler.last_bad == [3]


# ----------------------------------------------------------------------------------------------
# Parameter gradients stay scaled through ZeRO's reduce and are unscaled on the local shards (§5.4 step 1)


def _spy_partitions(engine, names):
    """Record, per parameter name, the reduce-scattered gradient partitions ZeRO-3 hands to partition_grads."""
    opt, seen = engine.optimizer, {}
    by_id = {id(p): n for n, p in engine.module.named_parameters() if n in names}
    original = opt.partition_grads

    def spy(params, grads):
        for p, g in zip(params, grads):
            if id(p) in by_id:
                seen.setdefault(by_id[id(p)], []).append(g.detach().clone())
        return original(params, grads)

    opt.partition_grads = spy  # instance attribute: ZeRO-3 calls self.partition_grads after each reduce
    return seen


def test_param_grads_reach_zero3_reduce_scaled_and_step_unscaled():
    """ZeRO-3 (fp32, one rank), block scale 2^20: the gradient partitions ZeRO reduces and stores, and the local
    shards just before engine.step, are exactly 2^20 times the unscaled run's; the applied updates and the
    parameters after three steps are bit-identical to the run without scaling."""
    from deepspeed.utils import safe_get_local_grad

    cfg = _cfg()
    torch.manual_seed(0)
    base = Prior(cfg.prior)
    plain, scaled = _engine(copy.deepcopy(base), 3), _engine(copy.deepcopy(base), 3)
    scaler = scaler_for(
        scaled, scaled.module, ScalingPolicy(mode="pow2", init_log2=20, min_log2=0, growth_interval=10**6)
    )
    scaled_steps = StepPipeline(scaled, [scaler])
    assert scaler.scales[3] == 2.0**20
    names = ["blocks.1.mlp_branch.fc.weight", "blocks.0.attn_branch.ln.weight", "head.weight"]
    seen_p, seen_s = _spy_partitions(plain, names), _spy_partitions(scaled, names)
    for text, image in _batches(cfg, 3):
        shards = []
        for eng in (plain, scaled):
            loss, _ = eng(text, image)
            eng.backward(loss)
            # between backward and step: the local shard ZeRO-3 stores (what step reads)
            shards.append({n: safe_get_local_grad(p).clone() for n, p in eng.module.named_parameters() if n in names})
        for n in names:
            factor = 1.0 if n == "head.weight" else 2.0**20  # the head is outside every resblock
            assert torch.equal(shards[1][n], shards[0][n] * factor), n
            assert shards[0][n].abs().max() > 0, n
        plain.step()
        scaled_steps.step()
    for n in names:
        factor = 1.0 if n == "head.weight" else 2.0**20
        assert len(seen_s[n]) == len(seen_p[n]) > 0
        assert all(torch.equal(s, p * factor) for s, p in zip(seen_s[n], seen_p[n])), n
    a, b = _full_params(plain), _full_params(scaled)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.1.mlp_branch.fc.weight"], base.state_dict()["blocks.1.mlp_branch.fc.weight"])
    assert scaler.last_bad == [] and scaler.skipped == 0


def test_two_rank_zero3_scaled_reduce_and_agreed_backoff(tmp_path):
    """`deepspeed --num_gpus 2` (CPU ranks, ZeRO-3, different data per rank): the averaged gradient partitions
    are exactly 2^20 times the unscaled run's on both ranks and the parameters stay bit-identical; an inf in
    one block's weight gradients on rank 1, which after the reduce-scatter lands in rank 0's shards only,
    makes both ranks skip the step and back off that block alone."""
    import json

    from helpers import launch_deepspeed

    launch_deepspeed(2, 29761, "run_grad_scaling_2rank.py", tmp_path, timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["params_identical"] and ranks[0]["unchanged"]  # gathered on rank 0
    for r in ranks:
        assert r["scaled_at_reduce"] and r["n_partitions"] == 3, r
        assert r["last_bad"] == [3] and r["skipped"] == 1, r
        assert r["scales_log2"][3] == 19 and all(s == 20 for i, s in enumerate(r["scales_log2"]) if i != 3)
    assert ranks[0]["scales_log2"] == ranks[1]["scales_log2"]
    assert (ranks[0]["local_bad"], ranks[1]["local_bad"]) == ([3], [])  # rank 1 learnt it from the all-reduce
