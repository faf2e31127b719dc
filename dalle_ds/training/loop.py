"""The training loop shared by the dVAE and the prior: micro-batches, logging, eval, checkpoints, resume."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dalle_ds.data.order import DataOrder
from dalle_ds.errors import ConfigError
from dalle_ds.training import checkpoint as ckpt
from dalle_ds.training.distributed import device, is_main, mean_across_ranks, rank, shutdown_distributed, world_size
from dalle_ds.training.ema import EMA
from dalle_ds.training.engine import global_batch, grad_accum, micro_batch
from dalle_ds.training.launcher_watch import runner_gone_check
from dalle_ds.training.metrics import MetricsLogger
from dalle_ds.training.step_pipeline import StepPipeline

# loss_fn(module, indices, step) -> (loss, stats, tokens): one micro-batch forward. With a streaming
# `order` (data/stream.py) the "indices" are the items themselves.
LossFn = Callable[[torch.nn.Module, list, int], tuple]
# exit status of a run stopped by SIGTERM after saving: what a shell reports for a process the signal ended,
# so a scheduler sees the job was stopped, not finished
SIGTERM_EXIT = 128 + signal.SIGTERM


def exit_if_interrupted(summary: dict, name: str) -> None:
    """After a training stopped by SIGTERM (its checkpoint saved): say so on rank 0 and exit SIGTERM_EXIT."""
    if summary.get("interrupted"):
        if is_main():
            print(f"{name}: SIGTERM, checkpoint saved at step {summary['step']}; rerun the same command to resume")
        shutdown_distributed()  # every rank saved together, so all are here; a live gloo group can abort the exit
        sys.exit(SIGTERM_EXIT)


@dataclass
class LoopConfig:
    steps: int
    log_every: int
    save_every: int
    eval_every: int = 0  # 0 = only at the end
    seed: int = 0
    desc: str = "train"
    progress: bool = True
    stop_at: int | None = None  # end this process after that step (time-limited jobs); a rerun resumes
    keep_last: int = 0  # checkpoint.keep_last: checkpoints kept after each save (0 = all)


@dataclass
class LoopResult:
    step: int
    history: list[dict] = field(default_factory=list)  # one entry per logged step (rank 0's view)
    last_eval: dict = field(default_factory=dict)
    seconds: float = 0.0
    interrupted: bool = False  # SIGTERM: a checkpoint was saved at `step` and the loop stopped early


class _TermFlag:
    """SIGTERM sets a flag instead of killing the process; the loop saves and stops at the next step end. A
    second SIGTERM (the deepspeed launcher forwards one) changes nothing. A rank whose deepspeed runner is gone
    stops the same way (training/launcher_watch.py)."""

    def __init__(self):
        self.set = False
        self._old = None
        self._runner_gone = runner_gone_check(os.getpid())

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.set = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

    def any_rank(self) -> bool:
        """True on every rank if any rank got SIGTERM (all ranks must save the same step)."""
        if not self.set and self._runner_gone is not None and self._runner_gone():
            print(f"rank {rank()}: the deepspeed runner above this rank is gone: saving and stopping", flush=True)
            self.set = True
        if not torch.distributed.is_initialized() or world_size() == 1:
            return self.set

        t = torch.tensor([1.0 if self.set else 0.0], device=device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)


def fit(
    engine,
    *,
    loss_fn: LossFn,
    num_items: int = 0,
    ds_cfg: dict,
    out_dir: str | Path,
    loop: LoopConfig,
    ema: EMA | None = None,
    eval_fn: Callable[[torch.nn.Module], dict] | None = None,
    schedule_fn: Callable[[int], dict] | None = None,
    resume: bool = True,
    grad_scaler=None,
    ema_every: int = 1,
    extra_state: dict | None = None,
    order=None,
    stages: list | None = None,
) -> LoopResult:
    """Run `loop.steps` optimizer steps of `engine`, resuming from `out_dir/checkpoints` if present.

    `stages` run around each optimizer step (training/step_pipeline.py: gradient scaling, node exchange).
    `grad_scaler` (training/grad_scaling.py, one of the stages) and `extra_state`
    (name -> object with state_dict/load_state_dict, e.g. a gradient compressor) are checkpointed in
    client_state. SIGTERM saves a checkpoint at the end of the current step and returns with
    `interrupted=True`. `order` replaces the DataOrder over `num_items` (same `micro_batch` call), e.g. a
    StreamOrder, which the caller also passes in `extra_state` so its position is checkpointed.
    """
    extra_state = dict(extra_state or {})
    steps = StepPipeline(engine, stages or [])
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    order = order if order is not None else DataOrder(num_items, loop.seed)
    gb, micro, accum, world, r = global_batch(ds_cfg), micro_batch(ds_cfg), grad_accum(ds_cfg), world_size(), rank()

    if loop.keep_last < 0:
        raise ConfigError(f"checkpoint.keep_last: must be >= 0 (0 keeps every checkpoint), got {loop.keep_last}")
    start = 0
    if resume:
        state = ckpt.load_checkpoint(engine, ckpt_dir)
        if state is not None:
            start = int(state["step"])
            if is_main():
                print(f"{loop.desc}: resumed from step {start} (checkpoint {state['tag']})", flush=True)
            if state["data_position"] != start * gb:
                raise RuntimeError(
                    f"checkpoint data position {state['data_position']} does not match step "
                    f"{start} x global batch {gb}: resume with the same ds_config and ranks"
                )
            if ema is not None and "ema" in state["rank_state"]:
                ema.load_state_dict(state["rank_state"]["ema"])
            if grad_scaler is not None and "grad_scaler" in state:
                grad_scaler.load_state_dict(state["grad_scaler"])
            for name, obj in extra_state.items():
                if name in state["rank_state"]:
                    obj.load_state_dict(state["rank_state"][name])

    def save(step: int) -> None:
        client = {"data_position": step * gb, "schedules": schedule_fn(step) if schedule_fn else {}}
        if grad_scaler is not None:  # identical on every rank (flags are all-reduced)
            client["grad_scaler"] = grad_scaler.state_dict()
        per_rank = {name: obj.state_dict() for name, obj in extra_state.items()}
        if ema is not None:  # a shard per rank under ZeRO-3
            per_rank["ema"] = ema.state_dict()
        ckpt.save_checkpoint(engine, ckpt_dir, step, client, rank_state=per_rank)
        ckpt.prune(ckpt_dir, loop.keep_last, step)

    logger = MetricsLogger(out_dir, total_steps=loop.steps, start_step=start, desc=loop.desc, progress=loop.progress)
    result = LoopResult(step=start)
    t0 = time.perf_counter()
    window_t, window_tokens = time.perf_counter(), 0
    engine.train()
    end = loop.steps if loop.stop_at is None else min(loop.steps, loop.stop_at)
    term = _TermFlag().__enter__()
    try:
        for step in range(start, end):
            sums: dict[str, float] = {}
            for a in range(accum):
                idx = order.micro_batch(step, global_batch=gb, micro=micro, accum_index=a, rank=r, world=world)
                loss, stats, tokens = loss_fn(engine, idx, step)
                engine.backward(loss)
                steps.step()
                window_tokens += tokens * world
                for k, v in {"loss": loss.item(), **{k: float(v) for k, v in stats.items()}}.items():
                    sums[k] = sums.get(k, 0.0) + v / accum
            done = step + 1
            if ema is not None and done % ema_every == 0:
                ema.update()
            if done % loop.log_every == 0 or done == loop.steps:
                metrics = mean_across_ranks(sums)
                elapsed = time.perf_counter() - window_t
                metrics["tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
                metrics["lr"] = engine.get_lr()[0]
                if schedule_fn:
                    metrics.update(schedule_fn(step))
                if grad_scaler is not None:
                    metrics.update(grad_scaler.stats())
                for obj in extra_state.values():  # e.g. bytes between nodes (collective: every rank logs here)
                    if hasattr(obj, "stats"):
                        metrics.update(obj.stats())
                logger.log(done, metrics)
                logger.progress(done, metrics["loss"], metrics["tokens_per_s"])
                result.history.append({"step": done, **metrics})
                window_t, window_tokens = time.perf_counter(), 0
            if eval_fn is not None and loop.eval_every and done % loop.eval_every == 0 and done != loop.steps:
                result.last_eval = eval_fn(engine.module)
                logger.log(done, {f"val/{k}": v for k, v in result.last_eval.items()})
                engine.train()
            result.step = done
            if term.any_rank():
                save(done)
                result.interrupted = True
                break
            if done % loop.save_every == 0 or done == end:
                save(done)
    finally:
        term.__exit__()
    if eval_fn is not None and not result.interrupted:
        result.last_eval = eval_fn(engine.module)
        logger.log(result.step, {f"val/{k}": v for k, v in result.last_eval.items()})
    logger.close()
    result.seconds = time.perf_counter() - t0
    return result
