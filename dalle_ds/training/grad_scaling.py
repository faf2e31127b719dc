"""Per-resblock gradient scaling with an inf/NaN filter (PAPER §4.2), attached to a DeepSpeed engine.

Every resblock branch b (the prior's `attn_branch` and `mlp_branch` of each layer) has its own scale s_b.
Forward is unchanged. In backward:

    stream grad g ─► (× s_b) ─► branch backward (16-bit) ─► filter(inf/NaN → 0) ─► (÷ s_b) ─► + g
                                   │
                                   └─► param grads (× s_b) ─► ZeRO reduce(-scatter), still × s_b
                                        ─► engine.step wrapper, on the local shard: flag b if non-finite, ÷ s_b

The multiply sits on the branch *output* (the first thing backward meets), the filter and unscale on the
branch *input* (the last thing backward leaves), both as forward hooks on the unchanged modules, so
parameter names, the KV-cache path (`attn_branch(x, kv=cache)`) and checkpoints are untouched.

Where parameter gradients are unscaled (PAPER §4.2, §5.4 step 1): they stay multiplied by s_b through
backward, gradient accumulation and ZeRO's reduce, so the 16-bit values that are communicated and stored
sit at the block's scale, not at the loss scale. At each accumulation boundary the `engine.step` wrapper
(`attach`) reads every parameter's local gradient, flags block b if any element is non-finite, all-reduces
the flags (max) so every rank agrees, and divides by s_b in place:
  * ZeRO-3: the local shard, `deepspeed.utils.safe_get_local_grad`/`safe_set_local_grad` (the shard is in
    the gradient-accumulation dtype: fp32 with `data_types.grad_accum_dtype=fp32` or optimizer offload,
    otherwise the model dtype, where the division itself can underflow; see docs/TRAINING_AT_SCALE.md);
  * ZeRO-1/2: the local fragment of the reduced flat gradient that `safe_get_full_grad` reads
    (`param._hp_mapping.get_lp_grad_fragment`), in place;
  * no ZeRO: `param.grad` (DeepSpeed has all-reduced it in `engine.backward`), in place.
This runs before the wrapped step (node_exchange.py's exchange, DeepSpeed's clipping and optimizer), so
they all see unscaled gradients. A standalone scaler (no engine) keeps the older per-parameter tensor hook
(`unscale_params="hook"`: ÷ s_b, inf/NaN → 0 and flag, in the gradient's dtype) or `"defer"`.

On a step where block b had a non-finite parameter gradient (on any rank):
  * its scale backs off (÷2 in `pow2` mode; ÷√2 at most once per 125-step window in `paper` mode);
  * policy `skip`: the whole optimizer update is skipped (the paper); `zero_block`: b's local gradients are
    zeroed (through the same accessors as the unscale) and the step goes on.
Clean blocks grow (`pow2`: ×2 after `growth_interval` clean steps; `paper`: ×2^(1/1000) each step), then
every scale is clamped to [M·2^min_log2, M·2^max_log2] (M = data-parallel world size).
With power-of-two scales, fp32/bf16 arithmetic is exactly scale-equivariant (barring over/underflow),
so `pow2` mode trains bit-identically to no scaling; that is what the tests check.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MODES = ("off", "pow2", "paper")
POLICIES = ("skip", "zero_block")


@dataclass
class ScalingPolicy:
    mode: str = "pow2"              # pow2 (exact, tests/bf16/fp32) | paper (fp16 on V100)
    on_nonfinite: str = "skip"      # skip the update (paper) | zero_block: zero that block's gradients
    init_log2: float = 13.0         # start at M·2^13
    min_log2: float = 7.0           # clamp to [M·2^7, M·2^24]
    max_log2: float = 24.0
    window: int = 125               # paper: at most one back-off per scale per window
    growth_interval: int = 1000     # pow2: double after this many clean steps (2^(1/1000) per step, in one go)
    world: int = 1                  # M, the number of data-parallel ranks

    def __post_init__(self) -> None:
        if self.mode not in ("pow2", "paper"):
            raise ValueError(f"grad scaling mode: {self.mode!r}; choose pow2 or paper")
        if self.on_nonfinite not in POLICIES:
            raise ValueError(f"grad scaling policy: {self.on_nonfinite!r}; choose one of {', '.join(POLICIES)}")
        if not self.min_log2 <= self.init_log2 <= self.max_log2:
            raise ValueError("grad scaling: need min_log2 <= init_log2 <= max_log2")


class _BlockIdentity(torch.autograd.Function):
    """Identity forward that remembers (scaler, block) for a subclass's backward."""

    @staticmethod
    def forward(ctx, x, scaler, block):
        ctx.scaler, ctx.block = scaler, block
        return x.view_as(x)


class _ScaleGrad(_BlockIdentity):
    """Backward multiplies the gradient entering the branch by the block's scale."""

    @staticmethod
    def backward(ctx, g):
        g = g * ctx.scaler.scales[ctx.block]
        inject = ctx.scaler.inject.get(ctx.block)
        if inject is not None and inject[0] == "activation":  # test hook: an overflow inside the branch
            g = g.clone()
            g.view(-1)[0] = inject[1]
        return g, None, None


