"""Stop as on SIGTERM when the `deepspeed` runner above this rank is gone.

`deepspeed` (the runner) starts `deepspeed.launcher.launch`, which starts the ranks. On one machine the runner
installs no signal handler, so a SIGTERM sent to it alone (`kill PID`, a container runtime signalling PID 1)
ends it at once and leaves launch.py and the ranks training, unsupervised, to the last step (seen: 700 more
steps and no checkpoint). A rank therefore watches its launch.py: once the runner above it is gone, launch.py
has been given another parent, and the training loop saves and stops as if this rank got SIGTERM itself.
A SIGTERM to the whole process group (SLURM, `kill -TERM -PGID`) reaches the ranks directly; launch.py then
gives them 30 s (its `terminate_process_tree`) to save before it kills them.
"""

from __future__ import annotations

from collections.abc import Callable

from dalle_ds.training.launcher import _argv, _parent, runner_args

LAUNCH_MODULE = "deepspeed.launcher.launch"


def runner_gone_check(pid: int) -> Callable[[], bool] | None:
    """For a rank `pid` started by launch.py under a local deepspeed runner: a cheap check (one /proc read)
    that is True once that runner is gone. None for any other way of starting (plain python, torchrun, pdsh)."""
    try:
        launch = _parent(pid)
        if LAUNCH_MODULE not in _argv(launch):
            return None
        runner = _parent(launch)
        if runner <= 1 or runner_args(_argv(runner)) is None:
            return None
    except (OSError, ValueError, IndexError):  # no /proc (not Linux), or a process that just ended
        return None

    def gone() -> bool:
        try:
            return _parent(launch) != runner
        except (OSError, ValueError, IndexError):  # launch.py itself is gone
            return True

    return gone
