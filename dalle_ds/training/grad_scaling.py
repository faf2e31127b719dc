"""Per-resblock gradient scaling with an inf/NaN filter (PAPER §4.2), a stage of a DeepSpeed engine's step pipeline.

Every resblock branch b (the prior's `attn_branch` and `mlp_branch` of each layer) has its own scale s_b.
Forward is unchanged. In backward:

    stream grad g ─► (× s_b) ─► branch backward (16-bit) ─► filter(inf/NaN → 0) ─► (÷ s_b) ─► + g
                                   │
                                   └─► param grads (× s_b) ─► ZeRO reduce(-scatter), still × s_b
                                        ─► step pipeline stage, on the local shard: flag b if non-finite, ÷ s_b

The multiply sits on the branch *output* (the first thing backward meets), the filter and unscale on the
branch *input* (the last thing backward leaves), both as forward hooks on the unchanged modules, so
parameter names, the KV-cache path (`attn_branch(x, kv=cache)`) and checkpoints are untouched.

Where parameter gradients are unscaled (PAPER §4.2, §5.4 step 1): they stay multiplied by s_b through
backward, gradient accumulation and ZeRO's reduce, so the 16-bit values that are communicated and stored
sit at the block's scale, not at the loss scale. At each accumulation boundary the scaler's stage
(`before_step`, training/step_pipeline.py) reads every parameter's local gradient, flags block b if any
element is non-finite, all-reduces the flags (max) so every rank agrees, and divides by s_b in place:
  * ZeRO-3: the local shard, `deepspeed.utils.safe_get_local_grad`/`safe_set_local_grad` (the shard is in
    the gradient-accumulation dtype: fp32 with `data_types.grad_accum_dtype=fp32` or optimizer offload,
    otherwise the model dtype, where the division itself can underflow; see docs/TRAINING_AT_SCALE.md);
  * ZeRO-1/2: the local fragment of the reduced flat gradient that `safe_get_full_grad` reads
    (`param._hp_mapping.get_lp_grad_fragment`), in place;
  * no ZeRO: `param.grad` (DeepSpeed has all-reduced it in `engine.backward`), in place.
This runs before the rest of the step (node_exchange.py's exchange, DeepSpeed's clipping and optimizer), so
they all see unscaled gradients. A standalone scaler (no engine) keeps the older per-parameter tensor hook
(`unscale_params="hook"`: ÷ s_b, inf/NaN → 0 and flag, in the gradient's dtype) or `"defer"`.

With optimizer offload ZeRO-3 keeps two copies of the local gradient: the fp32 host gradient the optimizer
and the clipping norm use (what `safe_get/set_local_grad` reach) and the 16-bit partition DeepSpeed's fp16
overflow check reads; `put` writes both, so a zeroed block is zero in both. ZeRO-1/2 with optimizer offload
is refused: DeepSpeed computes the clipping norm and the overflow flag while it copies the gradients to
the host during the reduce, before this stage runs.

DeepSpeed's fp16 loss scale S. DeepSpeed multiplies the loss by S and divides the gradients by S in its
step; the stream, embeddings and head (fp16 under DeepSpeed's fp16 engine, unlike the paper's fp32 stream)
need it. Inside branch b the per-block scale *replaces* S instead of multiplying it: the multiply on the
branch output is by s_b / S and the unscale on its input by the same factor, so tensors inside the branch
(activation gradients, parameter gradients through the reduce) carry s_b and everything else carries S;
no tensor carries S·s_b. The step stage divides parameter gradients by s_b / S, leaving them at S for
DeepSpeed's own unscale. Without fp16 (or with no loss scaler) S = 1 and this is the plain s_b.

On a step where block b had a non-finite gradient (on any rank), a parameter gradient or the activation
gradient the filter zeroed on the branch's input:
  * its scale backs off (÷2 in `pow2` mode; ÷√2 at most once per 125-step window in `paper` mode);
  * its local gradients are zeroed (through the same accessors as the unscale), so DeepSpeed's fp16
    overflow check sees no inf/NaN from it and leaves S alone: the block's own scale has backed off;
  * policy `skip`: the whole optimizer update is skipped (the paper); `zero_block`: the step goes on.
Clean blocks grow (`pow2`: ×2 after `growth_interval` clean steps; `paper`: ×2^(1/1000) each step), then
every scale is clamped to [M·2^min_log2, M·2^max_log2] (M = data-parallel world size).
With power-of-two scales, fp32/bf16 arithmetic is exactly scale-equivariant (barring over/underflow),
so `pow2` mode trains bit-identically to no scaling; that is what the tests check.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dalle_ds.errors import ConfigError
from dalle_ds.registry import Registry
from dalle_ds.training.step_pipeline import StepContext


@dataclass
class ScalingPolicy:
    mode: str = "pow2"  # pow2 (exact, tests/bf16/fp32) | paper (fp16 on V100)
    on_nonfinite: str = "skip"  # skip the update (paper) | zero_block: zero that block's gradients
    init_log2: float = 13.0  # start at M·2^13
    min_log2: float = 7.0  # clamp to [M·2^7, M·2^24]
    max_log2: float = 24.0
    window: int = 125  # paper: at most one back-off per scale per window
    growth_interval: int = 1000  # pow2: double after this many clean steps (2^(1/1000) per step, in one go)
    world: int = 1  # M, the number of data-parallel ranks

    def __post_init__(self) -> None:
        if SCALING_MODES.get(self.mode) is None:
            raise ValueError(f"grad scaling mode: {self.mode!r}; choose one of {', '.join(SCALING_MODES.names()[1:])}")
        NONFINITE_POLICIES.check(self.on_nonfinite)
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
        g = g * ctx.scaler.branch_factor(ctx.block)
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
        return g / ctx.scaler.branch_factor(ctx.block), None, None


def prior_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The prior's resblock branches in forward order: (name, module), two per layer."""
    out = []
    for i, layer in enumerate(model.blocks):
        out.append((f"blocks.{i}.attn_branch", layer.attn_branch))
        out.append((f"blocks.{i}.mlp_branch", layer.mlp_branch))
    return out


