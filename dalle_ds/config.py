"""Configuration: one keyword-only dataclass per component, named presets, validated overrides.

A run is described by an `ExperimentConfig` holding one dataclass per component. Presets are plain
functions (`tiny`, `shapes`, `small`, `12b`). Overrides come as dotted keys (`prior.d_model=256`) from
the command line or as a nested YAML mapping, and are checked against the dataclass fields: an unknown
field or a value of the wrong type is refused with a message naming the field. Batch size and
precision are not here: they belong to the DeepSpeed JSON in `ds_configs/`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dalle_ds.attention import backend_names
from dalle_ds.data.records import DATASETS
from dalle_ds.errors import ConfigError
from dalle_ds.training.compression import COMPRESSORS
from dalle_ds.training.grad_scaling import NONFINITE_POLICIES, SCALING_MODES

__all__ = ["ConfigError"]  # re-exported: callers catch config.ConfigError


@dataclass(kw_only=True)
class DataConfig:
    dataset: str = "shapes"  # built-in procedural captioned shapes
    image_size: int = 256  # pixels per side fed to the dVAE
    num_train: int = 20000  # shapes: number of training pairs
    num_val: int = 512  # shapes: validation pairs (training compositions, other seeds)
    two_shape_prob: float = 0.3  # shapes: fraction of images with two shapes
    seed: int = 0
    # --- external sources (dataset = folder | hf_disk | parquet | imagefolder | webdataset); see data/sources.py
    path: str = ""  # folder, save_to_disk folder, parquet file/glob, or tar shard glob
    image_column: str = ""  # "" = auto: image | jpg | jpeg | png | webp
    caption_column: str = ""  # "" = auto: caption | text | txt | alt
    # a source without its own val split holds out, by a hash of the record key, val_fraction of its records
    # but at most val_max_items (780 records -> 39, 20,000 -> 300); a streaming one val_fraction (data/split.py)
    val_fraction: float = 0.05
    val_max_items: int = 300
    streaming: bool = False  # iterate without loading the index into memory (datasets streaming)
    max_image_pixels: int = 89_478_485  # larger images are refused as decompression bombs
    max_image_bytes: int = 64 * 2**20  # a larger image file is refused unread (a `path` to /dev/zero is endless)
    allow_absolute_paths: bool = False  # image `path`s outside data.path's folder (absolute or ../) are refused
    # --- the paper's filters (PAPER §7.5); each can be switched off
    min_caption_words: int = 2  # 0 = off; 2 keeps "A frog." and drops lone tokens ("logo"): data/filters.py
    filter_english: bool = True  # cheap heuristic, see data/filters.py
    filter_boilerplate: bool = True  # "photographed on <date>", "IMG_1234.JPG", ...
    filter_aspect: bool = True
    min_aspect: float = 0.5  # width / height must lie in [min_aspect, max_aspect]
    max_aspect: float = 2.0


@dataclass(kw_only=True)
class TokenizerConfig:
    vocab_size: int = 16384  # PAPER §2
    text_len: int = 256  # text slots; longer captions are truncated (warned once)
    bpe_dropout: float = 0.1  # PAPER §2: training only, never at sampling
    lowercase: bool = True


@dataclass(kw_only=True)
class DVAEConfig:
    image_size: int = 256
    channels: int = 3
    n_hid: int = 256  # width of the first group; doubles per group (PAPER §1.1)
    n_groups: int = 4  # downsampling factor = 2 ** (n_groups - 1)
    n_blk_per_group: int = 2
    n_init: int = 128  # decoder's first 1x1 conv width
    vocab_size: int = 8192  # codebook size K
    # Upper clamp on the logit-Laplace ln b in the loss. The paper has none (the default never binds).
    # On flat synthetic images a free b lets the decoder call every shape pixel uncertain (large b) and
    # stop learning colours; a cap keeps colour errors expensive (the shapes preset uses -1).
    max_log_b: float = 30.0

    @property
    def downsample(self) -> int:
        return 2 ** (self.n_groups - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample


@dataclass(kw_only=True)
class DVAETrainConfig:
    steps: int = 3_000_000
    lr: float = 1e-4  # cosine 1e-4 -> 1.25e-6 over lr_decay_steps (PAPER §1.3)
    lr_end: float = 1.25e-6
    lr_decay_steps: int = 1_200_000
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-4
    kl_weight: float = 6.6  # cosine 0 -> 6.6 over kl_warmup_steps
    kl_warmup_steps: int = 5000
    # Not in the paper (0 = off): an extra squared error of the mapped pixels, weight cosine mse_warmup -> 0
    # over mse_warmup_steps. The logit-Laplace loss is an L1 loss, whose best output for a code is the median
    # of the pixels the code is drawn for: while codes still say little, every code decodes to the black
    # background and a colour can stay lost. A squared error pulls each code towards the mean instead.
    mse_warmup: float = 0.0
    mse_warmup_steps: int = 0
    temp_start: float = 1.0  # gumbel-softmax temperature, cosine 1 -> 1/16
    temp_end: float = 1.0 / 16
    temp_anneal_steps: int = 150_000
    ema_decay: float = 0.999
    log_every: int = 50
    save_every: int = 5000
    eval_every: int = 5000  # val PSNR + OUT/recon_stepN.png (originals above reconstructions); 0 = only at the end
    seed: int = 0
    allow_tf32: bool = True  # an fp32 ds_config on an sm80+ GPU runs matmuls and convs in TF32 (training/precision.py)


@dataclass(kw_only=True)
class PriorConfig:
    text_len: int = 256
    text_vocab_size: int = 16384  # BPE ids; per-position pad tokens are added on top of these
    image_grid: int = 32  # image tokens per side
    image_vocab_size: int = 8192
    d_model: int = 3968
    n_layers: int = 64
    n_heads: int = 62
    mlp_ratio: int = 4
    tie_embeddings: bool = False  # output head = input embeddings (+ own bias); the 12b preset's choice
    conv_kernel: int = 11  # the last layer's causal conv window (PAPER §3.5)
    attention_backend: str = "auto"  # auto (triton on GPU, sparse on CPU) | dense | sparse | triton
    text_loss_weight: float = 1.0 / 8  # image weight is 1 - this (PAPER §3.4)
    dropout: float = 0.0

    @property
    def image_len(self) -> int:
        return self.image_grid**2

    @property
    def seq_len(self) -> int:
        return self.text_len + self.image_len

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass(kw_only=True)
class PriorTrainConfig:
    steps: int = 430_000
    lr: float = 4.5e-4  # linear warm-up then cosine decay to lr * lr_end_ratio
    warmup_steps: int = 5000
    lr_end_ratio: float = 1.0 / 32  # the paper ends at 1/32 of the peak after 5 halvings
    betas: tuple[float, float] = (0.9, 0.96)
    eps: float = 1e-8
    weight_decay: float = 4.5e-2
    log_every: int = 50
    save_every: int = 5000
    eval_every: int = 1000
    seed: int = 0
    # --- per-resblock gradient scaling (PAPER §4.2; training/grad_scaling.py)
    grad_scaling: str = "off"  # off | pow2 (exact power-of-two steps; bf16/fp32/tests) | paper (fp16)
    grad_scaling_policy: str = "skip"  # on a non-finite block: skip the update (paper) | zero_block
    grad_scale_init_log2: float = 13.0  # scales start at M * 2^init (M = data-parallel ranks)
    grad_scale_min_log2: float = 7.0  # and stay within [M * 2^min, M * 2^max]
    grad_scale_max_log2: float = 24.0
    grad_scale_growth_interval: int = 1000  # pow2: double after this many clean steps
    # --- memory and averaging
    activation_checkpoint_every: int = 0  # recompute every Nth layer's resblocks in backward (0 = off)
    ema_decay: float = 0.0  # iterate averaging of the weights (0 = off; paper 0.99)
    ema_every: int = 1  # update the average every N optimizer steps (paper: 25)
    # --- nodes: ZeRO-3 within a node, compressed gradient exchange between nodes (PAPER §5; training/node_exchange.py)
    compression: str = "none"  # none (plain ZeRO-3 over all ranks) | fp32 (node-local ZeRO-3, uncompressed
    # between nodes) | powersgd | onebit
    ranks_per_node: int = 0  # 0 = from the launcher; smaller simulates several nodes on one machine
    powersgd_rank: int = 112  # per GPU shard (each factorises its own): PAPER §5.3, 896 per 8-GPU node at 12B
    powersgd_fixed_q: bool = True  # the paper's fixed random Q; false = warm-start Q from the last step
    allow_tf32: bool = True  # an fp32 ds_config on an sm80+ GPU runs matmuls in TF32 (training/precision.py)


@dataclass(kw_only=True)
class SampleConfig:
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    num_per_caption: int = 1
    batch_size: int = 16
    seed: int = 0


@dataclass(kw_only=True)
class ClipConfig:
    """The small contrastive image-text model dalle_ds trains itself for reranking (PAPER §6)."""

    embed_dim: int = 128  # joint embedding width
    width: int = 64  # conv channels of the image tower; text tower width
    text_layers: int = 2  # transformer layers of the text tower
    heads: int = 4
    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-2
    log_every: int = 100
    save_every: int = 200  # checkpoint (model, optimizer, schedule, RNG, step) to OUT/clip_ckpt/; a rerun resumes
    seed: int = 0
    hard_negatives: float = 0.0  # fraction of a batch in pairs of one-word caption neighbours (train_clip)
    shape_stream: bool = False  # image tower: a second conv stack over brightness alone (contrastive.py)
    augment: float = 0.0  # random zoom and shift of training pictures, up to this fraction (rerank/augment.py)


@dataclass(kw_only=True)
class CheckpointConfig:
    """Training checkpoints (training/checkpoint.py), for the dVAE and the prior alike."""

    keep_last: int = 0  # after each save, delete all but the newest N checkpoints (0 = keep every one)


@dataclass(kw_only=True)
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    dvae: DVAEConfig = field(default_factory=DVAEConfig)
    dvae_train: DVAETrainConfig = field(default_factory=DVAETrainConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    prior_train: PriorTrainConfig = field(default_factory=PriorTrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self) -> ExperimentConfig:
        validate(self)
        return self

    def to_dict(self) -> dict:
        return to_dict(self)


# ----------------------------------------------------------------------------------------------
# Validation


def _require(cond: bool, field_name: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{field_name}: {message}")


# Lower bounds of counts, sizes and rates. Below them a run does not fail, it goes wrong quietly: steps=-5 wrote an
# untrained prior and exited 0, prior.text_len=0 trained on NaN losses, lr=-1 climbs the loss.
AT_LEAST_1 = (
    "data.image_size data.num_train data.num_val data.max_image_bytes tokenizer.text_len dvae.image_size "
    "dvae.channels dvae.n_hid dvae.n_blk_per_group dvae.n_init dvae_train.steps dvae_train.lr_decay_steps "
    "dvae_train.log_every dvae_train.save_every prior.text_len prior.image_grid prior.d_model prior.n_heads "
    "prior.mlp_ratio prior_train.steps prior_train.log_every prior_train.save_every sample.num_per_caption "
    "sample.batch_size clip.embed_dim clip.width clip.heads clip.steps clip.log_every "
    "clip.save_every"
).split()
AT_LEAST_0 = (
    "dvae_train.lr_end dvae_train.weight_decay dvae_train.kl_weight dvae_train.kl_warmup_steps "
    "dvae_train.mse_warmup_steps dvae_train.temp_anneal_steps prior_train.warmup_steps prior_train.weight_decay "
    "prior_train.eval_every clip.text_layers clip.weight_decay dvae_train.eval_every"
).split()
ABOVE_0 = (
    "dvae_train.lr dvae_train.eps dvae_train.temp_start dvae_train.temp_end prior_train.lr prior_train.eps clip.lr"
)
UNIT = "data.two_shape_prob prior_train.lr_end_ratio"  # in [0, 1]


def _check_bounds(cfg: ExperimentConfig) -> None:
    def value(dotted: str):
        section, name = dotted.split(".")
        return getattr(getattr(cfg, section), name)

    for f in AT_LEAST_1:
        _require(value(f) >= 1, f, f"must be >= 1, got {value(f)}")
    for f in AT_LEAST_0:
        _require(value(f) >= 0, f, f"must be >= 0, got {value(f)}")
    for f in ABOVE_0.split():
        _require(value(f) > 0, f, f"must be > 0, got {value(f)}")
    for f in UNIT.split():
        _require(0 <= value(f) <= 1, f, f"must be in [0, 1], got {value(f)}")
    for f in ("dvae_train.betas", "prior_train.betas"):
        _require(all(0 <= b < 1 for b in value(f)), f, f"each beta must be in [0, 1), got {value(f)}")
    for f in ("dvae_train.ema_decay", "prior.dropout"):
        _require(0 <= value(f) < 1, f, f"must be in [0, 1), got {value(f)}")
    _require(cfg.dvae.vocab_size >= 2, "dvae.vocab_size", f"must be >= 2, got {cfg.dvae.vocab_size}")


def _validate_dvae(cfg: ExperimentConfig) -> None:
    """The dVAE's shape and its training loss schedule."""
    d = cfg.dvae
    _require(d.n_groups >= 1, "dvae.n_groups", f"must be >= 1, got {d.n_groups}")
    _require(
        d.image_size % d.downsample == 0,
        "dvae.image_size",
        f"{d.image_size} is not divisible by the dVAE's downsampling factor {d.downsample} "
        f"(2 ** (dvae.n_groups - 1)); pick an image size that is a multiple of {d.downsample}",
    )
    _require(d.n_hid % 4 == 0, "dvae.n_hid", f"must be a multiple of 4 (bottleneck width n/4), got {d.n_hid}")
    dt = cfg.dvae_train
    _require(dt.mse_warmup >= 0, "dvae_train.mse_warmup", f"must be >= 0 (0 = off), got {dt.mse_warmup}")
    _require(
        dt.mse_warmup == 0 or dt.mse_warmup_steps > 0,
        "dvae_train.mse_warmup_steps",
        f"dvae_train.mse_warmup={dt.mse_warmup} needs mse_warmup_steps > 0 (the steps it fades over)",
    )


