"""Pre-encoding: images -> dVAE token grids (argmax, uint16) beside their captions, as a `datasets` dataset.

The prior then trains from token grids without touching pixels (PAPER §1.4: argmax, no gumbel noise).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dalle_ds.config import ExperimentConfig
from dalle_ds.data.sources import image_dataset


@torch.no_grad()
def encode_split(dvae: torch.nn.Module, dataset, *, batch: int = 256) -> dict:
    """{"caption": [str], "tokens": uint16 (n, G*G) in raster order}."""
    dvae.eval()
    captions, grids = [], []
    for start in range(0, len(dataset), batch):
        items = [dataset[i] for i in range(start, min(len(dataset), start + batch))]
        x = torch.stack([it["image"] for it in items]).float().div_(255.0)
        grids.append(dvae.encode(x).flatten(1).to(torch.int32).numpy().astype(np.uint16))  # (B, G*G)
        captions.extend(it["caption"] for it in items)
    return {"caption": captions, "tokens": np.concatenate(grids)}


def encode_to_disk(dvae: torch.nn.Module, cfg: ExperimentConfig, out_dir: str | Path,
                   splits: tuple[str, ...] = ("train", "val")) -> Path:
    import datasets  # noqa: PLC0415

    if cfg.dvae.vocab_size > 65536:
        raise ValueError("dvae.vocab_size: token grids are stored as uint16; at most 65536 codes")
    parts = {s: datasets.Dataset.from_dict(encode_split(dvae, image_dataset(cfg.data, s))) for s in splits}
    out_dir = Path(out_dir)
    datasets.DatasetDict(parts).save_to_disk(str(out_dir))
    return out_dir


def load_encoded(path: str | Path, split: str):
    """The encoded split with tokens as an int64 tensor for fast batch indexing."""
    import datasets  # noqa: PLC0415

    ds = datasets.load_from_disk(str(path))[split]
    tokens = torch.from_numpy(np.asarray(ds.with_format("numpy")["tokens"]).astype(np.int64))
    return list(ds["caption"]), tokens