class ResblockGradScaler:
    """Owns the scales, the forward hooks on the branches and the tensor hooks on their parameters."""

    def __init__(
        self, blocks: list[tuple[str, torch.nn.Module]], policy: ScalingPolicy, *, unscale_params: str = "hook"
    ):
        """unscale_params: "step" (what `scaler_for` sets) leaves parameter gradients scaled and untouched in
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
        self.scales = [m * 2.0**policy.init_log2] * n  # python floats: read in backward, no sync
        self.clean_steps = [0] * n  # pow2: consecutive clean steps
        self.last_backoff = [-(10**9)] * n  # paper: step of the last division
        self.step_count = 0
        self.skipped = 0
        self.grad_access = None  # (get, put) of the local reduced gradients, set by scaler_for
        self.global_scale: Callable[[], float] = lambda: 1.0  # DeepSpeed's fp16 loss scale S (scaler_for)
        self.last_nonfinite = {"param": 0, "activation": 0}  # elements flagged on the last step, all ranks
        self.backoffs = [0] * n
        self.last_bad: list[int] = []  # blocks flagged on the most recent step
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

    def branch_factor(self, b: int) -> float:
        """s_b / S: what block b's gradients are multiplied by on entering the branch and divided by on leaving
        it (and, for its parameter gradients, at the step), so inside the branch they carry s_b, not S·s_b."""
        return self.scales[b] / self.global_scale()

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
            return g / self.branch_factor(b) if self.unscale_params == "hook" else g

        return hook

    def fp32_grads(self) -> list[list[torch.Tensor]]:
        """Per block, the parameter gradients in fp32, unscaled (with unscale_params="defer")."""
        div = self.unscale_params == "defer"
        return [
            [(p.grad.float() / self.branch_factor(b) if div else p.grad.float()) for p in ps if p.grad is not None]
            for b, ps in enumerate(self.params)
        ]

    @torch.no_grad()
    def unscale_local(self, get, put) -> list[int]:
        """At an accumulation boundary (unscale_params="step"): flag every block with a non-finite local
        gradient, divide each local gradient by its block's s_b / S (`get(p)` -> tensor or None,
        `put(p, value)` writes it back), then return the blocks flagged on any rank (collective)."""
        for b, ps in enumerate(self.params):
            for p in ps:
                g = get(p)
                if g is None:
                    continue
                self._param_bad[b] += (~torch.isfinite(g)).sum()
                put(p, g / self.branch_factor(b))  # exact for pow2; with fp32 shards no underflow either
        return self.nonfinite_blocks()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- once per optimizer step ----------------------------------------------------------------

    def nonfinite_blocks(self) -> list[int]:
        """Blocks with a non-finite gradient on any rank since the last step (collective): a parameter gradient,
        or the activation gradient the filter zeroed on the branch's input (the stream below the block then
        missed those elements, even where the parameter gradients stayed finite)."""
        counts = torch.stack([self._param_bad, self._activation_bad])  # (2, blocks) elements, this rank
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)  # sums: one collective for the flags and the stats
        param, act = counts.tolist()
        self.last_nonfinite = {"param": int(sum(param)), "activation": int(sum(act))}
        return [i for i, (p, a) in enumerate(zip(param, act)) if p > 0 or a > 0]

    def update(self, bad: list[int]) -> None:
        """Back off flagged blocks, grow the others, clamp; reset the flags."""
        p, m = self.policy, self.policy.world
        lo, hi = m * 2.0**p.min_log2, m * 2.0**p.max_log2
        bad_set = set(bad)
        rule = SCALING_MODES.get(p.mode)
        for i in range(len(self.scales)):
            s = self.scales[i]
            if i in bad_set:
                self.backoffs[i] += 1
                self.clean_steps[i] = 0
                s = rule.back_off(self, i, s)
            else:
                self.clean_steps[i] += 1
                s = rule.grow(self, i, s)
            self.scales[i] = min(max(s, lo), hi)
        self.last_bad = sorted(bad_set)
        self.step_count += 1
        self._param_bad.zero_()
        self._activation_bad.zero_()

    # -- as the first stage of the engine's StepPipeline (order 0: the exchange after it sees unscaled gradients)

    order = 0

    def before_step(self, engine, ctx: StepContext) -> None:
        """Flag and unscale the local parameter gradients, then apply the non-finite policy."""
        ctx.bad_blocks = self.unscale_local(*self.grad_access)
        NONFINITE_POLICIES.get(self.policy.on_nonfinite)(self, ctx.bad_blocks, ctx)

    def after_step(self, engine, ctx: StepContext) -> None:
        if ctx.skip:
            self.skipped += 1
        self.update(ctx.bad_blocks)

    def stats(self) -> dict[str, float]:
        logs = [math.log2(s) for s in self.scales]
        return {
            "gscale/log2_min": min(logs),
            "gscale/log2_max": max(logs),
            "gscale/log2_mean": sum(logs) / len(logs),
            "gscale/skipped": float(self.skipped),
            "gscale/bad_blocks": float(len(self.last_bad)),
            "gscale/nonfinite_param": float(self.last_nonfinite["param"]),  # elements, last step, all ranks
            "gscale/nonfinite_activation": float(self.last_nonfinite["activation"]),
        }

    def state_dict(self) -> dict:
        return {
            "names": list(self.names),
            "scales": list(self.scales),
            "clean_steps": list(self.clean_steps),
            "last_backoff": list(self.last_backoff),
            "step_count": self.step_count,
            "skipped": self.skipped,
            "backoffs": list(self.backoffs),
        }

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


def _zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage()) if engine.zero_optimization() else 0


def _local_grad_access(engine):
    """(get, put) for a parameter's local, already reduced gradient at an accumulation boundary."""
    stage = _zero_stage(engine)
    opt = engine.optimizer
    offload = bool(getattr(opt, "offload_optimizer", False) or getattr(opt, "cpu_offload", False))
    if stage == 3:
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad  # noqa: PLC0415

        if not offload:  # one copy: the partition the step and the overflow check read
            return safe_get_local_grad, safe_set_local_grad

        def put3(p, value):
            safe_set_local_grad(p, value)  # the fp32 host gradient (and its norm for clipping)
            # and the 16-bit partition the fp16 overflow check reads (DeepSpeed 0.19's private ds_id -> partition
            # map, looked up per call rather than held)
            partition = opt._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition[p.ds_id]
            partition.narrow(0, 0, value.numel()).copy_(value)

        return safe_get_local_grad, put3
    if offload:
        raise ConfigError(
            f"per-resblock gradient scaling with ZeRO-{stage} and offload_optimizer: DeepSpeed computes the "
            "clipping norm and the overflow flag while it copies gradients to the host, before the scales come "
            "off; use ZeRO-3 (ds_configs/*zero3_offload*.json) or no offload"
        )
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


