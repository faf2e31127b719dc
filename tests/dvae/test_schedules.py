"""Cosine schedules of the dVAE (dalle_ds/dvae/schedules.py, PAPER §1.3)."""

import pytest
import torch

from dalle_ds.config import DVAETrainConfig
from dalle_ds.dvae.schedules import cosine, dvae_schedules, lr_factor, lr_lambda


def test_cosine_endpoints_and_midpoint():
    """cosine() starts at start, is halfway at steps/2 and reaches end at steps."""
    assert cosine(0, 1.0, 0.0, 100) == pytest.approx(1.0)
    assert cosine(50, 1.0, 0.0, 100) == pytest.approx(0.5)
    assert cosine(100, 1.0, 0.0, 100) == pytest.approx(0.0)


def test_cosine_held_after_end():
    """After `steps` (and for steps <= 0) the value stays at end."""
    assert cosine(101, 2.0, 3.0, 100) == 3.0
    assert cosine(10**9, 2.0, 3.0, 100) == 3.0
    assert cosine(5, 2.0, 3.0, 0) == 3.0


def test_paper_schedules_endpoints():
    """Paper config: tau 1 -> 1/16, KL weight 0 -> 6.6, lr 1e-4 -> 1.25e-6 at their own step counts."""
    cfg = DVAETrainConfig()
    s0 = dvae_schedules(0, cfg)
    assert s0 == pytest.approx({"temperature": 1.0, "kl_weight": 0.0, "lr": 1e-4, "mse_weight": 0.0})
    assert dvae_schedules(cfg.temp_anneal_steps, cfg)["temperature"] == pytest.approx(1 / 16)
    assert dvae_schedules(cfg.kl_warmup_steps, cfg)["kl_weight"] == pytest.approx(6.6)
    assert dvae_schedules(cfg.lr_decay_steps, cfg)["lr"] == pytest.approx(1.25e-6)
    assert dvae_schedules(cfg.steps, cfg) == pytest.approx(
        {"temperature": 1 / 16, "kl_weight": 6.6, "lr": 1.25e-6, "mse_weight": 0.0}
    )


def test_paper_schedules_monotone():
    """Temperature and lr never increase, KL weight never decreases."""
    cfg = DVAETrainConfig()
    steps = range(0, 1_300_000, 997)
    s = [dvae_schedules(t, cfg) for t in steps]
    for a, b in zip(s, s[1:]):
        assert b["temperature"] <= a["temperature"]
        assert b["lr"] <= a["lr"]
        assert b["kl_weight"] >= a["kl_weight"]


def test_mse_warmup_fades_to_zero():
    """The (non-paper) squared-error weight runs cosine from mse_warmup to 0 over mse_warmup_steps, then stays 0."""
    cfg = DVAETrainConfig(mse_warmup=10.0, mse_warmup_steps=100)
    weights = [dvae_schedules(t, cfg)["mse_weight"] for t in range(0, 201)]
    assert weights[0] == pytest.approx(10.0) and weights[50] == pytest.approx(5.0)
    assert weights[100] == 0.0 and all(w == 0.0 for w in weights[100:])
    assert all(b <= a for a, b in zip(weights, weights[1:]))


def test_lr_lambda_drives_lambdalr():
    """lr_lambda(cfg) in LambdaLR reproduces dvae_schedules' lr step by step (ratio lr_factor to cfg.lr)."""
    cfg = DVAETrainConfig(lr=2e-3, lr_end=1e-4, lr_decay_steps=10)
    assert lr_factor(0, cfg) == pytest.approx(1.0) and lr_factor(10, cfg) == pytest.approx(0.05)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    for step in range(15):
        assert opt.param_groups[0]["lr"] == pytest.approx(dvae_schedules(step, cfg)["lr"])
        opt.step()
        sched.step()