class _UnscaleFilter(_BlockIdentity):
    """Backward zeroes inf/NaN in the gradient leaving the branch, then unscales it."""

    @staticmethod
    def backward(ctx, g):
        finite = torch.isfinite(g)
        ctx.scaler._activation_bad[ctx.block] += (~finite).sum()
        g = torch.where(finite, g, torch.zeros((), dtype=g.dtype, device=g.device))
        return g / ctx.scaler.scales[ctx.block], None, None


def prior_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The prior's resblock branches in forward order: (name, module), two per layer."""
    out = []
    for i, layer in enumerate(model.blocks):
        out.append((f"blocks.{i}.attn_branch", layer.attn_branch))
        out.append((f"blocks.{i}.mlp_branch", layer.mlp_branch))
    return out


class ResblockGradScaler:
    """Owns the scales, the forward hooks on the branches and the tensor hooks on their parameters."""

    def __init__(self, blocks: list[tuple[str, torch.nn.Module]], policy: ScalingPolicy, *,
                 unscale_params: str = "hook"):
        """unscale_params: "step" (what `attach` sets) leaves parameter gradients scaled and untouched in
        backward; `unscale_local` flags and unscales them on the local gradient shards before the step.
        For a plain-PyTorch loop: "hook" divides each parameter gradient by its block's scale in a tensor
        hook (in the gradient's dtype, before any reduce), zeroing and flagging inf/NaN; "defer" only
        zeroes and flags them there, and `fp32_grads()` unscales (fp32 master gradients)."""
        if unscale_params not in ("step", "hook", "defer"):
            raise ValueError(f"unscale_params: {unscale_params!r}; choose step, hook or defer")
        self.unscale_params = unscale_params
        self.names = [n for n, _ in blocks]
        self.policy = policy
        n = len(blocks)
        m = policy.world
        self.scales = [m * 2.0 ** policy.init_log2] * n  # python floats: read in backward, no sync
        self.clean_steps = [0] * n          # pow2: consecutive clean steps
        self.last_backoff = [-10**9] * n    # paper: step of the last division
        self.step_count = 0
        self.skipped = 0
        self.skipping = False               # true during a skipped step's engine.step (node_exchange skips too)
        self.backoffs = [0] * n
        self.last_bad: list[int] = []       # blocks flagged on the most recent step
        self.inject: dict[int, tuple[str, float]] = {}  # test hook: block -> (where, value)
        self.params = [[p for p in mod.parameters() if p.requires_grad] for _, mod in blocks]
        dev = self.params[0][0].device if self.params and self.params[0] else torch.device("cpu")
        self._param_bad = torch.zeros(n, device=dev)
        self._activation_bad = torch.zeros(n, device=dev)
        self._handles = []
        for b, (_, mod) in enumerate(blocks):
            self._handles.append(mod.register_forward_pre_hook(self._pre_hook(b), with_kwargs=True))
            self._handles.append(mod.register_forward_hook(self._post_hook(b)))
            for p in self.params[b]:
                self._handles.append(p.register_hook(self._param_hook(b)))

    # -- hooks ---------------------------------------------------------------------------------

    def _pre_hook(self, b):
        def hook(module, args, kwargs):
            if not torch.is_grad_enabled() or not args:
                return None
            return (_UnscaleFilter.apply(args[0], self, b), *args[1:]), kwargs
        return hook

    def _post_hook(self, b):
        def hook(module, args, out):
            if not torch.is_grad_enabled():
                return None
            return _ScaleGrad.apply(out, self, b)
        return hook

    def _param_hook(self, b):
        def hook(g):
            inject = self.inject.get(b)
            if inject is not None and inject[0] == "param":  # test hook: one weight gradient overflows
                g = g.clone()
                g.view(-1)[0] = inject[1]
            if self.unscale_params == "step":  # stays scaled (and unchecked) until unscale_local
                return g
            finite = torch.isfinite(g)
            self._param_bad[b] += (~finite).sum()
            g = torch.where(finite, g, torch.zeros((), dtype=g.dtype, device=g.device))
            return g / self.scales[b] if self.unscale_params == "hook" else g
        return hook

    def fp32_grads(self) -> list[list[torch.Tensor]]:
        """Per block, the parameter gradients in fp32, unscaled (with unscale_params="defer")."""
        div = self.unscale_params == "defer"
        return [[(p.grad.float() / self.scales[b] if div else p.grad.float()) for p in ps if p.grad is not None]
                for b, ps in enumerate(self.params)]

    @torch.no_grad()
    def unscale_local(self, get, put) -> list[int]:
        """At an accumulation boundary (unscale_params="step"): flag every block with a non-finite local
        gradient, divide each local gradient by its block's scale (`get(p)` -> tensor or None,
        `put(p, value)` writes it back), then return the blocks flagged on any rank (collective)."""
        for b, ps in enumerate(self.params):
            for p in ps:
                g = get(p)
                if g is None:
                    continue
                self._param_bad[b] += (~torch.isfinite(g)).sum()
                put(p, g / self.scales[b])  # exact for pow2; with fp32 shards no underflow either
        return self.nonfinite_blocks()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- once per optimizer step ----------------------------------------------------------------

    def nonfinite_blocks(self) -> list[int]:
        """Blocks with a non-finite parameter gradient on any rank since the last step (collective)."""
        bad = self._param_bad.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        return [i for i, v in enumerate(bad.tolist()) if v > 0]

    def update(self, bad: list[int]) -> None:
        """Back off flagged blocks, grow the others, clamp; reset the flags."""
        p, m = self.policy, self.policy.world
        lo, hi = m * 2.0 ** p.min_log2, m * 2.0 ** p.max_log2
        bad_set = set(bad)
        for i in range(len(self.scales)):
            s = self.scales[i]
            if i in bad_set:
                self.backoffs[i] += 1
                self.clean_steps[i] = 0
                if p.mode == "pow2":
                    s /= 2.0
                elif self.step_count - self.last_backoff[i] >= p.window:
                    s /= math.sqrt(2.0)
                    self.last_backoff[i] = self.step_count
            else:
                self.clean_steps[i] += 1
                if p.mode == "paper":
                    s *= 2.0 ** (1.0 / 1000.0)
                elif self.clean_steps[i] >= p.growth_interval:
                    s *= 2.0
                    self.clean_steps[i] = 0
            self.scales[i] = min(max(s, lo), hi)
        self.last_bad = sorted(bad_set)
        self.step_count += 1
        self._param_bad.zero_()
        self._activation_bad.zero_()

    def stats(self) -> dict[str, float]:
        logs = [math.log2(s) for s in self.scales]
        return {"gscale/log2_min": min(logs), "gscale/log2_max": max(logs),
                "gscale/log2_mean": sum(logs) / len(logs), "gscale/skipped": float(self.skipped),
                "gscale/bad_blocks": float(len(self.last_bad))}

    def state_dict(self) -> dict:
        return {"names": list(self.names), "scales": list(self.scales), "clean_steps": list(self.clean_steps),
                "last_backoff": list(self.last_backoff), "step_count": self.step_count,
                "skipped": self.skipped, "backoffs": list(self.backoffs)}

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names:
            raise ValueError("grad scaler checkpoint has different resblocks than this model")
        self.scales = [float(s) for s in state["scales"]]
        self.clean_steps = list(state["clean_steps"])
        self.last_backoff = list(state["last_backoff"])
        self.step_count = int(state["step_count"])
        self.skipped = int(state["skipped"])
        self.backoffs = list(state["backoffs"])