@dataclass(frozen=True)
class ScaleRule:
    back_off: Callable[[ResblockGradScaler, int, float], float]  # (scaler, block, scale) -> new scale
    grow: Callable[[ResblockGradScaler, int, float], float]


def _halve(scaler: ResblockGradScaler, i: int, s: float) -> float:
    return s / 2.0


def _double_after_interval(scaler: ResblockGradScaler, i: int, s: float) -> float:
    if scaler.clean_steps[i] < scaler.policy.growth_interval:
        return s
    scaler.clean_steps[i] = 0
    return s * 2.0


def _sqrt2_once_per_window(scaler: ResblockGradScaler, i: int, s: float) -> float:
    if scaler.step_count - scaler.last_backoff[i] < scaler.policy.window:
        return s
    scaler.last_backoff[i] = scaler.step_count
    return s / math.sqrt(2.0)


def _grow_each_step(scaler: ResblockGradScaler, i: int, s: float) -> float:
    return s * 2.0 ** (1.0 / 1000.0)


# prior_train.grad_scaling -> how a block's scale backs off and grows; "off" = no per-block scaling
SCALING_MODES: Registry = Registry("prior_train.grad_scaling", "mode", off="off")
SCALING_MODES.register("pow2", ScaleRule(_halve, _double_after_interval))  # exact; bf16, fp32, tests
SCALING_MODES.register("paper", ScaleRule(_sqrt2_once_per_window, _grow_each_step))  # PAPER §4.2, fp16


