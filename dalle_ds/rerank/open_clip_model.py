"""open_clip's CLIP (ViT image tower + causal text transformer) in plain torch, with open_clip's parameter
names, so its checkpoints load as they are: visual.{conv1, class_embedding, positional_embedding, ln_pre,
transformer.resblocks.N.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_post, proj},
token_embedding, positional_embedding, transformer.resblocks.N..., ln_final, text_projection, logit_scale.
Attention is torch's nn.MultiheadAttention, as in open_clip. Checked against open_clip itself by
tests/sampling/test_open_clip.py (reference outputs made by tests/data/open_clip/make_fixture.py).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dalle_ds.rerank.open_clip_config import OpenClipConfig, PreprocessCfg


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(init * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, ls_init: float | None, act, eps: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ls_1 = LayerScale(width, ls_init) if ls_init is not None else nn.Identity()
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", act()), ("c_proj", nn.Linear(hidden, width))])
        )
        self.ls_2 = LayerScale(width, ls_init) if ls_init is not None else nn.Identity()

    def forward(self, x, mask=None):
        h = self.ln_1(x)
        x = x + self.ls_1(self.attn(h, h, h, need_weights=False, attn_mask=mask)[0])
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, mlp_ratio, ls_init, act, eps):
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, ls_init, act, eps) for _ in range(layers)
        )

    def forward(self, x, mask=None):
        for blk in self.resblocks:
            x = blk(x, mask)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, cfg: OpenClipConfig, act):
        super().__init__()
        v, eps = cfg.vision, cfg.norm_eps
        self.cfg = v
        grid = v.image_size // v.patch_size
        self.conv1 = nn.Conv2d(3, v.width, kernel_size=v.patch_size, stride=v.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(v.width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, v.width))
        self.ln_pre = nn.Identity() if v.no_ln_pre else nn.LayerNorm(v.width, eps=eps)
        self.transformer = Transformer(
            v.width, v.layers, v.width // v.head_width, v.mlp_ratio, v.ls_init_value, act, eps
        )
        self.ln_post = nn.LayerNorm(v.width, eps=eps)
        self.proj = nn.Parameter(torch.zeros(v.width, cfg.embed_dim))

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, grid², width)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
        x = self.ln_pre(x + self.positional_embedding.to(x.dtype))
        x = self.transformer(x)
        if not self.cfg.final_ln_after_pool:
            x = self.ln_post(x)
        pooled = x[:, 0] if self.cfg.pool_type == "tok" else x[:, 1:].mean(dim=1)
        if self.cfg.final_ln_after_pool:
            pooled = self.ln_post(pooled)
        return pooled @ self.proj


class OpenClip(nn.Module):
    """Attribute layout of open_clip's `CLIP` (text tower at top level; CustomTextCLIP's `text.` prefix is
    removed on load)."""

    def __init__(self, cfg: OpenClipConfig):
        super().__init__()
        t, eps = cfg.text, cfg.norm_eps
        act = QuickGELU if cfg.quick_gelu else nn.GELU
        self.cfg = cfg
        self.visual = VisionTransformer(cfg, act)
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.zeros(t.context_length, t.width))
        self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_ratio, t.ls_init_value, act, eps)
        self.ln_final = nn.LayerNorm(t.width, eps=eps)
        if t.proj_type == "none":
            self.text_projection = None
        elif t.proj_bias:
            self.text_projection = nn.Linear(t.width, cfg.embed_dim)
        else:
            self.text_projection = nn.Parameter(torch.zeros(t.width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.zeros(()))
        causal = torch.full((t.context_length, t.context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", None if t.no_causal_mask else causal, persistent=False)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        t = self.cfg.text
        x = self.token_embedding(ids) + self.positional_embedding
        x = self.ln_final(self.transformer(x, self.attn_mask))
        rows = torch.arange(x.shape[0], device=x.device)
        if t.pool_type == "argmax":  # EOT has the highest id in CLIP's vocabulary
            x = x[rows, ids.argmax(dim=-1)]
        elif t.pool_type == "eos":
            x = x[rows, (ids == t.eos_id).int().argmax(dim=-1)]
        else:
            x = x[:, 0] if t.pool_type == "first" else x[:, -1]
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x if self.text_projection is None else x @ self.text_projection


def read_state_dict(path: str | Path, custom_text: bool = False) -> dict[str, torch.Tensor]:
    """A checkpoint as open_clip's load_state_dict reads it: safetensors or torch.save'd (weights only), a bare
    state dict or open_clip training's {"state_dict": {"module.…": …}}."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # noqa: PLC0415

        sd = load_file(str(path))
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # TorchScript archives (OpenAI's original .pt) and pickled objects
            raise ValueError(
                f"{path}: not a state-dict checkpoint that loads with weights_only=True ({e}). "
                "Save `model.state_dict()` of the open_clip model (or use its safetensors file)"
            ) from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd:
        raise ValueError(f"{path}: no state dict inside")
    if next(iter(sd)).startswith("module."):  # saved from DistributedDataParallel
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    if custom_text:
        sd = {k[len("text.") :] if k.startswith("text.") else k: v for k, v in sd.items()}
    sd.pop("logit_bias", None)  # SigLIP-style bias: shifts every score equally, so ranking ignores it
    if "logit_scale" in sd:
        sd["logit_scale"] = sd["logit_scale"].reshape(())
    return sd


def load_model(cfg: OpenClipConfig, checkpoint: str | Path) -> OpenClip:
    sd = read_state_dict(checkpoint, cfg.custom_text)
    with torch.device("meta"):  # names and shapes only: a mismatch is refused before any real allocation
        want = {k: v.shape for k, v in OpenClip(cfg).state_dict().items()}
    missing, unexpected = sorted(want.keys() - sd.keys()), sorted(sd.keys() - want.keys())
    wrong = sorted(
        f"{k} {tuple(sd[k].shape)} != {tuple(want[k])}" for k in want.keys() & sd.keys() if sd[k].shape != want[k]
    )
    if missing or unexpected or wrong:
        raise ValueError(
            f"{checkpoint} does not match the open_clip config (is ARCH the model it was trained as?): "
            f"missing {missing[:4]}, unexpected {unexpected[:4]}, wrong shape {wrong[:4]}"
        )
    model = OpenClip(cfg)
    model.load_state_dict(sd)
    return model.float().eval()


def preprocess(images: np.ndarray, cfg: PreprocessCfg) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised float (N, 3, S, S), as open_clip's eval transform does on PIL images:
    resize (shortest side to S, or squash) with PIL, centre crop (torchvision's rounding), /255, mean/std."""
    from PIL import Image  # noqa: PLC0415

    s = cfg.size
    resample = Image.BILINEAR if cfg.interpolation == "bilinear" else Image.BICUBIC
    out = []
    for im in np.asarray(images):
        img = Image.fromarray(im).convert("RGB")
        w, h = img.size
        if cfg.resize_mode == "squash":
            size = (s, s)
        else:
            short, long = min(w, h), max(w, h)
            size = (s, int(s * long / short)) if w <= h else (int(s * long / short), s)
        if size != (w, h):
            img = img.resize(size, resample)
        w, h = img.size
        top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
        img = img.crop((left, top, left + s, top + s))
        out.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()))
    x = torch.stack(out).permute(0, 3, 1, 2).float().div(255.0)
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    return (x - mean) / std
