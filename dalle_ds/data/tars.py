"""Webdataset tar shards as raw records, read with the standard library's tarfile.

The layout is webdataset's: the members of one sample share a key (the member path up to the first dot of its
file name) and lie next to each other: `0001.jpg`, `0001.txt`, `0002.jpg`, ... Hidden members (`.x`, `__x`)
and anything but regular files are skipped, as in `datasets`' webdataset builder, and the keys are the same.

Why not that builder: it decodes every `.txt` member as strict UTF-8 inside its generator, and a shard cut
short raises tarfile.ReadError there too; either ends the generator, and with it the whole pass (train-dvae,
streaming and encode died with a traceback). Here a member is only bytes (captions are decoded, converted and
counted by data/decode.py), and a shard cut short keeps the samples before the cut: the rest of that shard is
one record refused as `truncated_shard` (`bad_shard` if it is not a tar at all), and the next shard is read.
The refusal is a record of its own so that it is counted once over all ranks, at a fixed stream position.

Map-style (data.streaming=false) indexes the member offsets of plain `.tar` shards once and reads a sample's
two members on demand; compressed shards can only be streamed.
"""

from __future__ import annotations

import os
import re
import tarfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from dalle_ds.data.decode import BadInput
from dalle_ds.data.safe_read import MAX_CAPTION_BYTES
from dalle_ds.errors import ConfigError

if TYPE_CHECKING:
    from dalle_ds.config import DataConfig

_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: (key, field)
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd
READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


def split_name(name: str) -> tuple[str, str] | None:
    """(key, field) of a member, field lower-cased (`.JPG` is a jpg), or None for a member webdataset skips."""
    base = os.path.basename(name)
    m = _KEY.match(name)
    if m is None or base.startswith((".", "__")):
        return None
    return m.group(1), m.group(2).lower()


def _compressed(shard: str) -> bool:
    with open(shard, "rb") as f:
        return f.read(6).startswith(_COMPRESSED)


def _check_end(shard: str, offset: int) -> None:
    """tarfile ends a walk quietly at a header cut short, or past the end of the file, when that is not the first
    header; here what follows the last member must be the end: nothing, or zero blocks."""
    with open(shard, "rb") as f:
        f.seek(offset)
        tail = f.read(tarfile.BLOCKSIZE)
    if offset > os.path.getsize(shard) or tail.strip(b"\0"):
        raise tarfile.ReadError(f"the archive is cut short at byte {min(offset, os.path.getsize(shard))}")


def refused(shard: str, kind: str, detail: str) -> dict:
    """The record standing for the unread rest of a shard."""
    bad = BadInput(kind, f"{shard}: {detail}")
    return {"key": f"{os.path.basename(shard)}#{kind}", "image": bad, "caption": bad}


