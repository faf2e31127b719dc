"""The training loop shared by the dVAE and the prior: micro-batches, logging, eval, checkpoints, resume."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from dalle_ds.data.order import DataOrder
from dalle_ds.training import checkpoint as ckpt
from dalle_ds.training.distributed import mean_across_ranks, rank, world_size
from dalle_ds.training.ema import EMA
from dalle_ds.training.engine import global_batch, grad_accum, micro_batch
from dalle_ds.training.metrics import MetricsLogger

# loss_fn(module, indices, step) -> (loss, stats, tokens): one micro-batch forward.
LossFn = Callable[[torch.nn.Module, list, int], tuple]


@dataclass
class LoopConfig:
    steps: int
    log_every: int
    save_every: int
    eval_every: int = 0        # 0 = only at the end
    seed: int = 0
    desc: str = "train"
    progress: bool = True
    stop_at: int | None = None  # end this process after that step (time-limited jobs); a rerun resumes


@dataclass
class LoopResult:
    step: int
    history: list[dict] = field(default_factory=list)  # one entry per logged step (rank 0's view)
    last_eval: dict = field(default_factory=dict)
    seconds: float = 0.0


def fit(engine, *, loss_fn: LossFn, num_items: int, ds_cfg: dict, out_dir: str | Path, loop: LoopConfig,
        ema: EMA | None = None, eval_fn: Callable[[torch.nn.Module], dict] | None = None,
        schedule_fn: Callable[[int], dict] | None = None, resume: bool = True) -> LoopResult:
    """Run `loop.steps` optimizer steps of `engine`, resuming from `out_dir/checkpoints` if present."""
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    order = DataOrder(num_items, loop.seed)
    gb, micro, accum, world, r = global_batch(ds_cfg), micro_batch(ds_cfg), grad_accum(ds_cfg), world_size(), rank()

    start = 0
    if resume:
        state = ckpt.load_checkpoint(engine, ckpt_dir)
        if state is not None:
            start = int(state["step"])
            if state["data_position"] != start * gb:
                raise RuntimeError(f"checkpoint data position {state['data_position']} does not match step "
                                   f"{start} x global batch {gb}: resume with the same ds_config and ranks")
            if ema is not None and "ema" in state:
                ema.load_state_dict(state["ema"])

    def save(step: int) -> None:
        client = {"data_position": step * gb, "schedules": schedule_fn(step) if schedule_fn else {}}
        if ema is not None:
            client["ema"] = ema.state_dict()
        ckpt.save_checkpoint(engine, ckpt_dir, step, client)

    logger = MetricsLogger(out_dir, total_steps=loop.steps, start_step=start, desc=loop.desc,
                           progress=loop.progress)
    result = LoopResult(step=start)
    t0 = time.perf_counter()
    window_t, window_tokens = time.perf_counter(), 0
    engine.train()
    end = loop.steps if loop.stop_at is None else min(loop.steps, loop.stop_at)
    for step in range(start, end):
        sums: dict[str, float] = {}
        for a in range(accum):
            idx = order.micro_batch(step, global_batch=gb, micro=micro, accum_index=a, rank=r, world=world)
            loss, stats, tokens = loss_fn(engine, idx, step)
            engine.backward(loss)
            engine.step()
            window_tokens += tokens * world
            for k, v in {"loss": loss.item(), **{k: float(v) for k, v in stats.items()}}.items():
                sums[k] = sums.get(k, 0.0) + v / accum
        if ema is not None:
            ema.update()
        done = step + 1
        if done % loop.log_every == 0 or done == loop.steps:
            metrics = mean_across_ranks(sums)
            elapsed = time.perf_counter() - window_t
            metrics["tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
            metrics["lr"] = engine.get_lr()[0]
            if schedule_fn:
                metrics.update(schedule_fn(step))
            logger.log(done, metrics)
            logger.progress(done, metrics["loss"], metrics["tokens_per_s"])
            result.history.append({"step": done, **metrics})
            window_t, window_tokens = time.perf_counter(), 0
        if eval_fn is not None and loop.eval_every and done % loop.eval_every == 0 and done != loop.steps:
            result.last_eval = eval_fn(engine.module)
            logger.log(done, {f"val/{k}": v for k, v in result.last_eval.items()})
            engine.train()
        if done % loop.save_every == 0 or done == end:
            save(done)
        result.step = done
    if eval_fn is not None:
        result.last_eval = eval_fn(engine.module)
        logger.log(result.step, {f"val/{k}": v for k, v in result.last_eval.items()})
    logger.close()
    result.seconds = time.perf_counter() - t0
    return result
