"""Which records of a source without its own val split are held out for validation.

A record is val when the 64-bit hash of its key lies below a cut, so the assignment never depends on the
order records are read in, the machine or the rank. Where the source's size N is known (map-style records)
the cut is set so that exactly `val_count(N)` records are val: data.val_fraction of them (5 %), but at most
data.val_max_items (300): a few hundred images are enough to measure a loss or a PSNR, and a large set
should not lose 5 % of its training data to them. That is the smaller of "a few hundred" and 5 % (780
records -> 39, 20,000 -> 300). A streaming source has no known size: it holds out val_fraction of the hash
range. The split is made on raw records, before the filters: a filtered record is dropped from its split.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dalle_ds.config import DataConfig

log = logging.getLogger(__name__)

SMALL_VAL = 32  # fewer val items than this: a val loss or PSNR is mostly noise, so say so
HASH_RANGE = 2**64


def key_hash(key: str) -> int:
    """A stable 64-bit hash of a record key (the same on every machine and rank)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def val_count(n: int, cfg: DataConfig) -> int:
    """Records held out of n: val_fraction of them rounded, at most val_max_items, at least one when the
    fraction is > 0, and never all of them (training needs records too)."""
    if n <= 1 or cfg.val_fraction <= 0:
        return 0
    k = max(1, math.floor(cfg.val_fraction * n + 0.5))
    return min(k, cfg.val_max_items, n - 1)


class HashSplit:
    """split(key) -> "val" | "train": val iff key_hash(key) < cut."""

    def __init__(self, cut: int):
        self.cut = cut

    def __call__(self, key: str) -> str:
        return "val" if key_hash(key) < self.cut else "train"


def record_keys(records) -> list[str]:
    """Every key of map-style records, without reading images where the records can (`keys()`)."""
    return records.keys() if hasattr(records, "keys") else [records[i]["key"] for i in range(len(records))]


def hash_split(records, cfg: DataConfig) -> HashSplit:
    """The split of `records` (from data/records.py): the val_count(N) smallest key hashes when N is known,
    else (streaming) the fraction val_fraction of the hash range."""
    if getattr(records, "streaming", False):
        return HashSplit(math.floor(cfg.val_fraction * HASH_RANGE))
    hashes = sorted(key_hash(k) for k in record_keys(records))
    k = val_count(len(hashes), cfg)
    return HashSplit(hashes[k] if k < len(hashes) else HASH_RANGE)


def warn_if_small_val(count: int, where: str) -> None:
    """Log a warning (stderr unless logging is configured) when a val split holds fewer than SMALL_VAL items."""
    if count < SMALL_VAL:
        log.warning(
            "%s: the validation split holds only %d items (< %d): its metrics are noise; add data, raise "
            "data.val_fraction / data.val_max_items, or give the source a val split",
            where,
            count,
            SMALL_VAL,
        )