def _validate_data(cfg: ExperimentConfig) -> None:
    """The data source, its filters, and its image size against the dVAE's."""
    d, dc = cfg.dvae, cfg.data
    DATASETS.check(dc.dataset)
    _require(
        dc.dataset == "shapes" or bool(dc.path),
        "data.path",
        f"data.dataset={dc.dataset!r} reads from data.path, which is empty; set data.path=/your/data",
    )
    _require(0.0 <= dc.val_fraction < 1.0, "data.val_fraction", f"must be in [0, 1), got {dc.val_fraction}")
    _require(dc.val_max_items >= 0, "data.val_max_items", f"must be >= 0, got {dc.val_max_items}")
    _require(dc.min_caption_words >= 0, "data.min_caption_words", f"must be >= 0 (0 = off), got {dc.min_caption_words}")
    _require(
        0.0 < dc.min_aspect <= 1.0 <= dc.max_aspect,
        "data.min_aspect",
        f"need 0 < data.min_aspect <= 1 <= data.max_aspect, got {dc.min_aspect} and {dc.max_aspect}",
    )
    _require(dc.max_image_pixels > 0, "data.max_image_pixels", f"must be > 0, got {dc.max_image_pixels}")
    _require(
        cfg.data.image_size == d.image_size,
        "data.image_size",
        f"{cfg.data.image_size} differs from dvae.image_size {d.image_size}; set both to the same value",
    )


