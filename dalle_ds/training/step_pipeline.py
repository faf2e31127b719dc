"""One optimizer step of a DeepSpeed engine as a pipeline of stages around `engine.step()`.

At each gradient-accumulation boundary every stage's `before_step` runs in ascending `order`, then the
engine steps (or runs its step with the optimizer's update skipped, if a stage asked for that), then every
stage's `after_step` runs in descending order. The stages this project has:

    order 0   gradient scaling (grad_scaling.py): unscale the local gradients, flag inf/NaN blocks,
              apply the policy (skip the update, or zero the flagged blocks), then update the scales
    order 10  node exchange (node_exchange.py): compressed exchange of the gradient shards between nodes,
              on unscaled gradients, and not at all on a skipped step

The order is a property of the stage, so stages can be added in any order. DeepSpeed has no pre-step
hook for the reduced gradients, hence this wrapper: the training loop calls `pipeline.step()` where it
would call `engine.step()`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class StepContext:
    skip: bool = False  # skip the optimizer's update on this step
    bad_blocks: list[int] = field(default_factory=list)  # blocks with a non-finite gradient (grad scaling)


class StepStage(Protocol):
    order: int

    def before_step(self, engine, ctx: StepContext) -> None: ...

    def after_step(self, engine, ctx: StepContext) -> None: ...


def inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO, mixed precision)."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


@contextmanager
def update_skipped(engine):
    """Within: `engine.step()` does its bookkeeping (counters, scheduler, zeroing gradients) but the inner
    optimizer leaves every parameter as it is."""
    inner = inner_optimizer(engine)
    inner.step = lambda *a, **k: None  # an instance attribute shadows the method for this one step
    try:
        yield
    finally:
        del inner.step


class StepPipeline:
    def __init__(self, engine, stages: list[StepStage] | tuple = ()):
        self.engine = engine
        self.stages: list[StepStage] = sorted(stages, key=lambda s: s.order)

    def add(self, stage: StepStage) -> StepStage:
        self.stages = sorted([*self.stages, stage], key=lambda s: s.order)
        return stage

    def step(self) -> StepContext | None:
        """`engine.step()` with the stages around it; the step's context at a boundary, else None."""
        engine = self.engine
        if not self.stages or not engine.is_gradient_accumulation_boundary():
            engine.step()
            return None
        ctx = StepContext()
        for stage in self.stages:
            stage.before_step(engine, ctx)
        if ctx.skip:
            with update_skipped(engine):
                engine.step()
        else:
            engine.step()
        for stage in reversed(self.stages):
            stage.after_step(engine, ctx)
        return ctx
