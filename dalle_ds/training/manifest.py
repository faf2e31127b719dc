"""A checkpoint's manifest: the size and SHA-256 of every file of one tag, written last, checked before loading.

A tag's files are `<ckpt_dir>/<tag>/**` (DeepSpeed's shards, our rank states) and `<ckpt_dir>/node<k>/<tag>/**`
(node groups, training/checkpoint.py). After every rank finished writing, each rank hashes a share of them,
rank 0 gathers the digests and writes `<ckpt_dir>/<tag>/manifest.json` (JSON only: nothing in it is executed
or unpickled). A tag without a manifest is a save that did not finish; a file that is missing, extra, of
another size or another hash is damage. The checks assume, as resuming already does, that every rank sees
the same checkpoint folder (a shared file system).

The manifest finds damage, not forgery: whoever can replace a shard can rewrite the manifest too. What keeps
a crafted shard from running code is that every load goes through torch's allowlisting unpickler
(dalle_ds/safe_load.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

from dalle_ds.training.distributed import gather_objects, rank, world_size

MANIFEST = "manifest.json"
FORMAT = "dalle_ds checkpoint manifest"


def tag_folders(ckpt_dir: Path, tag: str) -> list[Path]:
    return [p for p in [ckpt_dir / tag, *sorted(ckpt_dir.glob(f"node*/{tag}"))] if p.is_dir()]


def list_files(ckpt_dir: Path, tag: str) -> dict[str, os.stat_result]:
    """relative path -> lstat of every entry of the tag's folders except the manifest (symlinks not followed)."""
    found = {}
    for folder in tag_folders(ckpt_dir, tag):
        for root, dirs, files in os.walk(folder, followlinks=False):
            for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
                path = Path(root) / name
                rel = path.relative_to(ckpt_dir).as_posix()
                if rel != f"{tag}/{MANIFEST}":
                    found[rel] = os.lstat(path)
    return dict(sorted(found.items()))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):  # hashlib.file_digest needs Python 3.11; setup.py allows 3.10
            h.update(chunk)
    return h.hexdigest()


def _my_share(names: list[str]) -> list[str]:
    return names[rank() :: world_size()]


def write_manifest(ckpt_dir: Path, tag: str, step: int) -> None:
    """Collective: every rank hashes a share of the tag's files, rank 0 writes the manifest atomically.
    Call after a barrier that follows every rank's last write."""
    names = gather_objects(list(list_files(ckpt_dir, tag)))[0]  # rank 0's listing, so all hash the same set
    mine = {n: {"size": (ckpt_dir / n).stat().st_size, "sha256": sha256(ckpt_dir / n)} for n in _my_share(names)}
    parts = gather_objects(mine)
    if rank() != 0:
        return
    files = {k: v for part in parts for k, v in part.items()}
    body = {"format": FORMAT, "version": 1, "tag": tag, "step": step, "world_size": world_size(), "files": files}
    path = ckpt_dir / tag / MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(dict(sorted(body.items())), f, indent=1)
        f.flush()
        os.fsync(f.fileno())  # the manifest vouches for the files: it must not reach the disk before them
    os.replace(tmp, path)


def read_manifest(ckpt_dir: Path, tag: str) -> dict:
    """The manifest's JSON, checked for shape; ValueError with the reason if it is missing or unreadable."""
    path = ckpt_dir / tag / MANIFEST
    if not path.is_file():
        raise ValueError("no manifest (its save did not finish)")
    try:
        body = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"manifest unreadable ({type(e).__name__})") from None
    files = body.get("files") if isinstance(body, dict) else None
    ok = (
        isinstance(files, dict)
        and body.get("format") == FORMAT
        and all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
            for v in files.values()
        )
    )
    if not ok:
        raise ValueError("manifest is not a dalle_ds checkpoint manifest")
    if body.get("tag") != tag:
        raise ValueError(f"manifest belongs to tag {body.get('tag')!r}")
    return body


def problem(ckpt_dir: Path, tag: str) -> str | None:
    """Why this rank finds the tag damaged or incomplete (None: sound). Sizes of all files, hashes of a share."""
    try:
        files = read_manifest(ckpt_dir, tag)["files"]
    except ValueError as e:
        return str(e)
    on_disk = list_files(ckpt_dir, tag)
    for name in files:
        if name not in on_disk:
            return f"missing file {name}"
    for name, st in on_disk.items():
        if name not in files:
            return f"unexpected file {name} (not in the manifest)"
        if not stat.S_ISREG(st.st_mode):
            return f"{name} is not a regular file"
        if st.st_size != files[name]["size"]:
            return f"size mismatch in {name} ({st.st_size} bytes, manifest says {files[name]['size']})"
    for name in _my_share(list(files)):
        if sha256(ckpt_dir / name) != files[name]["sha256"]:
            return f"checksum mismatch in {name}"
    return None


def verify(ckpt_dir: Path, tag: str) -> str | None:
    """Collective: the first problem any rank found with the tag, or None if every rank found it sound."""
    return next((p for p in gather_objects(problem(ckpt_dir, tag)) if p is not None), None)