def _validate_prior(cfg: ExperimentConfig) -> None:
    """The prior's shape, and its grid, vocabularies and text length against the dVAE and tokenizer."""
    d, p, t = cfg.dvae, cfg.prior, cfg.tokenizer
    _require(
        p.n_heads > 0 and p.d_model % p.n_heads == 0,
        "prior.n_heads",
        f"{p.n_heads} heads do not divide prior.d_model {p.d_model}",
    )
    _require(p.n_layers >= 1, "prior.n_layers", f"must be >= 1, got {p.n_layers}")
    _require(
        p.conv_kernel % 2 == 1 and 1 <= p.conv_kernel <= 2 * p.image_grid - 1,
        "prior.conv_kernel",
        f"must be odd and at most 2 * prior.image_grid - 1 = {2 * p.image_grid - 1}, got {p.conv_kernel}",
    )
    _require(
        p.attention_backend in backend_names(),
        "prior.attention_backend",
        f"unknown backend {p.attention_backend!r}; choose one of {', '.join(backend_names())}",
    )
    _require(0.0 < p.text_loss_weight < 1.0, "prior.text_loss_weight", "must lie strictly between 0 and 1")
    _require(
        p.image_grid == d.grid_size,
        "prior.image_grid",
        f"{p.image_grid} differs from the dVAE's grid {d.grid_size} "
        f"(dvae.image_size / 2 ** (dvae.n_groups - 1)); make them equal",
    )
    _require(
        p.image_vocab_size == d.vocab_size,
        "prior.image_vocab_size",
        f"{p.image_vocab_size} differs from dvae.vocab_size {d.vocab_size}; make them equal",
    )
    _require(
        p.text_len == t.text_len,
        "prior.text_len",
        f"{p.text_len} differs from tokenizer.text_len {t.text_len}; make them equal",
    )
    _require(
        p.text_vocab_size == t.vocab_size,
        "prior.text_vocab_size",
        f"{p.text_vocab_size} differs from tokenizer.vocab_size {t.vocab_size}; make them equal",
    )


