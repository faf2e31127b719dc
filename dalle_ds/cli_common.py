"""Arguments every entry point shares: preset, YAML config, dotted overrides, DeepSpeed config."""
from __future__ import annotations

import argparse
from pathlib import Path

from dalle_ds.config import ExperimentConfig, load_config

REPO_ROOT = Path(__file__).resolve().parent.parent
DS_CONFIGS = REPO_ROOT / "ds_configs"


def add_config_args(p: argparse.ArgumentParser, *, ds_default: str | None = None) -> None:
    p.add_argument("--preset", default="shapes", help="tiny | shapes | small | 12b (default: shapes)")
    p.add_argument("--config", default=None, help="YAML file of overrides: {section: {field: value}}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config field, e.g. --set prior.d_model=256 (repeatable)")
    if ds_default is not None:
        p.add_argument("--ds-config", default=str(DS_CONFIGS / ds_default),
                       help=f"DeepSpeed JSON (engine settings: batch, precision, ZeRO); default {ds_default}")
    # the deepspeed launcher passes --local_rank; the rank comes from the environment
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    return load_config(args.preset, args.config, args.overrides)
