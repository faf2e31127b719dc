"""Stop a run whose validation gives a non-finite number.

A NaN validation loss means the weights (or the data, e.g. prior.text_len=0 gave an empty text loss) produce
no usable prediction; training on would only write NaN checkpoints and a model file that samples noise, and
the run would still exit 0. The training loop calls `eval_fn(module)`; wrapping it here raises RunFailed
naming the metric and the step instead, before the step's checkpoint is written."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from dalle_ds.errors import RunFailed


def finite_eval(
    eval_fn: Callable[[torch.nn.Module], dict],
    step: Callable[[], int],
    what: str,
    *,
    allow_inf: bool = False,
    has_data: Callable[[], bool] = lambda: True,
) -> Callable[[torch.nn.Module], dict]:
    """`eval_fn` that raises RunFailed if a metric it returns is NaN (or infinite, unless `allow_inf`: a PSNR
    of a perfect reconstruction is +inf); `step()` is the optimizer step the weights are at. Nothing is checked
    when `has_data()` is false: the metric of an empty validation set is NaN without anything being wrong."""

    def wrong(v) -> bool:
        return isinstance(v, (int, float)) and (math.isnan(v) or (math.isinf(v) and not allow_inf))

    def checked(module: torch.nn.Module) -> dict:
        metrics = eval_fn(module)
        bad = {k: v for k, v in metrics.items() if wrong(v)} if has_data() else {}
        if bad:
            names = ", ".join(f"{k}={v}" for k, v in bad.items())
            raise RunFailed(
                f"{what}: validation {names} at step {step()}; stopping the run (the checkpoints saved before "
                "this step are kept; lower the learning rate or check the data and config)"
            )
        return metrics

    return checked
