"""The discrete VAE (stage 1, PAPER §1): a convolutional encoder to K-way logits on a G x G grid, a
Gumbel-softmax relaxation, a convolutional decoder to logit-Laplace parameters.

The architecture follows the official release (openai/DALL-E `dall_e/encoder.py`, `decoder.py`), module
names included (`blocks.input`, `blocks.group_1.block_1.res_path.conv_1.w`, ..., `blocks.output.conv`),
so a state dict taken from the released modules has the same keys for the paper configuration. The
release hard-codes 4 groups; here the number of groups and blocks per group come from `DVAEConfig`.

Shapes: B batch, C image channels (3), H = W = image_size, K = vocab_size, G = H / 2 ** (n_groups - 1).
Precision: the encoder's last conv (logits) and the decoder's first conv always compute in fp32, as in
the release; every other conv computes in its weight dtype (or the autocast dtype when autocast is on).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle_ds.config import DVAEConfig
from dalle_ds.dvae.loss import gumbel_softmax, kl_to_uniform, logit_laplace_log_prob, map_pixels, unmap_pixels


class Conv2d(nn.Module):
    """Square 'same' convolution with the release's init: w ~ N(0, 1 / (n_in k^2)), b = 0, pad (k-1)/2."""

    def __init__(self, n_in: int, n_out: int, kw: int, *, fp32: bool = False) -> None:
        super().__init__()
        if n_in < 1 or n_out < 1:
            raise ValueError(f"Conv2d: channel counts must be >= 1, got n_in={n_in}, n_out={n_out}")
        if kw < 1 or kw % 2 != 1:
            raise ValueError(f"Conv2d: kernel size must be odd and >= 1, got {kw}")
        self.n_in, self.n_out, self.kw, self.fp32 = n_in, n_out, kw, fp32
        self.padding = (kw - 1) // 2
        w = torch.empty((n_out, n_in, kw, kw)).normal_(std=1 / math.sqrt(n_in * kw**2))
        self.w = nn.Parameter(w)  # (n_out, n_in, k, k)
        self.b = nn.Parameter(torch.zeros((n_out,)))  # (n_out,)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, n_in, h, w) -> (B, n_out, h, w)
        if self.fp32:
            x, w, b = x.float(), self.w.float(), self.b.float()
            # (meta tensors have no autocast: asking raises; bench_steps counts FLOPs on meta)
            if torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type):
                with torch.autocast(x.device.type, enabled=False):
                    return F.conv2d(x, w, b, padding=self.padding)
            return F.conv2d(x, w, b, padding=self.padding)
        return F.conv2d(x.to(self.w.dtype), self.w, self.b, padding=self.padding)

    def extra_repr(self) -> str:
        return f"{self.n_in}, {self.n_out}, kernel_size={self.kw}, padding={self.padding}, fp32={self.fp32}"


def _post_gain(cfg: DVAEConfig) -> float:
    """PAPER §1.1: resblock branches are scaled by 1 / n_layers^2, n_layers = n_groups * n_blk_per_group."""
    return 1.0 / (cfg.n_groups * cfg.n_blk_per_group) ** 2


class _BottleneckBlock(nn.Module):
    """skip + post_gain * (ReLU-conv x4) with bottleneck width n_out / 4; `kernels` are the four conv sizes.
    Module names follow the official release so its weights load by key."""

    KERNELS: tuple[int, int, int, int] = (3, 3, 3, 1)

    def __init__(self, n_in: int, n_out: int, post_gain: float) -> None:
        super().__init__()
        if n_out % 4 != 0:
            raise ValueError(f"{type(self).__name__}: n_out must be a multiple of 4 (bottleneck n_out/4), got {n_out}")
        self.n_in, self.n_out, self.n_hid = n_in, n_out, n_out // 4
        self.post_gain = post_gain
        widths = (n_in, self.n_hid, self.n_hid, self.n_hid, n_out)
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential()
        for i, k in enumerate(self.KERNELS):
            self.res_path.add_module(f"relu_{i + 1}", nn.ReLU())
            self.res_path.add_module(f"conv_{i + 1}", Conv2d(widths[i], widths[i + 1], k))

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, n_in, h, w) -> (B, n_out, h, w)
        return self.id_path(x) + self.post_gain * self.res_path(x)


class EncoderBlock(_BottleneckBlock):
    """Encoder resblock: skip + post_gain * (ReLU-3x3-ReLU-3x3-ReLU-3x3-ReLU-1x1)."""

    KERNELS = (3, 3, 3, 1)


