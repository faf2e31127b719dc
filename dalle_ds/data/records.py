"""Raw records from external sources: {"key": str, "image": bytes | None, "caption": bytes | str | None}.

Nothing is decoded here; `dalle_ds.data.sources` decodes, converts, filters and counts.

* folder:      every image file under data.path (recursively) with a same-stem `.txt` caption beside it
               (the DALLE-pytorch layout). Subfolders `train/` and `val/`, if present, are the splits.
* hf_disk:     a `datasets` Dataset or DatasetDict written with `save_to_disk`.
* parquet:     parquet file(s) (a path or glob) with an image column (bytes or {"bytes", "path"}) and a caption.
* imagefolder: the `datasets` imagefolder layout: images plus metadata.csv / metadata.jsonl with a caption column.
* webdataset:  tar shards (a path or glob) in webdataset's layout, `<key>.jpg` + `<key>.txt`, read by data/tars.py
               (a shard cut short keeps its samples before the cut and is counted as `truncated_shard`).
With data.streaming the sources are iterated without materialising an Arrow cache or an index.
A record's image or caption may be a BadInput instead of bytes: the source refused to read it (a FIFO, a file
over data.max_image_bytes, a `path` outside the dataset's folder; data/safe_read.py); the pass counts its kind.
"""

from __future__ import annotations

import glob
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from dalle_ds.data.decode import BadInput
from dalle_ds.data.safe_read import MAX_CAPTION_BYTES, check_size, read_file, resolve_under
from dalle_ds.data.tars import TarRecords
from dalle_ds.errors import ConfigError
from dalle_ds.registry import Registry

if TYPE_CHECKING:
    from dalle_ds.config import DataConfig


def _datasets():
    """The `datasets` module, imported on first use: it takes about a second, and config.py imports this module
    (for the registry) wherever a model is built."""
    import datasets  # noqa: PLC0415

    return datasets


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img")
CAPTION_COLUMNS = ("caption", "text", "txt", "alt", "captions")


def _refusal(read: Callable, *args):
    """`read(*args)`, or the BadInput refusing it: decode_image/decode_caption raise it, so the pass counts
    its kind like any other defect."""
    try:
        return read(*args)
    except BadInput as e:
        return e


class FolderRecords:
    """Map-style raw records of an image folder with same-stem .txt captions."""

    def __init__(self, root: str | Path, max_image_bytes: int):
        self.root, self.max_image_bytes = Path(root), max_image_bytes
        if not self.root.is_dir():
            raise ConfigError(f"data.path: {self.root} is not a folder")
        # anything but a folder is listed: a FIFO or a device named *.jpg is refused when read, and counted
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and not p.is_dir())

    def __len__(self) -> int:
        return len(self.files)

    def keys(self) -> list[str]:
        """Every record's key without reading a file (data/split.py hashes them)."""
        return [str(p.relative_to(self.root)) for p in self.files]

    def __getitem__(self, i: int) -> dict:
        p = self.files[i]
        cap_path = p.with_suffix(".txt")
        image = _refusal(read_file, p, self.max_image_bytes, "image")
        caption = _refusal(read_file, cap_path, MAX_CAPTION_BYTES, "caption") if os.path.lexists(cap_path) else None
        return {"key": str(p.relative_to(self.root)), "image": image, "caption": caption}


def _pick(columns: list[str], wanted: str, candidates: tuple[str, ...], field: str) -> str:
    if wanted:
        if wanted not in columns:
            raise ConfigError(f"data.{field}: column {wanted!r} is not in the dataset's columns {columns}")
        return wanted
    for c in candidates:
        if c in columns:
            return c
    raise ConfigError(f"data.{field}: none of {candidates} is a column ({columns}); set data.{field}")


def _read_path(path: str, root: Path, cfg: DataConfig) -> bytes:
    return read_file(resolve_under(path, root, cfg.allow_absolute_paths), cfg.max_image_bytes, "image")