def _validate_tokenizer(cfg: ExperimentConfig) -> None:
    """BPE dropout and vocabulary size."""
    t = cfg.tokenizer
    _require(0.0 <= t.bpe_dropout < 1.0, "tokenizer.bpe_dropout", f"must be in [0, 1), got {t.bpe_dropout}")
    _require(t.vocab_size >= 64, "tokenizer.vocab_size", f"must be >= 64, got {t.vocab_size}")


def _validate_prior_train(cfg: ExperimentConfig) -> None:
    """Per-resblock gradient scaling, checkpointing, EMA and gradient compression."""
    pt = cfg.prior_train
    SCALING_MODES.check(pt.grad_scaling)
    NONFINITE_POLICIES.check(pt.grad_scaling_policy)
    _require(
        pt.grad_scale_min_log2 <= pt.grad_scale_init_log2 <= pt.grad_scale_max_log2,
        "prior_train.grad_scale_init_log2",
        f"{pt.grad_scale_init_log2} must lie in [prior_train.grad_scale_min_log2, prior_train.grad_scale_max_log2]"
        f" = [{pt.grad_scale_min_log2}, {pt.grad_scale_max_log2}]",
    )
    _require(
        pt.grad_scale_growth_interval >= 1,
        "prior_train.grad_scale_growth_interval",
        f"must be >= 1, got {pt.grad_scale_growth_interval}",
    )
    _require(
        pt.activation_checkpoint_every >= 0,
        "prior_train.activation_checkpoint_every",
        f"must be >= 0 (0 = off), got {pt.activation_checkpoint_every}",
    )
    _require(0.0 <= pt.ema_decay < 1.0, "prior_train.ema_decay", f"must be in [0, 1) (0 = off), got {pt.ema_decay}")
    _require(pt.ema_every >= 1, "prior_train.ema_every", f"must be >= 1, got {pt.ema_every}")
    COMPRESSORS.check(pt.compression)
    _require(
        pt.ranks_per_node >= 0,
        "prior_train.ranks_per_node",
        f"must be >= 0 (0 = from the launcher), got {pt.ranks_per_node}",
    )
    _require(pt.powersgd_rank >= 1, "prior_train.powersgd_rank", f"must be >= 1, got {pt.powersgd_rank}")


