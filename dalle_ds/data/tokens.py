"""Pre-encoded token grids kept as uint16 in memory; only a batch is widened to int64.

An int64 table of every grid takes 4x the memory of the stored uint16 (for 250M images of 32x32 tokens:
2 TB instead of 512 GB), so `load_encoded` keeps the 16-bit array and the training loop converts per batch.
"""

from __future__ import annotations

import numpy as np
import torch


class TokenTable:
    """(n, G*G) uint16 token grids; `table[idx]` (int, slice, list of rows) is an int64 tensor of those rows."""

    def __init__(self, array: np.ndarray):
        if array.dtype != np.uint16 or array.ndim != 2:
            raise ValueError(f"token grids must be a 2-d uint16 array, got {array.dtype} {array.shape}")
        self.array = array

    @classmethod
    def from_column(cls, chunks) -> TokenTable:
        """From a pyarrow (chunked) list<uint16> column of equal-length grids, without Python objects."""
        parts = [c.flatten().to_numpy(zero_copy_only=False) for c in getattr(chunks, "chunks", [chunks])]
        n = len(chunks)
        flat = np.concatenate(parts).astype(np.uint16, copy=False) if parts else np.zeros(0, np.uint16)
        if n == 0:
            return cls(np.zeros((0, 0), np.uint16))
        if flat.size % n:
            raise ValueError(f"token grids differ in length ({flat.size} tokens in {n} grids)")
        return cls(flat.reshape(n, flat.size // n))

    @property
    def shape(self) -> tuple[int, int]:
        return self.array.shape

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, idx) -> torch.Tensor:
        return torch.from_numpy(self.array[idx].astype(np.int64))

    def min(self) -> int:
        return int(self.array.min())

    def max(self) -> int:
        return int(self.array.max())

    def numpy(self) -> np.ndarray:
        """The stored uint16 grids (no copy)."""
        return self.array

    def tolist(self) -> list:
        return self.array.tolist()
