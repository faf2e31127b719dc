"""Per-resblock scales next to DeepSpeed's loss scale and optimizer offload (training/grad_scaling.py).

DeepSpeed refuses fp16 on CPU, so the global loss scale S is set here with DeepSpeed's own
`override_loss_scale` on a ZeRO-3 fp32 engine: DeepSpeed then multiplies the loss by S and divides by S in
its step, exactly as its fp16 loss scaler does; only the overflow bookkeeping of fp16 is absent. The fp16
overflow check itself (`has_overflow`, which reads the 16-bit gradient partition) is called directly."""

import copy
import math

import pytest
import torch

from dalle_ds.config import ConfigError, load_config
from dalle_ds.prior.model import Prior
from dalle_ds.training.grad_scaling import ResblockGradScaler, ScalingPolicy, scaler_for
from dalle_ds.training.step_pipeline import StepPipeline


def _cfg():
    return load_config("tiny", overrides=["tokenizer.bpe_dropout=0"])


def _batches(cfg, n, micro=4):
    g = torch.Generator().manual_seed(0)
    p = cfg.prior
    return [
        (
            torch.randint(1, p.text_vocab_size, (micro, p.text_len), generator=g),
            torch.randint(0, p.image_vocab_size, (micro, p.image_len), generator=g),
        )
        for _ in range(n)
    ]


def _engine(model, stage=3, offload=False, bf16=False):
    from dalle_ds.training.distributed import init_distributed
    from dalle_ds.training.engine import build_engine

    init_distributed()
    zero = {"stage": stage}
    if stage == 3:
        zero.update(stage3_param_persistence_threshold=0, overlap_comm=False, contiguous_gradients=False)
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 4.0, "zero_optimization": zero}
    ds["steps_per_print"] = 10**9
    if offload:  # the client AdamW on the host, as in ds_configs/cpu_zero3_offload_fp32.json
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        ds["zero_force_ds_cpu_optimizer"] = False
    if bf16:
        ds["bf16"] = {"enabled": True}
    return build_engine(model, ds, lr=1e-3, betas=(0.9, 0.96), eps=1e-8, weight_decay=0.045, lr_lambda=lambda s: 1.0)


def _params(engine):
    from dalle_ds.training.checkpoint import gathered_state_dict

    return gathered_state_dict(engine.module)


def _spy_partitions(engine, names):
    """Per parameter name, the reduce-scattered gradient partitions ZeRO-3 stores (partition_grads' input)."""
    opt, seen = engine.optimizer, {}
    by_id = {id(p): n for n, p in engine.module.named_parameters() if n in names}
    original = opt.partition_grads

    def spy(params, grads):
        for p, g in zip(params, grads):
            if id(p) in by_id:
                seen.setdefault(by_id[id(p)], []).append(g.detach().clone())
        return original(params, grads)

    opt.partition_grads = spy
    return seen


def _train(engine, batches, stages=()):
    steps = StepPipeline(engine, list(stages))
    for text, image in batches:
        loss, _ = engine(text, image)
        engine.backward(loss)
        steps.step()