def _validate_clip(cfg: ExperimentConfig) -> None:
    """The reranker's width/heads, a usable contrastive batch and a zoom that keeps the picture."""
    c = cfg.clip
    _require(c.width % c.heads == 0, "clip.heads", f"{c.heads} heads do not divide clip.width {c.width}")
    _require(
        c.steps >= 1 and c.batch_size >= 2,
        "clip.batch_size",
        f"need clip.steps >= 1 and clip.batch_size >= 2 (a contrastive batch), got {c.steps}, {c.batch_size}",
    )
    _require(0.0 <= c.augment < 1.0, "clip.augment", f"must be in [0, 1) (0 = off; try 0.15), got {c.augment}")


def _validate_sample(cfg: ExperimentConfig) -> None:
    """Sampling temperature, top-p and top-k."""
    s = cfg.sample
    _require(s.temperature > 0, "sample.temperature", f"must be > 0, got {s.temperature}")
    _require(0.0 < s.top_p <= 1.0, "sample.top_p", f"must be in (0, 1], got {s.top_p}")
    _require(s.top_k >= 0, "sample.top_k", f"must be >= 0 (0 = off), got {s.top_k}")


def validate(cfg: ExperimentConfig) -> None:
    """Refuse inconsistent combinations, naming the field and the fix."""
    _check_bounds(cfg)
    _validate_dvae(cfg)
    _validate_data(cfg)
    _validate_prior(cfg)
    _validate_tokenizer(cfg)
    _validate_prior_train(cfg)
    _validate_clip(cfg)
    _validate_sample(cfg)


def check_compatible(saved: ExperimentConfig, current: ExperimentConfig, component: str) -> None:
    """Refuse a checkpoint whose architecture differs from the config it is loaded into."""
    a, b = getattr(saved, component), getattr(current, component)
    for f in dataclasses.fields(a):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if f.name in ("attention_backend", "dropout"):
            continue  # weights do not depend on these
        if va != vb:
            raise ConfigError(
                f"{component}.{f.name}: the checkpoint was trained with {va!r} but the config asks for "
                f"{vb!r}; drop the override or load a matching checkpoint"
            )


# ----------------------------------------------------------------------------------------------
# Presets


def preset_12b() -> ExperimentConfig:
    """The paper: 64 layers x 62 heads x 64 = d 3968, text 256 of 16384, image 32x32 of 8192.

    The head is tied to the input embeddings: 12.09 B of resblocks plus the vocabulary matrices once is
    12.20 B (+1.6% of the paper's 12.0 B); untied, the second 24,832 x 3968 matrix makes it 12.29 B."""
    return ExperimentConfig(prior=PriorConfig(tie_embeddings=True))


def preset_small() -> ExperimentConfig:
    """A CPU-trainable model at the paper's grid (32x32 = 1024 image tokens): benchmarks."""
    return ExperimentConfig(
        data=DataConfig(image_size=128),
        tokenizer=TokenizerConfig(vocab_size=4096, text_len=128),
        dvae=DVAEConfig(image_size=128, n_hid=64, n_groups=3, n_blk_per_group=1, n_init=64, vocab_size=2048),
        prior=PriorConfig(
            text_len=128,
            text_vocab_size=4096,
            image_grid=32,
            image_vocab_size=2048,
            d_model=256,
            n_layers=8,
            n_heads=4,
            conv_kernel=11,
        ),
    )


