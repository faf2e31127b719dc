"""Refuse a --hostfile that the deepspeed launcher would silently ignore.

DeepSpeed's runner (deepspeed/launcher/runner.py, `fetch_hostfile`) treats a --hostfile that does not exist as
"no hostfile": it logs a warning and starts every rank on the local machine, and the run exits 0 having trained
on one node instead of the cluster. The ranks never see the runner's arguments, but in exactly that case they
run below it on this machine (no hostfile means no remote nodes), so a rank reads the runner's command line
and working folder from /proc (Linux) and refuses the run. Elsewhere, or without a runner above it, it checks
nothing.
"""

from __future__ import annotations

import os
import sys

from dalle_ds.errors import ConfigError

MODULE = "deepspeed.launcher.runner"
MAX_ANCESTORS = 8  # rank -> deepspeed.launcher.launch -> deepspeed runner, plus wrappers (timeout, srun, ...)


def _proc(pid: int, what: str) -> bytes:
    with open(f"/proc/{pid}/{what}", "rb") as f:
        return f.read()


def _parent(pid: int) -> int:
    stat = _proc(pid, "stat").decode()
    return int(stat.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces


def _argv(pid: int) -> list[str]:
    raw = _proc(pid, "cmdline").decode("utf-8", "surrogateescape")
    return raw.split("\0")[:-1] if raw.endswith("\0") else raw.split("\0")


def runner_args(argv: list[str]) -> list[str] | None:
    """The runner's own arguments if `argv` runs DeepSpeed's runner (`deepspeed ...`, `ds ...`,
    `python -m deepspeed.launcher.runner ...`), else None."""
    for i, a in enumerate(argv[:3]):
        if os.path.basename(a) in ("deepspeed", "ds") or argv[max(i - 1, 0) : i + 1] == ["-m", MODULE]:
            return argv[i + 1 :]
    return None


def hostfile_arg(args: list[str], script: str | None = None) -> str | None:
    """The value of -H / --hostfile (or an abbreviation argparse accepts) among the runner's arguments before
    the user's script."""
    for j, t in enumerate(args):
        if t == script:
            break
        name, eq, value = t.partition("=")
        if (len(name) > 3 and "--hostfile".startswith(name)) or name == "-H":
            return value if eq else (args[j + 1] if j + 1 < len(args) else None)
        if t.startswith("-H") and len(t) > 2:
            return t[2:]
    return None


def launcher_hostfile() -> tuple[str, str] | None:
    """(hostfile as given, as the runner resolves it) if a deepspeed runner above this process was given
    --hostfile, else None."""
    try:
        pid = os.getpid()
        for _ in range(MAX_ANCESTORS):
            pid = _parent(pid)
            if pid <= 1:
                return None
            args = runner_args(_argv(pid))
            if args is None:
                continue
            value = hostfile_arg(args, sys.argv[0] if sys.argv else None)
            if value is None:
                return None
            return value, os.path.join(os.readlink(f"/proc/{pid}/cwd"), value)
    except (OSError, ValueError, IndexError):  # no /proc, another user's process, a process that just ended
        return None
    return None


def check_launcher_hostfile() -> None:
    """ConfigError if the deepspeed runner above this rank was given a --hostfile that does not exist."""
    found = launcher_hostfile()
    if found is not None and not os.path.isfile(found[1]):
        raise ConfigError(
            f"--hostfile: {found[0]} does not exist, and the deepspeed launcher would have trained on this "
            "machine alone; fix the path, or leave --hostfile out for a one-machine run"
        )
