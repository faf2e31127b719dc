"""Arguments every entry point shares (preset, YAML config, dotted overrides, DeepSpeed config), and the boundary
where an error caused by what the user typed becomes one line on stderr and an exit code (run_command)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from dalle_ds.config import ExperimentConfig, load_config
from dalle_ds.errors import ConfigError, RunFailed
from dalle_ds.resources import DS_CONFIGS
from dalle_ds.sampling.placement import DTYPES
from dalle_ds.training.engine import load_ds_config
from dalle_ds.training.launcher import check_launcher_hostfile
from dalle_ds.training.precision import default_ds_config, device_capability

DEBUG_FLAG = "--debug"  # anywhere on the command line (or DALLE_DS_DEBUG=1): show the traceback instead
# what reading a user's file raises when the file is wrong (missing, a folder, truncated, not ours, not UTF-8)
FILE_ERRORS = (ConfigError, OSError, ValueError, EOFError, pickle.UnpicklingError)


class _PrintConfig(argparse.Action):
    """--print-config: a flag that also lifts the command's required arguments (--out, --data): nothing runs."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)
        for action in parser._actions:  # argparse checks `required` only after every argument is read
            action.required = False


def add_placement_args(p: argparse.ArgumentParser) -> None:
    """--device and --dtype of the commands that sample (dalle_ds/sampling/placement.py)."""
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU if visible, else cpu) | cpu | cuda[:N]")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="the prior's weights when sampling: auto = bf16 on sm80+, fp16 on a V100, fp32 on CPU",
    )


def add_config_args(p: argparse.ArgumentParser, *, ds_default: str | None = None) -> None:
    """`ds_default`: a ds_configs/ file name for --ds-config's default, "device" for the one that suits this
    machine (training/precision.py: fp32 on CPU, bf16 on sm80+, fp16 on a V100), None for no --ds-config."""
    p.add_argument("--preset", default="shapes", help="tiny | shapes | small | 12b (default: shapes)")
    p.add_argument("--config", default=None, help="YAML file of overrides: {section: {field: value}}")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field, e.g. --set prior.d_model=256 (repeatable)",
    )
    if ds_default is not None:
        how = ""
        if ds_default == "device":
            ds_default = default_ds_config(*device_capability())
            how = (
                " (by device: cpu_zero0_fp32.json on CPU, gpu_default_bf16.json on sm80+,"
                " gpu_default_fp16.json on V100)"
            )
        p.add_argument(
            "--ds-config",
            default=str(DS_CONFIGS / ds_default),
            help=f"DeepSpeed JSON (engine settings: batch, precision, ZeRO); default here {ds_default}{how}",
        )
    p.add_argument(
        "--print-config",
        action=_PrintConfig,
        help="print the resolved config (preset + --config + --set) as YAML and exit; --config reads it back",
    )
    # the deepspeed launcher passes --local_rank; the rank comes from the environment
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)


def config_yaml(cfg: ExperimentConfig) -> str:
    """The config as the YAML mapping `--config` reads ({section: {field: value}}; tuples as lists)."""
    import yaml  # noqa: PLC0415

    return yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), sort_keys=False)


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    cfg = load_config(args.preset, args.config, args.overrides)
    if getattr(args, "print_config", False):  # before any work: the command does nothing else
        if int(os.environ.get("RANK") or 0) == 0:
            print(config_yaml(cfg), end="", flush=True)
        sys.exit(0)
    return cfg


def training_config(args: argparse.Namespace) -> ExperimentConfig:
    """The config of a training command, after refusing what would otherwise fail (or go wrong) only once the
    ranks run: the DeepSpeed config, --stop-at, and a --hostfile the deepspeed launcher would ignore."""
    cfg = config_from_args(args)
    load_ds_config(args.ds_config)
    if args.stop_at is not None and args.stop_at < 1:
        raise ConfigError(f"--stop-at: must be >= 1, got {args.stop_at}")
    check_launcher_hostfile()
    return cfg


def exit_code(e: BaseException) -> int | None:
    """2 for bad input (ConfigError, a path that is missing or unreadable), 1 for RunFailed, None for anything
    else: that is a bug, and keeps its traceback."""
    if isinstance(e, (ConfigError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return 2
    if isinstance(e, RunFailed):
        return 1
    return None


def one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.strerror}: {e.filename}"
    else:
        text = str(e) or type(e).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def run_command(command: str, main: Callable[[list[str]], None], argv: list[str] | None = None) -> None:
    """Run `main(argv)` of `dalle-ds command`; a user error prints `dalle-ds command: message` and exits 2 (1
    for RunFailed). Under the deepspeed launcher each rank prints its own line, tagged with its rank."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get("DALLE_DS_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        main(argv)
    except Exception as e:
        code = exit_code(e)
        if code is None or debug:
            raise
        tag = f"[rank {os.environ.get('RANK', '?')}] " if int(os.environ.get("WORLD_SIZE") or 1) > 1 else ""
        print(f"dalle-ds {command}: {tag}{one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(code)


@contextlib.contextmanager
def argument(name: str) -> Iterator[None]:
    """Wrap the reading of the file that argument `name` points at: its errors become a ConfigError naming
    `name` (e.g. `--prior: ...`). Only wrap the read, so that an error in our own code keeps its traceback."""
    try:
        yield
    except FILE_ERRORS as e:
        if isinstance(e, ConfigError) and str(e).startswith(f"{name}:"):
            raise  # already names the argument
        raise ConfigError(f"{name}: {one_line(e)}") from e


def existing_path(path: str | Path, name: str, *, kind: str = "file") -> Path:
    """`path` as a Path if it exists and is a regular file (kind="file"), a folder ("dir") or either ("any")."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{name}: {path} does not exist")
    if kind == "file" and not p.is_file():
        raise ConfigError(f"{name}: {path} is not a regular file")
    if kind == "dir" and not p.is_dir():
        raise ConfigError(f"{name}: {path} is not a folder")
    return p


def read_text_lines(path: str | Path, name: str) -> list[str]:
    """The non-empty stripped lines of a UTF-8 text file given as argument `name`."""
    raw = existing_path(path, name).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start : e.start + 1]
        raise ConfigError(f"{name}: {path} is not UTF-8 text (byte {e.start} is {bad!r})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]