class TarRecords:
    """Raw records of webdataset shards: {"key", "image": bytes | BadInput | None, "caption": ...}."""

    def __init__(self, files: list[str], cfg: DataConfig, *, streaming: bool, candidates: tuple[tuple, tuple]):
        """`candidates`: the (image, caption) field names tried in order when data.image_column /
        data.caption_column are empty."""
        self.files, self.cfg, self.streaming = files, cfg, streaming
        self.candidates = candidates
        self.image_col, self.caption_col = cfg.image_column.lower(), cfg.caption_column.lower()
        # map-style, per sample: (shard index, key, {field: (offset, size)}, None) or (shard, key, None, refused)
        self.index: list[tuple] = [] if streaming else [e for i, f in enumerate(files) for e in self._index(i, f)]

    # --- choosing and reading the two members a sample needs
    def _fields(self, fields) -> tuple[str | None, str | None]:
        """The (image, caption) fields of a sample with these fields (None where it has none)."""
        return tuple(
            (wanted if wanted in fields else None) if wanted else next((c for c in tried if c in fields), None)
            for wanted, tried in zip((self.image_col, self.caption_col), self.candidates)
        )

    def _limit(self, what: str) -> int:
        return self.cfg.max_image_bytes if what == "image" else MAX_CAPTION_BYTES

    def _record(self, key: str, members: dict, read) -> dict:
        """`members`: field -> size; `read(field)` -> bytes. A sample without the field is None (missing)."""
        out = {"key": key}
        for what, field in zip(("image", "caption"), self._fields(members)):
            if field is None:
                out[what] = BadInput("image_missing", key) if what == "image" else None
            elif members[field] > self._limit(what):
                out[what] = BadInput(f"{what}_too_large", f"{key}.{field}: {members[field]} bytes")
            else:
                out[what] = read(field)
        return out

    # --- streaming
    def __iter__(self):
        for shard in self.files:
            yield from self._stream(shard)

    def _stream(self, shard: str):
        try:
            tf = tarfile.open(shard, mode="r|*")
            plain = not _compressed(shard)
        except READ_ERRORS as e:
            yield refused(shard, "bad_shard", f"{type(e).__name__}: {e}")
            return
        key, members, data = None, {}, {}
        try:
            with tf:
                for ti in tf:
                    kf = split_name(ti.name) if ti.isreg() else None
                    if kf is None:
                        continue
                    if kf[0] != key:
                        if key is not None:
                            yield self._record(key, members, data.__getitem__)
                        key, members, data = kf[0], {}, {}
                    members[kf[1]] = ti.size
                    if kf[1] in self._fields([kf[1]]) and ti.size <= self._limit(self._what(kf[1])):
                        data[kf[1]] = tf.extractfile(ti).read()
                    tf.members = []  # a stream keeps every TarInfo otherwise
                if plain:
                    _check_end(shard, tf.offset)
        except READ_ERRORS as e:  # the sample being read is lost with the rest of the shard
            yield refused(shard, "truncated_shard", f"{type(e).__name__}: {e} after {key!r}")
            return
        if key is not None:
            yield self._record(key, members, data.__getitem__)

    def _what(self, field: str) -> str:
        image, _ = self._fields([field])
        return "image" if image == field else "caption"

    # --- map-style
    def _index(self, i: int, shard: str) -> list[tuple]:
        if _compressed(shard):
            raise ConfigError(
                f"data.path: {shard} is a compressed tar; reading samples in any order needs plain .tar "
                "shards: set data.streaming=true, or decompress the shards"
            )
        size = os.path.getsize(shard)
        try:
            tf = tarfile.open(shard, mode="r:")
        except READ_ERRORS as e:
            rec = refused(shard, "bad_shard", f"{type(e).__name__}: {e}")
            return [(i, rec["key"], None, rec)]
        out, key, members = [], None, {}
        try:
            with tf:
                for ti in tf:
                    kf = split_name(ti.name) if ti.isreg() else None
                    if kf is None:
                        continue
                    if kf[0] != key:
                        if key is not None:
                            out.append((i, key, members, None))
                        key, members = kf[0], {}
                    if ti.offset_data + ti.size > size:  # a seekable walk does not notice a member cut short
                        raise tarfile.ReadError(f"member {ti.name} ends past the end of the file")
                    members[kf[1]] = (ti.offset_data, ti.size)
                _check_end(shard, tf.offset)
        except READ_ERRORS as e:  # the sample being indexed is lost with the rest of the shard
            rec = refused(shard, "truncated_shard", f"{type(e).__name__}: {e} after {len(out)} samples")
            return [*out, (i, rec["key"], None, rec)]
        if key is not None:
            out.append((i, key, members, None))
        return out

    def __len__(self) -> int:
        if self.streaming:
            raise TypeError("a streaming source has no length; iterate it")
        return len(self.index)

    def keys(self) -> list[str]:
        """Every record's key, from the index (no member is read)."""
        return [e[1] for e in self.index]

    def __getitem__(self, j: int) -> dict:
        i, key, members, refusal = self.index[int(j)]
        if refusal is not None:  # the unread rest of a shard
            return refusal
        path = Path(self.files[i])

        def read(field: str) -> bytes:
            offset, size = members[field]
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(size)
            if len(data) != size:  # the shard changed since it was indexed
                return BadInput("truncated_shard", f"{path}: {key}.{field}")
            return data

        return self._record(key, {k: v[1] for k, v in members.items()}, read)
