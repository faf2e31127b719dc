"""Where images and captions come from: the built-in "shapes" data, or external image-text pairs.

`image_dataset(cfg, split, purpose)` returns a map-style dataset of {"image": uint8 (3, R, R), "caption": str}.
For external sources (data/records.py) construction makes one *pass*: every record of the split is read,
its caption decoded and filtered, its image decoded (converted when it can be: CMYK, grayscale, RGBA,
palette, 16-bit) and filtered by aspect ratio. Unusable records are skipped and counted by kind; the
counts are in `dataset.report` (a PassReport) and logged by the training entry points. The kept indices
are then read in any order by the training loop's DataOrder (resumable by position, sharded across ranks).
The pass decodes every image once; for data too large for that, use `stream_items` (data.streaming), which
decodes, filters and counts on the fly (train_dvae reads it through data/stream.py's StreamOrder).

`purpose` picks the preprocessing (PAPER §1.4): "dvae" = Listing 1 (random crop, area resize, flip),
"prior" = Listing 2 (near-centre crop, no flip); random draws are seeded by (seed, item, access count).
"""

from __future__ import annotations

import itertools
import logging
import zlib

import numpy as np
from torch.utils.data import Dataset

from dalle_ds.config import ConfigError, DataConfig
from dalle_ds.data.decode import BadInput, decode_caption, decode_image, open_image
from dalle_ds.data.filters import caption_rejection, image_rejection
from dalle_ds.data.preprocess import PREPROCESS
from dalle_ds.data.records import raw_records
from dalle_ds.data.report import PassReport
from dalle_ds.data.split import hash_split, record_keys, warn_if_small_val

log = logging.getLogger(__name__)


def clean_record(rec: dict, cfg: DataConfig, report: PassReport) -> tuple[np.ndarray, str] | None:
    """Decode, convert and filter one raw record, counting the outcome; None if it is dropped."""
    report.seen += 1
    try:
        caption, cap_conv = decode_caption(rec["caption"])
        if cap_conv is not None:  # counted whatever becomes of the record: the source has such captions
            report.converted[cap_conv] += 1
        rule = caption_rejection(caption, cfg)
        if rule is not None:
            report.filtered[rule] += 1
            return None
        img = open_image(rec["image"], max_pixels=cfg.max_image_pixels)
        rule = image_rejection(*img.size, cfg)
        if rule is not None:
            report.filtered[rule] += 1
            return None
        pixels, img_conv = decode_image(rec["image"], max_pixels=cfg.max_image_pixels)
    except BadInput as e:
        report.skipped[e.kind] += 1
        return None
    if img_conv is not None:
        report.converted[img_conv] += 1
    report.kept += 1
    return pixels, caption


class CleanImageDataset(Dataset):
    """The kept records of one split of an external source, preprocessed for `purpose`."""

    def __init__(self, cfg: DataConfig, split: str, purpose: str = "dvae"):
        if purpose not in PREPROCESS:
            raise ValueError(f"purpose must be one of {list(PREPROCESS)}, got {purpose!r}")
        self.cfg, self.split, self.purpose = cfg, split, purpose
        self.records, exact = raw_records(cfg, split)
        self.report = PassReport()
        self.keep: list[int] = []
        split_of = None if exact else hash_split(self.records, cfg)
        keys = None if exact else record_keys(self.records)  # decide the split before reading a record's bytes
        for i in range(len(self.records)):
            if split_of is not None and split_of(keys[i]) != split:
                continue
            if clean_record(self.records[i], cfg, self.report) is not None:
                self.keep.append(i)
        self._access = 0
        log.info("%s split %s: %s", cfg.path, split, self.report.summary())
        if not self.keep:
            raise ConfigError(f"data.path: no usable {split} records in {cfg.path} ({self.report.summary()})")
        if split == "val":
            warn_if_small_val(len(self.keep), str(cfg.path))

    def state_dict(self) -> dict:
        """The random-crop counter: restoring it makes a resumed reader draw the same crops (train_clip)."""
        return {"access": self._access}

    def load_state_dict(self, state: dict) -> None:
        self._access = int(state["access"])

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, i: int) -> dict:
        j = self.keep[i]
        rec = self.records[j]
        try:
            pixels, _ = decode_image(rec["image"], max_pixels=self.cfg.max_image_pixels)
            caption, _ = decode_caption(rec["caption"])
        except BadInput:  # the file changed since the pass: use the next kept record
            return self[(i + 1) % len(self)]
        self._access += 1
        rng = np.random.default_rng([self.cfg.seed, j, self._access])
        return {"image": PREPROCESS[self.purpose](pixels, self.cfg.image_size, rng), "caption": caption}


def stream_items(
    cfg: DataConfig,
    split: str,
    purpose: str = "prior",
    *,
    rank: int = 0,
    world: int = 1,
    start: int = 0,
    report: PassReport | None = None,
    epoch: int = 0,
):
    """Iterate (position, item) over rank `rank`'s shard of a split, decoding, filtering and counting on the fly.

    Records are dealt round-robin over ranks (record n goes to rank n % world). `position` counts the raw
    records of this rank's shard consumed so far (kept or not); pass it back as `start` to resume after
    the last item handled. Works for map-style and streaming sources alike. `epoch` reseeds the random
    preprocessing, so a second pass over the shard sees other crops and flips.
    """
    records, exact = raw_records(cfg, split)
    split_of = None if exact else hash_split(records, cfg)
    report = report if report is not None else PassReport()
    if getattr(records, "streaming", False):
        mine = itertools.islice(iter(records), rank + start * world, None, world)
    else:  # map-style: index this rank's records, without reading (and dropping) the other ranks' bytes
        mine = (records[i] for i in range(rank, len(records), world)[start:])
    pos = start
    for n, rec in enumerate(mine):
        pos = start + n + 1
        if split_of is not None and split_of(rec["key"]) != split:
            continue
        out = clean_record(rec, cfg, report)
        if out is None:
            continue
        pixels, caption = out
        rng = np.random.default_rng([cfg.seed, zlib.crc32(rec["key"].encode("utf-8", "replace")), epoch])
        yield pos, {"key": rec["key"], "image": PREPROCESS[purpose](pixels, cfg.image_size, rng), "caption": caption}


def image_dataset(cfg: DataConfig, split: str, purpose: str = "dvae") -> Dataset:
    """A dataset of {"image": uint8 (3, H, W), "caption": str} for `split` in train | val."""
    if cfg.dataset == "shapes":
        from dalle_ds.data.shapes import ShapesDataset  # noqa: PLC0415

        size = {"train": cfg.num_train, "val": cfg.num_val}[split]
        return ShapesDataset(
            split=split, size=size, image_size=cfg.image_size, seed=cfg.seed, two_shape_prob=cfg.two_shape_prob
        )
    if cfg.streaming:
        raise ConfigError(
            "data.streaming: this entry point reads a map-style dataset; train_dvae and "
            "`dalle-ds encode` stream (data/stream.py), or set data.streaming=false"
        )
    from dalle_ds.config import DATASETS  # noqa: PLC0415

    if cfg.dataset not in DATASETS:
        raise ConfigError(f"data.dataset: unknown dataset {cfg.dataset!r}; choose one of {', '.join(DATASETS)}")
    return CleanImageDataset(cfg, split, purpose)
