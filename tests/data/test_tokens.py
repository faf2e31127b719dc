"""load_encoded keeps the token grids uint16 in memory and widens only a batch (issue 5, item 5)."""

import numpy as np
import torch
from helpers import make_encoded_dataset

from dalle_ds.data.encode_grids import load_encoded
from dalle_ds.data.order import DataOrder


def _old_int64_table(path, split):
    """What load_encoded returned before: the whole split as one int64 tensor."""
    import datasets

    ds = datasets.load_from_disk(str(path))[split]
    return torch.from_numpy(np.asarray(ds.with_format("numpy")["tokens"]).astype(np.int64))


def test_tokens_stay_16_bit_and_batches_are_unchanged(tmp_path, tiny_cfg):
    import datasets

    path = make_encoded_dataset(tmp_path / "enc", tiny_cfg, n_train=50, n_val=12)
    # several Arrow files per split, as a large save_to_disk writes them
    dd = datasets.load_from_disk(str(path))
    dd.save_to_disk(str(tmp_path / "sharded"), num_shards={"train": 3, "val": 2})
    for split in ("train", "val"):
        old = _old_int64_table(path, split)
        caps, toks = load_encoded(tmp_path / "sharded", split)
        assert toks.numpy().dtype == np.uint16 and toks.numpy().nbytes == old.numel() * 2
        assert toks.shape == tuple(old.shape) == (len(caps), tiny_cfg.prior.image_len)
        assert (toks.min(), toks.max()) == (int(old.min()), int(old.max()))
        order = DataOrder(len(caps), seed=3)  # the training loop's batches, over two epochs
        for step in range(2 * len(caps) // 8 + 1):
            idx = order.micro_batch(step, global_batch=8, micro=4, accum_index=1, rank=0, world=2)
            batch = toks[idx]
            assert batch.dtype == torch.int64 and torch.equal(batch, old[idx])
        for s in range(0, len(caps), 5):  # validation_loss slices
            assert torch.equal(toks[s : s + 5], old[s : s + 5])
        assert torch.equal(toks[7], old[7])