def _image_bytes(value, root: Path, cfg: DataConfig) -> bytes | BadInput | None:
    """An image cell's bytes: raw bytes, {"bytes", "path"} (a path is read only inside `root`, and within the
    size cap) or a decoded PIL image; else the BadInput refusing it."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return _refusal(check_size, bytes(value), cfg.max_image_bytes)
    if isinstance(value, str):  # a column of file names or URLs, not of images
        return BadInput("image_is_string", value[:80])
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return _refusal(check_size, value["bytes"], cfg.max_image_bytes)
        if value.get("path"):
            return _refusal(_read_path, value["path"], root, cfg)
        return None
    if hasattr(value, "save"):  # an already decoded PIL image
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    return BadInput("not_an_image", f"a cell of type {type(value).__name__}")


class HFRecords:
    """Raw records over a `datasets` Dataset or IterableDataset (images left undecoded). `root`: the folder
    that relative image paths in the data are read from, and that every image path must lie in."""

    def __init__(self, ds, cfg: DataConfig, root: str | Path):
        self.cfg, self.root = cfg, Path(root)
        if ds.column_names is not None:
            columns = list(ds.column_names)
        elif ds.features is not None:
            columns = list(ds.features)
        else:  # a streaming dataset with unknown features: look at the first row
            columns = list(next(iter(ds)).keys())
        self.image_col = _pick(columns, cfg.image_column, IMAGE_COLUMNS, "image_column")
        self.caption_col = _pick(columns, cfg.caption_column, CAPTION_COLUMNS, "caption_column")
        feats = ds.features or {}
        if isinstance(feats.get(self.image_col), _datasets().Image):
            ds = ds.cast_column(self.image_col, _datasets().Image(decode=False))
        self.ds = ds.select_columns([c for c in (self.image_col, self.caption_col, "__key__") if c in columns])
        self.streaming = isinstance(ds, _datasets().IterableDataset)

    def _record(self, row: dict, i: int) -> dict:
        cap = row.get(self.caption_col)
        if isinstance(cap, list):  # several captions per image: take the first
            cap = cap[0] if cap else None
        image = _image_bytes(row.get(self.image_col), self.root, self.cfg)
        return {"key": str(row.get("__key__", i)), "image": image, "caption": cap}

    def __len__(self) -> int:
        if self.streaming:
            raise TypeError("a streaming source has no length; iterate it")
        return len(self.ds)

    def keys(self) -> list[str]:
        """Every record's key (as `_record` makes it), reading the key column only."""
        if "__key__" in (self.ds.column_names or []):
            return [str(k) for k in self.ds["__key__"]]
        return [str(i) for i in range(len(self))]

    def __getitem__(self, i: int) -> dict:
        return self._record(self.ds[int(i)], int(i))

    def __iter__(self):
        for i, row in enumerate(self.ds):
            yield self._record(row, i)


def _files(pattern: str, what: str) -> list[str]:
    files = sorted(glob.glob(pattern)) if any(ch in pattern for ch in "*?[") else [pattern]
    if not files or not all(Path(f).exists() for f in files):
        raise ConfigError(f"data.path: no {what} found at {pattern!r}")
    return files


def _hf_disk(cfg: DataConfig, split: str):
    ds = _datasets().load_from_disk(cfg.path)
    exact = False
    if isinstance(ds, _datasets().DatasetDict):
        if split in ds:
            ds, exact = ds[split], True
        elif split == "val" and "validation" in ds:
            ds, exact = ds["validation"], True
        else:
            ds = ds["train" if "train" in ds else next(iter(ds))]
    if cfg.streaming:
        ds = ds.to_iterable_dataset()
    return HFRecords(ds, cfg, cfg.path), exact


def _builder(name: str, what: str):
    """A `datasets` packaged builder over the files data.path names (a path or a glob)."""

    def read(cfg: DataConfig, split: str):
        files = _files(cfg.path, what)
        ds = _datasets().load_dataset(name, data_files=files, split="train", streaming=cfg.streaming)
        return HFRecords(ds, cfg, os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])), False

    return read


def _webdataset(cfg: DataConfig, split: str):
    files = _files(cfg.path, "tar shards")
    return TarRecords(files, cfg, streaming=cfg.streaming, candidates=(IMAGE_COLUMNS, CAPTION_COLUMNS)), False


def _imagefolder(cfg: DataConfig, split: str):
    if not Path(cfg.path).is_dir():
        raise ConfigError(f"data.path: {cfg.path} is not a folder")
    ds = _datasets().load_dataset("imagefolder", data_dir=cfg.path, split="train", streaming=cfg.streaming)
    return HFRecords(ds, cfg, cfg.path), False


def _folder(cfg: DataConfig, split: str):
    root = Path(cfg.path)
    if (root / split).is_dir():
        return FolderRecords(root / split, cfg.max_image_bytes), True
    return FolderRecords(root, cfg.max_image_bytes), False


# name -> reader(cfg, split) -> (records, exact_split); "shapes" is the built-in procedural set (data/shapes.py),
# which has no raw records.
Reader = Callable[["DataConfig", str], tuple]
DATASETS: Registry[Reader] = Registry("data.dataset", "dataset")
DATASETS.register("shapes", None)
DATASETS.register("folder", _folder)
DATASETS.register("hf_disk", _hf_disk)
DATASETS.register("parquet", _builder("parquet", "parquet files"))
DATASETS.register("imagefolder", _imagefolder)
DATASETS.register("webdataset", _webdataset)


def raw_records(cfg: DataConfig, split: str):
    """(records, exact_split): records are map-style (len/getitem) unless data.streaming."""
    reader = DATASETS.get(cfg.dataset)
    if reader is None:
        raise ConfigError(f"data.dataset: {cfg.dataset!r} is built in and has no raw records")
    return reader(cfg, split)