def preset_shapes() -> ExperimentConfig:
    """The built-in demo: 16 px shapes, an 8x8 grid of 2x2 px tokens; trains end to end in minutes on 2 CPU cores.

    The paper's schedules, compressed to a few thousand steps, with changes so flat synthetic images keep every
    colour: the KL term is on from step 0 (a warm-up lets one code turn certain everywhere and the dVAE decode
    black), a squared error fades out over the first 1000 steps (the logit-Laplace loss alone draws a code as
    the median of its pixels, black while codes say little), ln b is capped so colour errors stay expensive,
    and six shapes need 256 codes. Measurements: docs/RESULTS.md.
    """
    return ExperimentConfig(
        data=DataConfig(image_size=16, num_train=20000, num_val=512, two_shape_prob=0.3),
        tokenizer=TokenizerConfig(vocab_size=256, text_len=32),
        dvae=DVAEConfig(
            image_size=16, n_hid=32, n_groups=2, n_blk_per_group=1, n_init=32, vocab_size=256, max_log_b=-1.0
        ),
        dvae_train=DVAETrainConfig(
            steps=4000,
            lr=2e-3,
            lr_end=1e-4,
            lr_decay_steps=4000,
            kl_weight=1.0,
            kl_warmup_steps=0,
            mse_warmup=10.0,
            mse_warmup_steps=1000,
            temp_anneal_steps=3300,
            ema_decay=0.99,
            log_every=50,
            save_every=500,
            eval_every=500,
        ),
        prior=PriorConfig(
            text_len=32,
            text_vocab_size=256,
            image_grid=8,
            image_vocab_size=256,
            d_model=128,
            n_layers=4,
            n_heads=4,
            conv_kernel=5,
            attention_backend="dense",
        ),  # dense: the backend the demo's recorded timings used
        # lr 2e-3: lower validation loss and more right held-out samples than 1e-3 (docs/RESULTS.md)
        prior_train=PriorTrainConfig(
            steps=1500, lr=2e-3, warmup_steps=100, weight_decay=1e-2, log_every=50, save_every=500, eval_every=500
        ),
        sample=SampleConfig(temperature=1.0, top_k=0, top_p=0.9, batch_size=64),
        # the reranker: a bag of words (text_layers=0) scores word by word, so unseen pairs of seen words
        # still score; the brightness stack (shape_stream) sees a shape alike in every colour, which a
        # colour conv stack does not for a pair it never saw (best-of-48 comparisons: docs/RESULTS.md)
        clip=ClipConfig(embed_dim=128, width=32, text_layers=0, steps=600, hard_negatives=0.5, shape_stream=True),
    )


def _real(image_size: int) -> ExperimentConfig:
    """Shared by the real-data presets: a captioned folder (data.path set by the user or `dalle-ds demo
    --data`), short captions kept, an 8x8 grid of 4x4 px (real32) or 8x8 px (real64) tokens."""
    groups = {32: 3, 64: 4}[image_size]
    return ExperimentConfig(
        # data.path: where `make realdata` prepares the emoji set; any folder with train/ and val/ works
        data=DataConfig(
            dataset="folder",
            path=f".cache/emoji/data{image_size}",
            image_size=image_size,
            min_caption_words=1,
            val_fraction=0.15,
        ),
        tokenizer=TokenizerConfig(vocab_size=1024, text_len=16),
        dvae=DVAEConfig(
            image_size=image_size,
            n_hid=32,
            n_groups=groups,
            n_blk_per_group=1,
            n_init=64,
            vocab_size=512,
            max_log_b=-1.0,
        ),
        dvae_train=DVAETrainConfig(
            steps=2000,
            lr=2e-3,
            lr_end=1e-4,
            lr_decay_steps=2000,
            kl_weight=1.0,
            kl_warmup_steps=0,
            mse_warmup=10.0,
            mse_warmup_steps=700,
            temp_anneal_steps=1700,
            ema_decay=0.99,
            log_every=100,
            save_every=1000,
        ),
        prior=PriorConfig(
            text_len=16,
            text_vocab_size=1024,
            image_grid=8,
            image_vocab_size=512,
            d_model=128,
            n_layers=4,
            n_heads=4,
            conv_kernel=5,
            attention_backend="dense",
            dropout=0.1,
        ),
        prior_train=PriorTrainConfig(
            steps=1500, lr=2e-3, warmup_steps=100, weight_decay=1e-2, log_every=100, save_every=500, eval_every=500
        ),
        sample=SampleConfig(temperature=0.7, top_k=0, top_p=1.0, batch_size=64),  # best of 4 tried: docstring
        clip=ClipConfig(embed_dim=128, width=32, text_layers=0, steps=800, batch_size=128, augment=0.15),
    )


