"""The dVAE's likelihood, pixel map, KL to the uniform prior and Gumbel-softmax relaxation (PAPER §1.2).

Everything here is elementwise or per position; the model (`model.py`) sums and normalises. All
functions compute in fp32 (or fp64 when given fp64) whatever the input dtype, because they feed the loss.
"""

import math

import torch
from torch import Tensor

LOGIT_LAPLACE_EPS = 0.1  # PAPER §1.2: pixels are mapped to [eps, 1 - eps] = [0.1, 0.9]


def _float(x: Tensor) -> Tensor:
    """Promote half/bfloat16 to fp32; leave fp32 and fp64 alone."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def map_pixels(x: Tensor, eps: float = LOGIT_LAPLACE_EPS) -> Tensor:
    """[0, 1] -> [eps, 1 - eps]: phi(x) = (1 - 2 eps) x + eps (avoids the x(1-x) singularity)."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: Tensor, eps: float = LOGIT_LAPLACE_EPS) -> Tensor:
    """Inverse of `map_pixels`, clamped to [0, 1]."""
    return torch.clamp((x - eps) / (1 - 2 * eps), 0, 1)


def logit_laplace_log_prob(x: Tensor, mu: Tensor, log_b: Tensor) -> Tensor:
    """Elementwise ln f(x | mu, b) of the logit-Laplace density on (0, 1), b = exp(log_b).

    f(x | mu, b) = exp(-|logit x - mu| / b) / (2 b x (1 - x)), so
    ln f = -|logit x - mu| / b - ln 2b - ln x - ln(1 - x). `x` must already be mapped into (0, 1)
    (`map_pixels`); `mu` and `log_b` are the decoder's first and second groups of output maps.
    """
    x, mu, log_b = _float(x), _float(mu), _float(log_b)
    log_x, log_1mx = torch.log(x), torch.log1p(-x)
    logit_x = log_x - log_1mx
    return -torch.abs(logit_x - mu) * torch.exp(-log_b) - math.log(2.0) - log_b - log_x - log_1mx


def kl_to_uniform(logits: Tensor, dim: int = 1) -> Tensor:
    """Analytic KL(q || uniform over K codes) = ln K - H(q) = sum_k q_k ln(q_k K), reduced over `dim`.

    `logits` are the encoder's unnormalised log-probabilities, e.g. (B, K, G, G) -> (B, G, G) nats.
    """
    logits = _float(logits)
    log_q = torch.log_softmax(logits, dim=dim)
    num_codes = logits.shape[dim]
    return (log_q.exp() * log_q).sum(dim=dim) + math.log(num_codes)


def gumbel_softmax(
    logits: Tensor, temperature: float, dim: int = 1, generator: torch.Generator | None = None
) -> Tensor:
    """Relaxed one-hot sample softmax((logits + g) / temperature), g ~ Gumbel(0, 1) i.i.d. (soft, no ST).

    `generator` (on the logits' device) makes the noise reproducible.
    """
    if temperature <= 0:
        raise ValueError(f"gumbel_softmax: temperature must be > 0, got {temperature}")
    logits = _float(logits)
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    u = u.clamp_(min=torch.finfo(logits.dtype).tiny)  # rand is in [0, 1): only 0 needs guarding
    gumbels = -torch.log(-torch.log(u))
    return torch.softmax((logits + gumbels) / temperature, dim=dim)