def _zero_flagged(scaler: ResblockGradScaler, bad: list[int]) -> None:
    """Zero the flagged blocks' local gradients (every copy `put` reaches)."""
    get, put = scaler.grad_access
    for b in bad:
        for p in scaler.params[b]:
            g = get(p)
            if g is not None:
                put(p, torch.zeros_like(g))


def _skip_update(scaler: ResblockGradScaler, bad: list[int], ctx: StepContext) -> None:
    """The paper's policy: a non-finite gradient anywhere skips the whole optimizer update. The flagged blocks
    are zeroed as well, so DeepSpeed's fp16 overflow check does not halve S for what s_b already handled."""
    _zero_flagged(scaler, bad)
    if bad:
        ctx.skip = True


def _zero_blocks(scaler: ResblockGradScaler, bad: list[int], ctx: StepContext) -> None:
    """Zero the flagged blocks' local gradients; every other block takes its step."""
    _zero_flagged(scaler, bad)


# prior_train.grad_scaling_policy -> fn(scaler, bad blocks, step context)
NONFINITE_POLICIES: Registry = Registry("prior_train.grad_scaling_policy", "policy")
NONFINITE_POLICIES.register("skip", _skip_update)
NONFINITE_POLICIES.register("zero_block", _zero_blocks)


def scaler_for(engine, model: torch.nn.Module, policy: ScalingPolicy) -> ResblockGradScaler:
    """A scaler over the prior's branches whose parameter gradients are unscaled at the engine's step: add it
    to the engine's StepPipeline (training/step_pipeline.py)."""
    scaler = ResblockGradScaler(prior_blocks(model), policy, unscale_params="step")
    scaler.grad_access = _local_grad_access(engine)
    scaler.global_scale = loss_scale_reader(engine)
    return scaler


def loss_scale_reader(engine) -> Callable[[], float]:
    """() -> the loss scale S DeepSpeed multiplies the loss by (its fp16 dynamic or static scale; 1 in bf16 and
    fp32, or where the optimizer has no loss scaler). Read as a python float: no device sync in backward."""
    opt = engine.optimizer

    def read() -> float:
        s = getattr(opt, "loss_scale", None)
        return 1.0 if s is None else float(s)

    return read
