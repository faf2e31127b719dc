"""Read the bytes of one file a dataset names, without letting the name stall or exhaust the run.

A dataset is user input. A folder may hold a FIFO named like a caption (opening it for reading blocks until a
writer comes); a parquet `path` column may name /dev/zero (reading it never ends) or any file on the machine.
So: open without blocking, read only regular files and at most `limit` bytes, and resolve a dataset's paths
inside its own folder unless data.allow_absolute_paths. Every refusal is a BadInput whose kind the pass counts
(data/report.py): <what>_not_regular_file, <what>_too_large, <what>_unreadable, image_path_outside_root.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from dalle_ds.data.decode import BadInput

MAX_CAPTION_BYTES = 2**20  # a caption file larger than this is not a caption
_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)


def read_file(path: str | Path, limit: int, what: str = "image") -> bytes:
    """The whole content of the regular file `path` if it holds at most `limit` bytes, else BadInput."""
    try:
        fd = os.open(path, _FLAGS)  # O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer
    except OSError as e:
        raise BadInput(f"{what}_unreadable", f"{path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)  # of what was opened, so a file swapped after a check cannot slip through
        if not stat.S_ISREG(st.st_mode):
            raise BadInput(f"{what}_not_regular_file", str(path))
        if st.st_size > limit:
            raise BadInput(f"{what}_too_large", f"{path}: {st.st_size} bytes > {limit}")
        chunks, left = [], limit + 1  # one byte more than allowed tells a file that grew since the fstat
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as e:
        raise BadInput(f"{what}_unreadable", f"{path}: {e.strerror}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise BadInput(f"{what}_too_large", f"{path}: more than {limit} bytes")
    return data


def resolve_under(path: str, root: Path, allow_outside: bool) -> Path:
    """`path` (relative paths are relative to `root`) if it lies inside `root` once symlinks and `..` are
    resolved, or anywhere if `allow_outside`; else BadInput("image_path_outside_root")."""
    full = Path(root, path)  # an absolute `path` replaces root
    if allow_outside:
        return full
    real, real_root = Path(os.path.realpath(full)), Path(os.path.realpath(root))
    if real != real_root and real_root not in real.parents:
        raise BadInput("image_path_outside_root", f"{path} is outside {root} (set data.allow_absolute_paths=true)")
    return real


def check_size(data: bytes, limit: int, what: str = "image") -> bytes:
    """`data` (bytes already in a dataset's column) unless it holds more than `limit` bytes."""
    if len(data) > limit:
        raise BadInput(f"{what}_too_large", f"{len(data)} bytes > {limit}")
    return data
