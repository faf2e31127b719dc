"""open_clip model configs, read from the files of the installed open_clip_torch package without importing it.

open_clip itself cannot be imported beside this project's torch 2.13.0 (CPU): it imports torchvision, and
PyPI's torchvision wheels for that torch are CUDA builds that fail to load (`operator torchvision::nms does
not exist`). Its JSON model configs and BPE vocabulary are plain files, so dalle_ds reads those and runs
the model itself (open_clip_model.py, clip_bpe.py).

Supported: the classic CLIP layout (ViT image tower + causal text transformer), i.e. the built-in
`ViT-*` configs (ViT-B-32, ViT-L-14, ViT-H-14, `-quickgelu` variants, ...). timm / ResNet image towers,
Hugging Face text towers, CoCa and SigLIP are refused with a message.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def package_file(name: str) -> Path:
    """A file shipped inside open_clip_torch (found by spec, so open_clip's code never runs)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "--open-clip needs the open_clip_torch package files (its BPE vocabulary and model "
            "configs): pip install --no-deps open_clip_torch==3.3.0 (`make install` does)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / name


@dataclass
class VisionCfg:
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    head_width: int = 64
    mlp_ratio: float = 4.0
    ls_init_value: float | None = None
    no_ln_pre: bool = False
    pool_type: str = "tok"
    final_ln_after_pool: bool = False


@dataclass
class TextCfg:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    ls_init_value: float | None = None
    no_causal_mask: bool = False
    pool_type: str = "argmax"
    eos_id: int = 2
    proj_type: str = "linear"
    proj_bias: bool = False
    clean: str = "lower"  # open_clip's tokenizer_kwargs.clean


@dataclass
class PreprocessCfg:
    size: int = 224
    mean: tuple = OPENAI_MEAN
    std: tuple = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"


@dataclass
class OpenClipConfig:
    embed_dim: int
    vision: VisionCfg
    text: TextCfg
    quick_gelu: bool = False
    custom_text: bool = False  # CustomTextCLIP layout: text tower weights under `text.`
    norm_eps: float = 1e-5
    preprocess: PreprocessCfg = field(default_factory=PreprocessCfg)


# Keys of open_clip's CLIPVisionCfg / CLIPTextCfg that change nothing at inference (dropout, output flags,
# pad/eos ids of pool types we support through other fields) or are checked separately.
_IGNORED = {
    "patch_dropout",
    "output_tokens",
    "pad_id",
    "tokenizer_mode",
    "hf_model_pretrained",
    "timm_model_pretrained",
    "pos_embed_type",
    "act_kwargs",
    "norm_kwargs",
}


def _take(cls, d: dict, what: str, extra_ok: set):
    known = set(cls.__dataclass_fields__)
    bad = {k: v for k, v in d.items() if k not in known | _IGNORED | extra_ok}
    # Flags left at open_clip's defaults are harmless; anything else is a feature we do not implement.
    bad = {k: v for k, v in bad.items() if v not in (None, False, 0, 0.0, "", "default", {}, [])}
    if bad:
        raise ValueError(
            f"open_clip {what} settings {sorted(bad)} are not supported by dalle_ds's loader "
            "(it runs ViT + text-transformer CLIP models only)"
        )
    return cls(**{k: v for k, v in d.items() if k in known})


def parse_config(cfg: dict, preprocess: dict | None = None) -> OpenClipConfig:
    """open_clip's JSON model config (+ optional preprocess_cfg) -> OpenClipConfig, refusing what we can't run."""
    v, t = dict(cfg["vision_cfg"]), dict(cfg["text_cfg"])
    if "timm_model_name" in v or isinstance(v.get("layers"), (list, tuple)):
        raise ValueError("open_clip configs with timm or ResNet image towers are not supported")
    if "hf_model_name" in t or "hf_tokenizer_name" in t or "multimodal_cfg" in cfg:
        raise ValueError("open_clip configs with Hugging Face text towers or CoCa are not supported")
    if v.get("pos_embed_type", "learnable") not in ("learnable", "sin_cos_2d"):  # both are a stored table
        raise ValueError(f"vision pos_embed_type {v['pos_embed_type']!r} is not supported")
    eps = {(c.get("norm_kwargs") or {}).get("eps", 1e-5) for c in (v, t)}
    if len(eps) != 1 or any((c.get("act_kwargs") or {}) for c in (v, t)):
        raise ValueError("open_clip norm_kwargs/act_kwargs other than one shared LayerNorm eps are not supported")
    tok = dict(t.pop("tokenizer_kwargs", None) or {})
    if set(tok) - {"clean"}:
        raise ValueError(f"open_clip tokenizer_kwargs {sorted(set(tok) - {'clean'})} are not supported")
    vision = _take(VisionCfg, v, "vision_cfg", set())
    text = _take(TextCfg, t, "text_cfg", set())
    text.clean = tok.get("clean", "lower")
    if vision.pool_type not in ("tok", "avg") or text.pool_type not in ("argmax", "first", "last", "eos"):
        raise ValueError(f"pool types {vision.pool_type!r}/{text.pool_type!r} are not supported")
    if isinstance(vision.image_size, (list, tuple)) or isinstance(vision.patch_size, (list, tuple)):
        if len({*_pair(vision.image_size)}) != 1 or len({*_pair(vision.patch_size)}) != 1:
            raise ValueError("non-square open_clip image or patch sizes are not supported")
        vision.image_size, vision.patch_size = _pair(vision.image_size)[0], _pair(vision.patch_size)[0]
    top = {
        k
        for k in cfg
        if k
        not in (
            "embed_dim",
            "vision_cfg",
            "text_cfg",
            "quick_gelu",
            "custom_text",
            "init_logit_scale",
            "init_logit_bias",
            "nonscalar_logit_scale",
            "preprocess_cfg",
            "cast_dtype",
        )
    }
    if top:
        raise ValueError(f"open_clip config keys {sorted(top)} are not supported")
    pre = PreprocessCfg(size=vision.image_size)
    for k, val in (preprocess or {}).items():
        if k in ("mean", "std", "interpolation", "resize_mode") and val is not None:
            setattr(pre, k, tuple(val) if k in ("mean", "std") and isinstance(val, (list, tuple)) else val)
    if pre.resize_mode not in ("shortest", "squash") or pre.interpolation not in ("bicubic", "bilinear", "random"):
        raise ValueError(f"open_clip preprocessing {pre.resize_mode!r}/{pre.interpolation!r} is not supported")
    return OpenClipConfig(
        embed_dim=cfg["embed_dim"],
        vision=vision,
        text=text,
        quick_gelu=bool(cfg.get("quick_gelu")),
        custom_text=bool(cfg.get("custom_text")),
        norm_eps=eps.pop(),
        preprocess=pre,
    )


def _pair(x):
    return tuple(x) if isinstance(x, (list, tuple)) else (x, x)


def load_config(arch: str) -> OpenClipConfig:
    """ARCH is a built-in open_clip name (ViT-B-32), a JSON model config file, or an `open_clip_config.json`
    ({"model_cfg": ..., "preprocess_cfg": ...}, the layout of open_clip models on the Hugging Face hub)."""
    path = Path(arch)
    if not path.is_file():
        path = package_file("model_configs") / f"{arch.replace('/', '-')}.json"
        if not path.is_file():
            names = sorted(p.stem for p in path.parent.glob("ViT-*.json"))
            raise ValueError(
                f"unknown open_clip model {arch!r}: give a config JSON file or a built-in name, "
                f"e.g. {', '.join(names[:6])}, ..."
            )
    d = json.loads(path.read_text())
    if "model_cfg" in d:
        return parse_config(d["model_cfg"], d.get("preprocess_cfg"))
    return parse_config(d)
