"""Where images and captions come from. Issue-2 scope: the built-in procedural "shapes" dataset."""
from __future__ import annotations

from torch.utils.data import Dataset

from dalle_ds.config import ConfigError, DataConfig


def image_dataset(cfg: DataConfig, split: str) -> Dataset:
    """A dataset of {"image": uint8 (3, H, W), "caption": str} for `split` in train | val."""
    if cfg.dataset == "shapes":
        from dalle_ds.data.shapes import ShapesDataset  # noqa: PLC0415

        size = {"train": cfg.num_train, "val": cfg.num_val}[split]
        return ShapesDataset(split=split, size=size, image_size=cfg.image_size, seed=cfg.seed,
                             two_shape_prob=cfg.two_shape_prob)
    raise ConfigError(f"data.dataset: unknown dataset {cfg.dataset!r}; the built-in one is 'shapes'")
