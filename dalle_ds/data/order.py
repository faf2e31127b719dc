"""A deterministic, resumable data order shared by all ranks.

The position is the number of samples consumed globally. Step s reads global positions
[s*B, (s+1)*B) of an endless sequence of per-epoch permutations, and rank r's micro-batch a takes its
own slice of that, so a run sees the same global batches whatever its world size or restarts.
"""

from __future__ import annotations

import numpy as np


class DataOrder:
    def __init__(self, num_items: int, seed: int):
        if num_items <= 0:
            raise ValueError("the dataset is empty")
        self.num_items = num_items
        self.seed = seed
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
            self._perm_epoch = epoch
        return self._perm

    def indices(self, start: int, count: int) -> list[int]:
        out = []
        for pos in range(start, start + count):
            epoch, i = divmod(pos, self.num_items)
            out.append(int(self._permutation(epoch)[i]))
        return out

    def micro_batch(
        self, step: int, *, global_batch: int, micro: int, accum_index: int, rank: int, world: int
    ) -> list[int]:
        """Indices for rank `rank`'s micro-batch number `accum_index` of global step `step`."""
        offset = step * global_batch + (accum_index * world + rank) * micro
        return self.indices(offset, micro)
