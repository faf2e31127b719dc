"""Architecture and forward pass of the dVAE (dalle_ds/dvae/model.py, PAPER §1.1-1.2)."""

import math

import pytest
import torch

from dalle_ds.config import DVAEConfig, get_preset
from dalle_ds.dvae import DVAE, map_pixels
from dalle_ds.dvae.loss import gumbel_softmax, kl_to_uniform, logit_laplace_log_prob
from dalle_ds.dvae.model import Conv2d, DecoderBlock, EncoderBlock


def _model(preset: str = "tiny", seed: int = 0) -> DVAE:
    torch.manual_seed(seed)
    return DVAE(get_preset(preset).dvae)


def _pixels(cfg: DVAEConfig, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, cfg.channels, cfg.image_size, cfg.image_size, generator=g)


def test_paper_param_counts_on_meta():
    """Paper config (n_hid 256, 4x2 blocks, K 8192): ~53.8M encoder and ~43.8M decoder parameters."""
    with torch.device("meta"):
        model = DVAE(DVAEConfig())
    n_enc = sum(p.numel() for p in model.encoder.parameters())
    n_dec = sum(p.numel() for p in model.decoder.parameters())
    assert n_enc == pytest.approx(53.8e6, rel=0.01)
    assert n_dec == pytest.approx(43.8e6, rel=0.01)


def test_paper_post_gain_is_one_over_64():
    """Every resblock of the paper config scales its branch by 1 / (4 * 2)^2 = 1/64."""
    with torch.device("meta"):
        model = DVAE(DVAEConfig())
    blocks = [m for m in model.modules() if isinstance(m, (EncoderBlock, DecoderBlock))]
    assert len(blocks) == 16
    assert all(b.post_gain == 1 / 64 for b in blocks)


def test_official_module_names():
    """State-dict keys follow the official release (blocks.group_g.block_i.res_path.conv_j.w, ...)."""
    with torch.device("meta"):
        model = DVAE(DVAEConfig())
    enc, dec = model.encoder.state_dict(), model.decoder.state_dict()
    assert enc["blocks.input.w"].shape == (256, 3, 7, 7)
    assert "blocks.group_1.block_1.id_path.w" not in enc  # 256 -> 256: identity skip
    assert enc["blocks.group_2.block_1.id_path.w"].shape == (512, 256, 1, 1)
    assert enc["blocks.group_4.block_2.res_path.conv_4.w"].shape == (2048, 512, 1, 1)
    assert enc["blocks.output.conv.w"].shape == (8192, 2048, 1, 1)
    assert dec["blocks.input.w"].shape == (128, 8192, 1, 1)
    assert dec["blocks.group_1.block_1.id_path.w"].shape == (2048, 128, 1, 1)
    assert dec["blocks.group_4.block_2.res_path.conv_4.w"].shape == (256, 64, 3, 3)
    assert dec["blocks.output.conv.w"].shape == (6, 256, 1, 1)


def test_conv_init_and_padding():
    """Conv2d: weights ~ N(0, 1/(n_in k^2)), zero biases, 'same' output size; even kernels are refused."""
    torch.manual_seed(0)
    conv = Conv2d(64, 96, 3)
    assert conv.w.std().item() == pytest.approx(1 / math.sqrt(64 * 9), rel=0.03)
    assert abs(conv.w.mean().item()) < 0.005 and torch.all(conv.b == 0)
    assert conv(torch.randn(1, 64, 7, 5)).shape == (1, 96, 7, 5)
    with pytest.raises(ValueError, match="odd"):
        Conv2d(4, 4, 2)


@pytest.mark.parametrize("preset", ["tiny", "shapes"])
def test_encoder_decoder_shapes(preset):
    """Encoder gives fp32 (B, K, G, G) with G = image_size / 2^(n_groups-1); decoder gives (B, 2C, H, W)."""
    cfg = get_preset(preset).dvae
    model = _model(preset)
    grid = cfg.image_size // 2 ** (cfg.n_groups - 1)
    with torch.no_grad():
        logits = model.encoder(map_pixels(_pixels(cfg)))
        assert logits.shape == (2, cfg.vocab_size, grid, grid) and logits.dtype == torch.float32
        out = model.decoder(torch.softmax(logits, dim=1))
    assert out.shape == (2, 2 * cfg.channels, cfg.image_size, cfg.image_size)


def test_logits_fp32_with_bf16_weights():
    """The logits stay fp32 when the model's weights and the input are bfloat16."""
    model = _model().to(torch.bfloat16)
    cfg = model.cfg
    with torch.no_grad():
        logits = model.encoder(map_pixels(_pixels(cfg)).to(torch.bfloat16))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_encode_is_deterministic_argmax():
    """encode() is the argmax of the encoder logits, with no noise: repeated calls agree."""
    model = _model()
    x = _pixels(model.cfg, batch=3)
    tokens = model.encode(x)
    assert tokens.shape == (3, 4, 4) and tokens.dtype == torch.int64
    with torch.no_grad():
        expected = model.encoder(map_pixels(x)).argmax(dim=1)
    assert torch.equal(tokens, expected) and torch.equal(model.encode(x), tokens)


