"""The dVAE's cosine schedules (PAPER §1.3): Gumbel temperature, KL weight and learning rate.

Each schedule runs from its start value at step 0 to its end value at its own number of steps and is
held at the end value afterwards (the paper does not say what happens after; this is the project's
choice). Steps are optimiser updates, 0-based.
"""

import math
from collections.abc import Callable

from dalle_ds.config import DVAETrainConfig


def cosine(step: int, start: float, end: float, steps: int) -> float:
    """Half-cosine from `start` (step 0) to `end` (step >= `steps`); `end` afterwards and when steps <= 0."""
    if steps <= 0 or step >= steps:
        return float(end)
    t = max(step, 0) / steps
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def dvae_schedules(step: int, train_cfg: DVAETrainConfig) -> dict:
    """{'temperature', 'kl_weight', 'lr', 'mse_weight'} at `step`: tau temp_start -> temp_end over
    temp_anneal_steps, KL weight 0 -> kl_weight over kl_warmup_steps, lr lr -> lr_end over lr_decay_steps,
    and the (non-paper) squared-error weight mse_warmup -> 0 over mse_warmup_steps."""
    c = train_cfg
    return {
        "temperature": cosine(step, c.temp_start, c.temp_end, c.temp_anneal_steps),
        "kl_weight": cosine(step, 0.0, c.kl_weight, c.kl_warmup_steps),
        "lr": cosine(step, c.lr, c.lr_end, c.lr_decay_steps),
        "mse_weight": cosine(step, c.mse_warmup, 0.0, c.mse_warmup_steps),
    }


def lr_factor(step: int, train_cfg: DVAETrainConfig) -> float:
    """The scheduled learning rate as a multiple of train_cfg.lr (1 at step 0, lr_end / lr at the end)."""
    return cosine(step, train_cfg.lr, train_cfg.lr_end, train_cfg.lr_decay_steps) / train_cfg.lr


def lr_lambda(train_cfg: DVAETrainConfig) -> Callable[[int], float]:
    """A one-argument `lr_factor` for torch.optim.lr_scheduler.LambdaLR (optimiser built with lr=cfg.lr)."""

    def factor(step: int) -> float:
        return lr_factor(step, train_cfg)

    return factor