def preset_real32() -> ExperimentConfig:
    """Real captioned pictures at 32 px on one CPU machine (`make realdata`: the emoji benchmark, 1,458 train /
    256 held-out pictures of objects; 228 held-out captions name an object trained in the other style). One
    full run, 2026-12-06, 17 min on 2 cores (docs/RESULTS.md):

    * it draws objects: generated pictures' own caption ranks first among 32 for 0.125 of held-out captions
      (chance 0.031; the same pipeline on shuffled captions 0.035); the reranker scores the real held-out
      pictures 0.310, the ceiling of this measure. Objects never trained on stay near chance (2 of 28).
    * prior steps: val image loss is lowest near step 500 and rises after (1,458 pictures are learnt by
      heart), yet 1,500 steps retrieve better (0.126 against 0.078 at 500): drawing a seen object from
      memory is what most held-out captions ask for. Temperature 0.7 without top-p beat 1.0 / top-p 0.9
      (0.126 against 0.102). lr, sequence length and prior width were not varied.
    * the reranker was the first limit: without augmentation it scored only 0.113 on real held-out pictures
      (CRC split); a random zoom and shift of 15 % (clip.augment) gave 0.176 at the same cost.
    * the data split was another: CRC32 put both styles of an emoji on one side (only 78 of 256 held-out
      objects trained); SHA-256 fixed it (prepare_emoji.py).
    * the dVAE: 19.2 dB on held-out pictures after 2,000 steps, 191 of its 512 codes used; reconstructions
      keep colour and silhouette, lose detail.
    * cost per step (1 thread, batch 32): dVAE 0.19 s, prior 0.28 s (`dalle-ds bench steps`).
    """
    return _real(32)


def preset_real64() -> ExperimentConfig:
    """Real captioned pictures at 64 px on one CPU machine: real32's models with one more dVAE group (8x8 px
    tokens, the same 8x8 grid, so the prior costs the same); the dVAE step costs 0.76 s (1 thread, batch 32)
    against real32's 0.18 s. Not trained end to end yet."""
    return _real(64)


def preset_real256_gpu() -> ExperimentConfig:
    """Real captioned pictures at 256 px on one GPU: the paper's 32x32 grid of 8x8 px tokens, a 24-layer prior.

    Not trained here (no GPU on these machines): sizes follow real32 scaled towards the paper (codebook 8192,
    text 64 tokens of 16384); at ds_configs/gpu_zero2_bf16.json's batch of 8 (pair it with that file: batch and
    precision live there) its step counts take about 1.6 hours on one H100 by the README's preset cost table, a
    FLOP count at an assumed 40 % utilisation (`dalle-ds bench steps --preset real256_gpu`).
    data.path defaults to `make realdata-prepare REAL_SIZE=256`'s folder, but the emoji sources are 64 px
    (upscaled): point it at your own larger pictures."""
    cfg = _real(32)
    cfg.data.image_size, cfg.data.path = 256, ".cache/emoji/data256"
    cfg.tokenizer = TokenizerConfig(vocab_size=16384, text_len=64)
    cfg.dvae = DVAEConfig(image_size=256, n_hid=128, n_groups=4, n_blk_per_group=2, n_init=128, vocab_size=8192)
    cfg.dvae_train = DVAETrainConfig(
        steps=100_000,
        lr=1e-3,
        lr_end=1e-5,
        lr_decay_steps=100_000,
        kl_weight=1.0,
        kl_warmup_steps=0,
        mse_warmup=10.0,
        mse_warmup_steps=5000,
        temp_anneal_steps=80_000,
        ema_decay=0.999,
        save_every=5000,
    )
    cfg.prior = PriorConfig(
        text_len=64,
        text_vocab_size=16384,
        image_grid=32,
        image_vocab_size=8192,
        d_model=1024,
        n_layers=24,
        n_heads=16,
        conv_kernel=11,
        dropout=0.1,
    )
    cfg.prior_train = PriorTrainConfig(steps=100_000, lr=4.5e-4, warmup_steps=2000, weight_decay=4.5e-2)
    cfg.clip = ClipConfig(embed_dim=256, width=128, text_layers=2, heads=4, steps=20_000, batch_size=256)
    return cfg


