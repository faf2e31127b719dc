"""Building a DeepSpeed engine from a file in ds_configs/ (engine settings only)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from dalle_ds.config import ConfigError
from dalle_ds.training.distributed import world_size
from dalle_ds.training.precision import check_precision, device_capability

REQUIRED_KEYS = ("train_micro_batch_size_per_gpu",)


def load_ds_config(path_or_dict: str | Path | dict) -> dict:
    """Read a DeepSpeed JSON config; batch size and precision live here and nowhere else."""
    if isinstance(path_or_dict, dict):
        cfg = json.loads(json.dumps(path_or_dict))  # deep copy: DeepSpeed mutates its config
        where = "ds_config"
    else:
        where = f"--ds-config {path_or_dict}"
        try:
            cfg = json.loads(Path(path_or_dict).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{where} does not exist; pick one from ds_configs/") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{where}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where} is not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise ConfigError(f"{where}: expected a JSON object of engine settings")
    for key in REQUIRED_KEYS:
        if key not in cfg:
            raise ConfigError(f"{where}: missing {key!r}; the DeepSpeed config sets the batch size")
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        value = cfg.get(key, 1)  # a zero batch trains on nothing; DeepSpeed fails later with a traceback
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}: {key} must be an integer >= 1, got {value!r}")
    if "train_batch_size" in cfg:
        raise ConfigError(
            f"{where}: set train_micro_batch_size_per_gpu and gradient_accumulation_steps, "
            "not train_batch_size (it is derived from them and the world size)"
        )
    check_precision(cfg, where, *device_capability())  # fp16 needs a GPU, bf16 an sm80+ one
    return cfg


def micro_batch(ds_cfg: dict) -> int:
    return int(ds_cfg["train_micro_batch_size_per_gpu"])


def grad_accum(ds_cfg: dict) -> int:
    return int(ds_cfg.get("gradient_accumulation_steps", 1))


def global_batch(ds_cfg: dict) -> int:
    return micro_batch(ds_cfg) * grad_accum(ds_cfg) * world_size()


def compute_dtype(ds_cfg: dict) -> torch.dtype:
    if ds_cfg.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_cfg.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def build_engine(
    model: torch.nn.Module,
    ds_cfg: dict,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    lr_lambda: Callable[[int], float],
    mpu=None,
):
    """AdamW (decay on matrices only) + a LambdaLR schedule, wrapped in a DeepSpeed engine. `mpu`
    (training/node_groups.NodeMPU) restricts ZeRO's data-parallel group to a node."""
    import deepspeed  # noqa: PLC0415

    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)  # gains, biases: no weight decay
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    # A callable, so the schedule binds to the optimizer DeepSpeed actually steps (ZeRO wraps ours).
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=ds_cfg,
        mpu=mpu,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda),
    )
    return engine
