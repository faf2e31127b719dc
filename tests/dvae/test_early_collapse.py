"""The shapes preset's dVAE recipe keeps the encoder out of its early collapse.

Without the KL term (KL weight 0 while it warms up), the first updates shrink the Gumbel noise the decoder
sees by making one code certain everywhere: the encoder's logits run away within ~20 Adam steps (seed 3:
the top logit ~1000 above the mean, one code used, no gradient left, a black dVAE). The KL to the uniform
prior from step 0 (`kl_warmup_steps=0`) bounds them. This runs the preset's own model, optimiser and
temperature/KL schedules on shapes images for a few dozen steps, without the squared-error warm-up
(`mse_warmup`), so that the KL's effect is measured alone (with it, seed 3 peaks near 20, not ~1000).
"""

import dataclasses

import torch

from dalle_ds.config import get_preset
from dalle_ds.data.shapes import ShapesDataset
from dalle_ds.dvae.loss import map_pixels
from dalle_ds.dvae.model import DVAE
from dalle_ds.dvae.schedules import dvae_schedules

STEPS = 40


def _worst_logit_gap(train_cfg, seed: int, images: torch.Tensor, dvae_cfg) -> float:
    """Largest mean (top logit - mean logit) of the encoder over STEPS AdamW steps from seed's init."""
    torch.manual_seed(seed)
    model = DVAE(dvae_cfg)
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=train_cfg.lr,
        betas=train_cfg.betas,
        eps=train_cfg.eps,
        weight_decay=train_cfg.weight_decay,
    )
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for step in range(STEPS):
        s = dvae_schedules(step, train_cfg)
        x = images[torch.randint(0, len(images), (32,), generator=gen)]
        loss, _ = model(x, temperature=s["temperature"], kl_weight=s["kl_weight"], generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            logits = model.encoder(map_pixels(x))  # (B, K, G, G)
        worst = max(worst, float((logits.max(1).values - logits.mean(1)).mean()))
    return worst


def test_kl_from_step_zero_bounds_the_encoder_logits():
    cfg = get_preset("shapes")
    assert cfg.dvae_train.kl_warmup_steps == 0 and cfg.dvae_train.kl_weight > 0
    data = ShapesDataset(split="train", size=256, image_size=cfg.data.image_size, seed=0)
    images = torch.stack([data[i]["image"] for i in range(len(data))]).float() / 255  # (N, 3, H, W)
    seeds = (0, 3)
    with_kl = [_worst_logit_gap(cfg.dvae_train, s, images, cfg.dvae) for s in seeds]
    warm_up = dataclasses.replace(cfg.dvae_train, kl_warmup_steps=1000)  # KL weight ~0 for these steps
    without = [_worst_logit_gap(warm_up, s, images, cfg.dvae) for s in seeds]
    assert max(with_kl) < 15, with_kl
    assert max(without) > 5 * max(with_kl), (without, with_kl)  # seed 3 runs away (~1000) without the KL