def preset_tiny() -> ExperimentConfig:
    """Seconds-fast model for CPU tests; every code path, nothing learned."""
    return ExperimentConfig(
        data=DataConfig(image_size=16, num_train=256, num_val=32),
        tokenizer=TokenizerConfig(vocab_size=96, text_len=12),
        dvae=DVAEConfig(image_size=16, n_hid=8, n_groups=3, n_blk_per_group=1, n_init=8, vocab_size=32),
        dvae_train=DVAETrainConfig(
            steps=20, lr=1e-3, lr_decay_steps=20, kl_warmup_steps=5, temp_anneal_steps=10, log_every=5, save_every=10
        ),
        prior=PriorConfig(
            text_len=12,
            text_vocab_size=96,
            image_grid=4,
            image_vocab_size=32,
            d_model=32,
            n_layers=4,
            n_heads=2,
            conv_kernel=3,
        ),
        prior_train=PriorTrainConfig(steps=20, lr=1e-3, warmup_steps=2, log_every=5, save_every=10, eval_every=10),
        clip=ClipConfig(embed_dim=16, width=16, text_layers=1, heads=2, steps=10, batch_size=16, log_every=5),
    )


PRESETS = {
    "tiny": preset_tiny,
    "shapes": preset_shapes,
    "real32": preset_real32,
    "real64": preset_real64,
    "real256_gpu": preset_real256_gpu,
    "small": preset_small,
    "12b": preset_12b,
}


def get_preset(name: str) -> ExperimentConfig:
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


# ----------------------------------------------------------------------------------------------
# Overrides (command line `section.field=value` and nested YAML mappings) and (de)serialisation


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert `value` (a string from the command line or a YAML scalar) to the field's type."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{name}: expected {len(args)} comma-separated values, got {value!r}")
        return tuple(_coerce(v, a, name) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            f = float(str(value).replace("_", ""))
        except ValueError:
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
        if not f.is_integer():
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            text = str(value)
            if "/" in text:  # allow 1/16 for temperatures and loss weights
                num, den = text.split("/")
                return float(num) / float(den)
            out = float(text)
        except ValueError:
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
        if not math.isfinite(out):
            raise ConfigError(f"{name}: expected a finite number, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{name}: unsupported field type {tp!r}")


def _field_types(obj: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def _unknown(name: str, prefix: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
    return ConfigError(f"{prefix}{name}: unknown field{hint}; valid fields are: {', '.join(valid)}")


def set_field(cfg: ExperimentConfig, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"{dotted}: overrides are written section.field=value, e.g. prior.d_model=256")
    section, name = parts
    sections = _field_types(cfg)
    if section not in sections:
        raise _unknown(section, "", list(sections))
    sub = getattr(cfg, section)
    types = _field_types(sub)
    if name not in types:
        raise _unknown(name, f"{section}.", list(types))
    setattr(sub, name, _coerce(value, types[name], dotted))


def apply_overrides(cfg: ExperimentConfig, overrides: list[str] | dict | None) -> ExperimentConfig:
    """Apply `["prior.d_model=256", ...]` or a nested `{"prior": {"d_model": 256}}` mapping."""
    if not overrides:
        return cfg
    if isinstance(overrides, dict):
        for section, values in overrides.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{section}: expected a mapping of fields, got {values!r}")
            for name, value in values.items():
                set_field(cfg, f"{section}.{name}", value)
        return cfg
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: overrides are written section.field=value, e.g. prior.d_model=256")
        key, value = item.split("=", 1)
        set_field(cfg, key.strip(), value.strip())
    return cfg


def read_yaml(path: str | Path):
    """The YAML file given as --config, or a ConfigError naming the file and the line of a syntax error."""
    import yaml  # noqa: PLC0415 - only needed when a YAML file is given

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"--config: cannot read {path}: {reason}") from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"--config: {path} is not valid YAML{where}: {problem}") from None


def load_config(
    preset: str = "shapes", yaml_path: str | Path | None = None, overrides: list[str] | None = None
) -> ExperimentConfig:
    """Preset, then YAML file, then command-line overrides; validated at the end."""
    cfg = get_preset(preset)
    if yaml_path is not None:
        data = read_yaml(yaml_path)
        if not isinstance(data, dict):
            raise ConfigError(f"--config: {yaml_path}: expected a mapping of sections at the top level")
        apply_overrides(cfg, data)
    apply_overrides(cfg, overrides)
    return cfg.validate()


def to_dict(cfg: ExperimentConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> ExperimentConfig:
    """Rebuild a config saved in a checkpoint (validated the same way as overrides)."""
    cfg = ExperimentConfig()
    apply_overrides(cfg, {k: dict(v) for k, v in data.items()})
    return cfg.validate()