def test_block_scale_replaces_the_global_loss_scale():
    """ZeRO-3 with DeepSpeed's loss scale S = 2^13 and block scales s_b = 2^20: the gradient partitions ZeRO
    reduces are exactly 2^20 x the unscaled run's inside the blocks (not S·s_b = 2^33, which overflows fp16's
    65504 long before) and 2^13 x outside them (the head); after two steps the parameters are bit-identical
    to the run with neither scale."""
    cfg = _cfg()
    torch.manual_seed(0)
    base = Prior(cfg.prior)
    plain, scaled = _engine(copy.deepcopy(base)), _engine(copy.deepcopy(base))
    scaled.optimizer.override_loss_scale(2.0**13)
    scaler = scaler_for(
        scaled, scaled.module, ScalingPolicy(mode="pow2", init_log2=20, min_log2=0, growth_interval=10**6)
    )
    assert scaler.global_scale() == 2.0**13 and scaler.branch_factor(3) == 2.0**7
    names = ["blocks.1.mlp_branch.fc.weight", "blocks.0.attn_branch.ln.weight", "head.weight"]
    seen_p, seen_s = _spy_partitions(plain, names), _spy_partitions(scaled, names)
    batches = _batches(cfg, 2)
    _train(plain, batches)
    _train(scaled, batches, [scaler])
    for n in names:
        factor = 2.0**13 if n == "head.weight" else 2.0**20
        assert len(seen_s[n]) == len(seen_p[n]) == 2
        assert all(torch.equal(s, p * factor) for s, p in zip(seen_s[n], seen_p[n])), n
        assert seen_p[n][0].abs().max() > 0
    a, b = _params(plain), _params(scaled)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert scaler.last_bad == [] and scaled.optimizer.loss_scale == 2.0**13


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_zero3_offload_zero_block_clears_what_the_overflow_check_reads(bf16):
    """ZeRO-3 + offload_optimizer, an inf injected into one block with policy zero_block: DeepSpeed's own fp16
    overflow check (`has_overflow`, reading the 16-bit partition) sees it before the scaler's stage and not
    after, because `put` writes the 16-bit partition as well as the fp32 host gradient (with
    `safe_set_local_grad` alone it still sees it). The block's biases and gains then do not move (AdamW's
    first step with a zero gradient) and its matrices only decay."""
    from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

    cfg = _cfg()
    seen = []

    class Probe:  # a stage that asks DeepSpeed whether it would call this step an overflow
        def __init__(self, order):
            self.order = order

        def before_step(self, engine, ctx):
            seen.append((self.order, engine.optimizer.has_overflow()))

        def after_step(self, engine, ctx):
            pass

    for access in ("ours", "safe_set_local_grad only"):
        torch.manual_seed(0)
        engine = _engine(Prior(cfg.prior), offload=True, bf16=bf16)
        pol = ScalingPolicy(mode="pow2", init_log2=4, min_log2=0, on_nonfinite="zero_block")
        scaler = scaler_for(engine, engine.module, pol)
        if access != "ours":
            scaler.grad_access = (safe_get_local_grad, safe_set_local_grad)
        scaler.inject = {3: ("activation", math.inf)}
        seen.clear()
        before = _params(engine) if access == "ours" else None
        _train(engine, _batches(cfg, 1), [scaler, Probe(-1), Probe(1)])
        assert scaler.last_bad == [3]
        assert seen == ([(-1, True), (1, False)] if access == "ours" else [(-1, True), (1, True)]), access
        if before is not None and not bf16:
            after = _params(engine)
            for n in before:
                if n.startswith("blocks.1.mlp_branch."):
                    want = before[n] * (1 - 1e-3 * 0.045) if before[n].dim() >= 2 else before[n]
                    assert torch.allclose(after[n], want, rtol=0, atol=1e-9), n
            assert not torch.equal(before["blocks.0.mlp_branch.fc.weight"], after["blocks.0.mlp_branch.fc.weight"])


def test_zero3_offload_pow2_scaling_is_bit_identical():
    """ZeRO-3 + offload_optimizer (fp32, clipping at 4): with block scales 2^6 the parameters after two steps
    are bit-identical to the unscaled run, so the unscale reached the host gradient and its clipping norm."""
    cfg = _cfg()
    torch.manual_seed(0)
    base = Prior(cfg.prior)
    plain, scaled = _engine(copy.deepcopy(base), offload=True), _engine(copy.deepcopy(base), offload=True)
    scaler = scaler_for(scaled, scaled.module, ScalingPolicy(mode="pow2", init_log2=6, min_log2=0))
    batches = _batches(cfg, 2)
    _train(plain, batches)
    _train(scaled, batches, [scaler])
    a, b = _params(plain), _params(scaled)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.1.mlp_branch.fc.weight"], base.state_dict()["blocks.1.mlp_branch.fc.weight"])


def test_zero2_offload_is_refused():
    """ZeRO-2 + offload_optimizer computes the clipping norm from the still-scaled gradients while it copies
    them to the host (measured: 2e-3 max parameter difference after 3 steps at clip 4, none at clip 0)."""
    torch.manual_seed(0)
    engine = _engine(Prior(_cfg().prior), stage=2, offload=True)
    with pytest.raises(ConfigError, match="ZeRO-2 and offload_optimizer"):
        scaler_for(engine, engine.module, ScalingPolicy())


class _Sqrt(torch.nn.Module):
    """A branch without parameters whose input gradient is inf at 0."""

    def forward(self, x):
        return x.clamp(min=0).sqrt()


class _TwoBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.sqrt = torch.nn.Linear(4, 4), _Sqrt()
        torch.nn.init.zeros_(self.lin.weight)
        torch.nn.init.zeros_(self.lin.bias)

    def forward(self, x):
        x = x + self.lin(x)
        return x + self.sqrt(x)


def test_activation_fault_alone_flags_its_block():
    """An inf in the gradient leaving a branch (its input), zeroed by the filter, flags that block although
    every parameter gradient is finite (the stream below it lost those elements); the counts reach stats()."""
    m = _TwoBlocks()
    s = ResblockGradScaler([("lin", m.lin), ("sqrt", m.sqrt)], ScalingPolicy(init_log2=3, min_log2=0))
    m(torch.zeros(2, 4)).sum().backward()
    assert all(p.grad.isfinite().all() for p in m.parameters())
    assert s._param_bad.sum() == 0 and s._activation_bad[1] == 8
    assert s.nonfinite_blocks() == [1]
    stats = s.stats()
    assert stats["gscale/nonfinite_activation"] == 8 and stats["gscale/nonfinite_param"] == 0
    s.update([1])
    assert s.scales == [2.0**3, 2.0**2] and s._activation_bad.sum() == 0