class DecoderBlock(_BottleneckBlock):
    """Decoder resblock: skip + post_gain * (ReLU-1x1-ReLU-3x3-ReLU-3x3-ReLU-3x3)."""

    KERNELS = (1, 3, 3, 3)


class Encoder(nn.Module):
    """Mapped pixels (B, C, H, W) in [0.1, 0.9] -> fp32 code logits (B, K, G, G)."""

    def __init__(self, cfg: DVAEConfig) -> None:
        super().__init__()
        if cfg.n_groups < 1 or cfg.n_blk_per_group < 1:
            raise ValueError(
                f"Encoder: need n_groups >= 1 and n_blk_per_group >= 1, got {cfg.n_groups} and {cfg.n_blk_per_group}"
            )
        self.cfg = cfg
        gain = _post_gain(cfg)
        self.blocks = nn.Sequential()
        self.blocks.add_module("input", Conv2d(cfg.channels, cfg.n_hid, 7))  # (B, n_hid, H, W)
        n_prev = cfg.n_hid
        for g in range(cfg.n_groups):
            width = cfg.n_hid * 2**g
            group = nn.Sequential()
            for i in range(cfg.n_blk_per_group):
                group.add_module(f"block_{i + 1}", EncoderBlock(n_prev if i == 0 else width, width, gain))
            if g < cfg.n_groups - 1:
                group.add_module("pool", nn.MaxPool2d(kernel_size=2))  # spatial / 2
            self.blocks.add_module(f"group_{g + 1}", group)  # (B, width, H/2^g', ...)
            n_prev = width
        output = nn.Sequential()
        output.add_module("relu", nn.ReLU())
        output.add_module("conv", Conv2d(n_prev, cfg.vocab_size, 1, fp32=True))
        self.blocks.add_module("output", output)  # (B, K, G, G) fp32

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C, H, W) mapped pixels -> (B, K, G, G) fp32 logits
        if x.ndim != 4 or x.shape[1] != self.cfg.channels:
            raise ValueError(f"Encoder: expected (B, {self.cfg.channels}, H, W), got {tuple(x.shape)}")
        # channels-last activations: oneDNN's convs ran a CPU training step ~25 % faster (same function,
        # summed in another order)
        return self.blocks(x.contiguous(memory_format=torch.channels_last))


class Decoder(nn.Module):
    """Relaxed or one-hot codes (B, K, G, G) -> (B, 2C, H, W): mu for C channels, then ln b."""

    def __init__(self, cfg: DVAEConfig) -> None:
        super().__init__()
        if cfg.n_groups < 1 or cfg.n_blk_per_group < 1:
            raise ValueError(
                f"Decoder: need n_groups >= 1 and n_blk_per_group >= 1, got {cfg.n_groups} and {cfg.n_blk_per_group}"
            )
        self.cfg = cfg
        gain = _post_gain(cfg)
        self.blocks = nn.Sequential()
        self.blocks.add_module("input", Conv2d(cfg.vocab_size, cfg.n_init, 1, fp32=True))  # (B, n_init, G, G)
        n_prev = cfg.n_init
        for g in range(cfg.n_groups):
            width = cfg.n_hid * 2 ** (cfg.n_groups - 1 - g)  # widest first
            group = nn.Sequential()
            for i in range(cfg.n_blk_per_group):
                group.add_module(f"block_{i + 1}", DecoderBlock(n_prev if i == 0 else width, width, gain))
            if g < cfg.n_groups - 1:
                group.add_module("upsample", nn.Upsample(scale_factor=2, mode="nearest"))  # spatial x 2
            self.blocks.add_module(f"group_{g + 1}", group)
            n_prev = width
        output = nn.Sequential()
        output.add_module("relu", nn.ReLU())
        output.add_module("conv", Conv2d(n_prev, 2 * cfg.channels, 1))
        self.blocks.add_module("output", output)  # (B, 2C, H, W)

    def forward(self, z: Tensor) -> Tensor:
        # z: (B, K, G, G) -> (B, 2C, H, W)
        if z.ndim != 4 or z.shape[1] != self.cfg.vocab_size:
            raise ValueError(f"Decoder: expected (B, {self.cfg.vocab_size}, G, G), got {tuple(z.shape)}")
        return self.blocks(z.contiguous(memory_format=torch.channels_last))  # see Encoder.forward


