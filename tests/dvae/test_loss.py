"""Likelihood, pixel map, KL and Gumbel-softmax of the dVAE (dalle_ds/dvae/loss.py, PAPER §1.2)."""

import math

import pytest
import torch

from dalle_ds.dvae.loss import gumbel_softmax, kl_to_uniform, logit_laplace_log_prob, map_pixels, unmap_pixels


def test_logit_laplace_matches_direct_density():
    """ln f equals the log of f(x|mu,b) = exp(-|logit x - mu|/b) / (2b x(1-x)) evaluated directly (fp64)."""
    g = torch.Generator().manual_seed(1234)
    x = torch.rand(4, 3, 5, 5, generator=g, dtype=torch.float64) * 0.98 + 0.01
    mu = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) * 2
    b = torch.rand(4, 3, 5, 5, generator=g, dtype=torch.float64) * 3 + 0.05
    density = torch.exp(-torch.abs(torch.log(x / (1 - x)) - mu) / b) / (2 * b * x * (1 - x))
    got = logit_laplace_log_prob(x, mu, torch.log(b))
    assert got.dtype == torch.float64 and got.shape == x.shape
    torch.testing.assert_close(got, torch.log(density), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mu,b", [(0.0, 1.0), (-2.0, 0.25), (1.5, 0.5), (0.7, 1.3)])
def test_logit_laplace_integrates_to_one(mu, b):
    """The density integrates to 1 over (0, 1): trapezoid in logit space with dx = x(1-x) dy."""
    y = torch.linspace(-32.0, 32.0, 400_001, dtype=torch.float64)
    x = torch.sigmoid(y)
    logp = logit_laplace_log_prob(x, torch.full_like(x, mu), torch.full_like(x, math.log(b)))
    integrand = torch.exp(logp) * x * (1 - x)
    assert abs(torch.trapezoid(integrand, y).item() - 1.0) < 1e-6


def test_map_unmap_round_trip():
    """unmap_pixels(map_pixels(x)) == x for x in [0, 1]."""
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0, :2] = torch.tensor([0.0, 1.0])
    torch.testing.assert_close(unmap_pixels(map_pixels(x)), x, rtol=0, atol=1e-6)


def test_map_pixels_range():
    """map_pixels sends 0 -> 0.1 and 1 -> 0.9 and [0, 1] into [0.1, 0.9]; unmap clamps to [0, 1]."""
    x = torch.linspace(0, 1, 101)
    y = map_pixels(x)
    assert y.min().item() == pytest.approx(0.1) and y.max().item() == pytest.approx(0.9)
    torch.testing.assert_close(map_pixels(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([0.1, 0.5, 0.9]))
    assert unmap_pixels(torch.tensor([0.0, 1.0])).tolist() == [0.0, 1.0]


def test_kl_to_uniform_matches_direct_sum():
    """kl_to_uniform equals sum_k q_k ln(q_k K) computed independently in fp64, reduced over dim 1."""
    logits = torch.randn(3, 17, 4, 5, generator=torch.Generator().manual_seed(7)) * 3
    e = torch.exp(logits.double() - logits.double().amax(dim=1, keepdim=True))
    q = e / e.sum(dim=1, keepdim=True)
    expected = (q * torch.log(q * 17)).sum(dim=1)
    got = kl_to_uniform(logits, dim=1)
    assert got.shape == (3, 4, 5)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_kl_to_uniform_zero_for_uniform():
    """Equal logits give q = uniform: KL 0."""
    kl = kl_to_uniform(torch.full((2, 64, 3, 3), 1.7), dim=1)
    torch.testing.assert_close(kl, torch.zeros(2, 3, 3), rtol=0, atol=1e-5)


def test_kl_to_uniform_ln_k_for_one_hot():
    """A (numerically) one-hot q has KL ln K to the uniform prior."""
    logits = torch.full((2, 64, 3, 3), -1e4)
    logits[:, 5] = 0.0
    torch.testing.assert_close(kl_to_uniform(logits, dim=1), torch.full((2, 3, 3), math.log(64)))


def test_gumbel_softmax_is_a_distribution_and_reproducible():
    """Samples are non-negative, sum to 1 along dim, and repeat exactly with an equally seeded generator."""
    logits = torch.randn(2, 10, 3, 3)
    a = gumbel_softmax(logits, 0.7, dim=1, generator=torch.Generator().manual_seed(3))
    b = gumbel_softmax(logits, 0.7, dim=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and (a >= 0).all()
    torch.testing.assert_close(a.sum(dim=1), torch.ones(2, 3, 3))


def test_gumbel_softmax_argmax_follows_softmax():
    """Gumbel-max: the argmax of the relaxed sample is distributed as softmax(logits)."""
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    n = 40_000
    s = gumbel_softmax(logits.expand(n, 4), 1.0, dim=1, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(s.argmax(dim=1), minlength=4).float() / n
    torch.testing.assert_close(freq, torch.softmax(logits, 0), rtol=0, atol=0.01)


def test_gumbel_softmax_low_temperature_is_near_one_hot():
    """As the temperature goes to 0 the relaxed sample approaches a one-hot vector."""
    logits = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    s = gumbel_softmax(logits, 1e-3, dim=1, generator=torch.Generator().manual_seed(2))
    assert (s.amax(dim=1) > 0.99).float().mean() > 0.95
