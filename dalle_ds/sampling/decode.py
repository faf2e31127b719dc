"""Autoregressive sampling of image tokens from the prior: temperature, top-k, nucleus, priming.

Two paths compute the same thing: the KV-cached decode (`prefill` once, then one `decode_step` per
token) and the slow reference that re-runs the full `Prior.logits` pass for every token. Both draw
exactly one uniform number per sequence per token from `generator`, in the same order, so with the
same generator they produce the same tokens (up to float round-off flipping a draw that lands on a
boundary between two tokens, which has probability ~1e-7 per draw in fp32).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from dalle_ds.prior.model import Prior


def filter_logits(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the nucleus of mass top_p (last dim).

    top_k = 0 and top_p = 1.0 are off. The nucleus is the smallest set of most likely tokens whose
    probability reaches top_p; the most likely token is always kept. Returns a new tensor.
    """
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
    out = logits.clone()
    if 0 < top_k < out.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]  # (..., 1)
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        drop_sorted = mass_before >= top_p  # the nucleus is already complete without it
        drop_sorted[..., 0] = False  # keep at least one token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def _draw(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """One token per row of logits (B, V) by inverse-CDF sampling: exactly B uniforms from `generator`."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p)
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    cdf = probs.cumsum(dim=-1)  # (B, V)
    gen_device = generator.device if generator is not None else logits.device
    u = torch.rand(logits.shape[0], 1, generator=generator, device=gen_device).to(logits.device)
    u = u * cdf[:, -1:]  # (B, 1) in [0, total mass)
    # first index whose cdf exceeds u: always a token with probability > 0
    idx = torch.searchsorted(cdf, u, right=True).clamp_(max=logits.shape[-1] - 1)
    return idx.squeeze(1)  # (B,)


@torch.no_grad()
def sample_image_tokens(
    prior: Prior,
    text: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    prime: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample the N image tokens (raster order) for each caption.

    text: (B, T) tokenizer ids (pad 0); prime: optional (B, m) first image tokens (image-to-image:
    the top rows of a token grid), kept as they are. use_cache=False re-runs the full forward per token
    (the reference path). Runs in eval mode; the module's training flag is restored afterwards.
    Returns (B, N) long.
    """
    N = prior.image_len
    B = text.shape[0]
    device = text.device
    image = torch.zeros(B, N, dtype=torch.long, device=device)  # (B, N)
    m = 0
    if prime is not None:
        m = prime.shape[1]
        if prime.shape[0] != B or m > N:
            raise ValueError(f"prime must be (B={B}, m <= {N}), got {tuple(prime.shape)}")
        image[:, :m] = prime
    if m == N:
        return image

    was_training = prior.training
    prior.eval()
    try:
        if use_cache:
            cache = prior.init_cache(B, device=device)
            logits = prior.prefill(text, cache, image[:, :m])  # (B, Vi): logits of token m
            for r in range(m, N):
                image[:, r] = _draw(logits, temperature, top_k, top_p, generator)
                if r + 1 < N:
                    logits = prior.decode_step(image[:, r], cache)  # logits of token r + 1
        else:
            for r in range(m, N):
                # tokens after r are still zeros: causality keeps them from reaching position T + r
                _, image_logits = prior.logits(text, image)  # (B, N, Vi)
                image[:, r] = _draw(image_logits[:, r], temperature, top_k, top_p, generator)
    finally:
        prior.train(was_training)
    return image