class DVAE(nn.Module):
    """Encoder + Gumbel-softmax relaxation + decoder, with the paper's relaxed ELB loss (PAPER §1.2)."""

    def __init__(self, cfg: DVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def _check_pixels(self, pixels: Tensor) -> None:
        c, d = self.cfg.channels, self.cfg.downsample
        if pixels.ndim != 4 or pixels.shape[1] != c:
            raise ValueError(f"DVAE: expected pixels of shape (B, {c}, H, W), got {tuple(pixels.shape)}")
        if pixels.shape[2] % d or pixels.shape[3] % d:
            raise ValueError(
                f"DVAE: image sides {tuple(pixels.shape[2:])} must be multiples of the "
                f"downsampling factor {d} (2 ** (n_groups - 1))"
            )

    def forward(
        self,
        pixels: Tensor,
        *,
        temperature: float,
        kl_weight: float,
        mse_weight: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict]:
        """Relaxed loss for pixels (B, C, H, W) in [0, 1].

        loss = mean_b (nll_sum + kl_weight * kl_sum) / (H W C): the logit-Laplace NLL summed over every
        subpixel and the analytic KL to the uniform prior summed over the G x G positions, both divided
        by the number of subpixels (PAPER §1.2); plus, when mse_weight > 0 (DVAETrainConfig.mse_warmup, not
        in the paper), mse_weight * the mean squared error of sigmoid(mu) to the mapped pixels. Returns
        (loss, stats); stats are detached 0-dim tensors: nll (per subpixel), kl (nats per position), loss,
        recon_mse (of the [0, 1] reconstruction from the relaxed codes), codebook_usage (distinct argmax
        codes in the batch).
        """
        self._check_pixels(pixels)
        b, c, h, w = pixels.shape
        x = map_pixels(pixels.float())  # (B, C, H, W) in [0.1, 0.9]
        logits = self.encoder(x)  # (B, K, G, G) fp32
        z = gumbel_softmax(logits, temperature, dim=1, generator=generator)  # (B, K, G, G) relaxed one-hot
        out = self.decoder(z)  # (B, 2C, H, W)
        mu, log_b = out[:, :c].float(), out[:, c:].float()  # (B, C, H, W) each
        log_b = log_b.clamp(max=self.cfg.max_log_b)  # see DVAEConfig.max_log_b

        nll_sum = -logit_laplace_log_prob(x, mu, log_b).sum(dim=(1, 2, 3))  # (B,)
        kl_sum = kl_to_uniform(logits, dim=1).sum(dim=(1, 2))  # (B,)
        n_sub = h * w * c
        loss = ((nll_sum + kl_weight * kl_sum) / n_sub).mean()  # ()
        mean = torch.sigmoid(mu)  # (B, C, H, W) in (0, 1)
        if mse_weight > 0:
            loss = loss + mse_weight * F.mse_loss(mean, x)

        with torch.no_grad():
            recon = unmap_pixels(mean)  # (B, C, H, W) in [0, 1]
            codes = logits.argmax(dim=1)  # (B, G, G)
            # distinct codes; not bincount, which has no meta kernel (bench_steps counts FLOPs on meta)
            seen = torch.zeros(self.cfg.vocab_size, dtype=torch.bool, device=codes.device)
            used = seen.index_fill_(0, codes.flatten(), True).sum()
            stats = {
                "loss": loss.detach(),
                "nll": nll_sum.mean() / n_sub,
                "kl": kl_sum.mean() / (logits.shape[2] * logits.shape[3]),
                "recon_mse": F.mse_loss(recon, pixels.float()),
                "codebook_usage": used,
            }
        return loss, stats

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """Pixels (B, C, H, W) in [0, 1] -> tokens (B, G, G) int64: argmax of the logits, no noise."""
        self._check_pixels(pixels)
        logits = self.encoder(map_pixels(pixels.float()))  # (B, K, G, G)
        return logits.argmax(dim=1)  # (B, G, G)

    def decode(self, tokens: Tensor) -> Tensor:
        """Tokens (B, G, G) int -> images (B, C, H, W) in [0, 1]: unmap_pixels(sigmoid(mu)), ln b ignored."""
        if tokens.ndim != 3:
            raise ValueError(f"DVAE.decode: expected tokens of shape (B, G, G), got {tuple(tokens.shape)}")
        z = F.one_hot(tokens.long(), self.cfg.vocab_size)  # (B, G, G, K)
        z = z.permute(0, 3, 1, 2).float()  # (B, K, G, G)
        out = self.decoder(z)  # (B, 2C, H, W)
        mu = out[:, : self.cfg.channels].float()  # (B, C, H, W)
        return unmap_pixels(torch.sigmoid(mu))  # (B, C, H, W) in [0, 1]

    def reconstruct(self, pixels: Tensor) -> Tensor:
        """decode(encode(pixels)): the reconstruction through the hard (argmax) codes."""
        return self.decode(self.encode(pixels))