# ----------------------------------------------------------------------------------------------
# DeepSpeed engine wiring

def _inner_optimizer(engine):
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def _zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage()) if engine.zero_optimization() else 0


def _local_grad_access(engine):
    """(get, put) for a parameter's local, already reduced gradient at an accumulation boundary."""
    stage = _zero_stage(engine)
    if stage == 3:
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad  # noqa: PLC0415

        return safe_get_local_grad, safe_set_local_grad
    if stage in (1, 2):
        # The local fragment of the flat reduced gradient (a view the step reads; None where this rank owns
        # no part of p). The same object safe_get_full_grad reads, without its all-reduce of the full tensor.
        def get(p):
            if getattr(p, "_hp_mapping", None) is None:
                return None
            return p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group)

        def put(p, value):
            get(p).copy_(value)
        return get, put

    def put0(p, value):
        p.grad.copy_(value)
    return (lambda p: p.grad), put0


def attach(engine, scaler: ResblockGradScaler) -> ResblockGradScaler:
    """Wrap `engine.step`: at each accumulation boundary, flag and unscale the local parameter gradients
    (`unscale_local`), apply the policy (skip the inner optimizer's step, or zero the flagged blocks'
    gradients), update the scales, then run the wrapped step (a node exchange attached earlier included)."""
    scaler.unscale_params = "step"  # parameter gradients stay scaled through ZeRO's reduce
    get, put = _local_grad_access(engine)
    original_step = engine.step

    def step(*args, **kwargs):
        if not engine.is_gradient_accumulation_boundary():
            return original_step(*args, **kwargs)
        bad = scaler.unscale_local(get, put)
        if bad and scaler.policy.on_nonfinite == "skip":
            inner = _inner_optimizer(engine)
            inner.step = lambda *a, **k: None  # instance attribute shadows the method for this one step
            scaler.skipping = True
            try:
                out = original_step(*args, **kwargs)
            finally:
                del inner.step
                scaler.skipping = False
            scaler.skipped += 1
        else:
            for b in bad:
                for p in scaler.params[b]:
                    g = get(p)
                    if g is not None:
                        put(p, torch.zeros_like(g))
            out = original_step(*args, **kwargs)
        scaler.update(bad)
        return out

    engine.step = step
    engine.grad_scaler = scaler
    return scaler


def scaler_for(engine, model: torch.nn.Module, policy: ScalingPolicy) -> ResblockGradScaler:
    """Build a scaler over the prior's branches and attach it to `engine` (call after build_engine)."""
    return attach(engine, ResblockGradScaler(prior_blocks(model), policy, unscale_params="step"))