def test_decode_in_unit_range():
    """decode() maps any token grid to (B, C, H, W) images in [0, 1]."""
    model = _model()
    tokens = torch.randint(0, model.cfg.vocab_size, (3, 4, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        img = model.decode(tokens)
        rec = model.reconstruct(_pixels(model.cfg))
    assert img.shape == (3, 3, 16, 16) and rec.shape == (2, 3, 16, 16)
    assert img.min() >= 0 and img.max() <= 1 and rec.min() >= 0 and rec.max() <= 1


def test_loss_normalisation():
    """loss = mean_b (NLL summed over H*W*C + kl_weight * KL summed over G*G) / (H*W*C); stats agree."""
    model = _model()
    x = _pixels(model.cfg, batch=3)
    loss, stats = model(x, temperature=0.5, kl_weight=2.5, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        xm = map_pixels(x)
        logits = model.encoder(xm)
        z = gumbel_softmax(logits, 0.5, dim=1, generator=torch.Generator().manual_seed(9))
        out = model.decoder(z)
        nll = -logit_laplace_log_prob(xm, out[:, :3], out[:, 3:]).sum(dim=(1, 2, 3))
        kl = kl_to_uniform(logits).sum(dim=(1, 2))
    n_sub = 16 * 16 * 3
    torch.testing.assert_close(loss.detach(), ((nll + 2.5 * kl) / n_sub).mean())
    torch.testing.assert_close(stats["nll"], nll.mean() / n_sub)
    torch.testing.assert_close(stats["kl"], kl.mean() / 16)
    torch.testing.assert_close(stats["loss"], loss.detach())
    assert int(stats["codebook_usage"]) == logits.argmax(dim=1).unique().numel()
    assert 0 <= float(stats["recon_mse"]) <= 1


def test_mse_weight_adds_the_squared_error_of_the_mapped_pixels():
    """mse_weight > 0 adds mse_weight * mean (sigmoid(mu) - mapped x)^2 to the paper's loss (same noise), and
    its gradient reaches the encoder and the decoder."""
    model = _model()
    x = _pixels(model.cfg, batch=3)
    base, _ = model(x, temperature=0.5, kl_weight=2.5, generator=torch.Generator().manual_seed(9))
    loss, _ = model(x, temperature=0.5, kl_weight=2.5, mse_weight=7.0, generator=torch.Generator().manual_seed(9))
    xm = map_pixels(x)
    z = gumbel_softmax(model.encoder(xm), 0.5, dim=1, generator=torch.Generator().manual_seed(9))
    mse = ((torch.sigmoid(model.decoder(z)[:, :3]) - xm) ** 2).mean()
    torch.testing.assert_close(loss, base + 7.0 * mse)
    (loss - base).backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0
        for p in (model.encoder.blocks.input.w, model.decoder.blocks.output.conv.w)
    )


def test_max_log_b_caps_the_scale_in_the_loss_only():
    """With dvae.max_log_b the NLL uses min(ln b, cap) per subpixel (a direct recomputation), the cap
    binds where the decoder's ln b exceeds it, and encode/decode do not depend on it."""
    import dataclasses

    model = _model()
    x = _pixels(model.cfg, batch=2)
    with torch.no_grad():
        model.decoder.blocks.output.conv.b[3:] += 2.0  # make ln b exceed the cap somewhere
    losses = []
    capped = DVAE(dataclasses.replace(model.cfg, max_log_b=-1.0))
    capped.load_state_dict(model.state_dict())
    for m, cap in ((model, None), (capped, -1.0)):
        loss, _ = m(x, temperature=0.5, kl_weight=0.0, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            xm = map_pixels(x)
            z = gumbel_softmax(m.encoder(xm), 0.5, dim=1, generator=torch.Generator().manual_seed(3))
            out = m.decoder(z)
            out_ln_b = out[:, 3:]
            ln_b = out_ln_b if cap is None else out_ln_b.clamp(max=cap)
            nll = -logit_laplace_log_prob(xm, out[:, :3], ln_b).sum(dim=(1, 2, 3)) / xm[0].numel()
        torch.testing.assert_close(loss.detach(), nll.mean())
        losses.append(float(loss))
    assert (out_ln_b > -1.0).any() and losses[0] != losses[1]  # the cap binds and changes the loss
    with torch.no_grad():
        torch.testing.assert_close(capped.decode(capped.encode(x)), model.decode(model.encode(x)))


def test_gradient_reaches_encoder_and_decoder():
    """Through the Gumbel-softmax relaxation every encoder and decoder parameter gets a finite gradient."""
    model = _model()
    loss, _ = model(_pixels(model.cfg), temperature=1.0, kl_weight=1.0)
    loss.backward()
    for name, part in (("encoder", model.encoder), ("decoder", model.decoder)):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert sum(g.abs().sum().item() for g in grads) > 0, name
    # the encoder's logits get gradient from the reconstruction, not only from the KL
    model.zero_grad()
    loss, _ = model(_pixels(model.cfg), temperature=1.0, kl_weight=0.0)
    loss.backward()
    assert model.encoder.blocks.output.conv.w.grad.abs().sum() > 0


def test_bad_input_shape_is_refused():
    """Pixels with the wrong channel count or a side not divisible by the downsampling are refused."""
    model = _model()
    with pytest.raises(ValueError, match="channels|shape"):
        model.encode(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="multiples"):
        model.encode(torch.rand(1, 3, 18, 18))
