"""Counts of what a pass over a dataset saw: kept, converted (by kind), skipped (by kind), filtered (by rule)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

SKIP_KINDS = (
    *("zero_byte", "not_an_image", "corrupt", "decompression_bomb", "caption_missing", "caption_empty"),
    # refused before decoding (data/safe_read.py, data/tars.py, data/records.py)
    *("image_not_regular_file", "image_too_large", "image_unreadable", "image_path_outside_root", "image_is_string"),
    *("image_missing", "caption_not_regular_file", "caption_too_large", "caption_unreadable"),
    *("truncated_shard", "bad_shard"),  # the unread rest of a webdataset shard cut short / not a tar at all
)
FILTER_KINDS = ("caption_too_short", "caption_not_english", "caption_boilerplate", "aspect_ratio")


@dataclass
class PassReport:
    seen: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # unusable input, by defect kind
    filtered: Counter = field(default_factory=Counter)  # usable but dropped by one of the paper's filters
    # conversions made: an image's when its record is kept (cmyk, grayscale, ...), a caption's
    # (caption_not_utf8) as soon as it is decoded, also when the record is then filtered or skipped
    converted: Counter = field(default_factory=Counter)

    def merge(self, other: PassReport) -> PassReport:
        self.seen += other.seen
        self.kept += other.kept
        self.skipped.update(other.skipped)
        self.filtered.update(other.filtered)
        self.converted.update(other.converted)
        return self

    def as_dict(self) -> dict:
        return {
            "seen": self.seen,
            "kept": self.kept,
            "skipped": dict(sorted(self.skipped.items())),
            "filtered": dict(sorted(self.filtered.items())),
            "converted": dict(sorted(self.converted.items())),
        }

    @classmethod
    def from_dict(cls, d: dict) -> PassReport:
        return cls(
            seen=d["seen"],
            kept=d["kept"],
            skipped=Counter(d["skipped"]),
            filtered=Counter(d["filtered"]),
            converted=Counter(d["converted"]),
        )

    def summary(self) -> str:
        def fmt(c: Counter) -> str:
            return ", ".join(f"{k}={v}" for k, v in sorted(c.items())) or "none"

        return (
            f"data pass: {self.kept}/{self.seen} kept; skipped: {fmt(self.skipped)}; "
            f"filtered: {fmt(self.filtered)}; converted: {fmt(self.converted)}"
        )
