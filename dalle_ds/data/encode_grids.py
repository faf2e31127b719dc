"""Pre-encoding: images -> dVAE token grids (argmax, uint16) beside their captions, as a `datasets` dataset.

The prior then trains from token grids without touching pixels (PAPER §1.4: argmax, no gumbel noise; the
images get the prior's preprocessing, Listing 2: near-centre crop, no flip).

At scale the work is split across ranks and made resumable:

* rank r of W handles records r, r+W, r+2W, ... of each split (any source; streaming sources included);
* every `chunk` kept items it writes `parts/<split>/rank<r>-<n>.parquet` (atomically: temp file + rename)
  and then `parts/<split>/rank<r>.json` = {"position": raw records consumed, "chunks": n, "done": bool,
  "report": pass counts}; a restarted rank reads that file and continues after the last written chunk;
* the rank that finds every rank done merges the parts into the final DatasetDict at `out_dir`
  (`load_encoded` reads it) and writes `encode_report.json` with the pass counts per split.
No collective communication is needed, so ranks may run as separate processes or jobs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dalle_ds.config import ExperimentConfig
from dalle_ds.data.records import raw_records
from dalle_ds.data.report import PassReport
from dalle_ds.data.sources import image_dataset, stream_items
from dalle_ds.data.tokens import TokenTable


@torch.no_grad()
def encode_images(dvae: torch.nn.Module, images: list[torch.Tensor]) -> np.ndarray:
    """uint8 (3, H, W) images -> uint16 (n, G*G) argmax token grids in raster order."""
    x = torch.stack(images).float().div_(255.0)
    dtype = next(dvae.parameters()).dtype
    return dvae.encode(x.to(dtype)).flatten(1).to(torch.int32).numpy().astype(np.uint16)


@torch.no_grad()
def encode_split(dvae: torch.nn.Module, dataset, *, batch: int = 256) -> dict:
    """{"caption": [str], "tokens": uint16 (n, G*G) in raster order} for a whole map-style dataset."""
    dvae.eval()
    captions, grids = [], []
    for start in range(0, len(dataset), batch):
        items = [dataset[i] for i in range(start, min(len(dataset), start + batch))]
        grids.append(encode_images(dvae, [it["image"] for it in items]))
        captions.extend(it["caption"] for it in items)
    return {"caption": captions, "tokens": np.concatenate(grids)}


def _items(cfg: ExperimentConfig, split: str, rank: int, world: int, start: int, report: PassReport):
    """(position, item) over this rank's records of `split`, from `start` on."""
    if cfg.data.dataset == "shapes":
        ds = image_dataset(cfg.data, split)
        mine = range(rank, len(ds), world)
        for pos in range(start, len(mine)):
            yield pos + 1, ds[mine[pos]]
        return
    yield from stream_items(cfg.data, split, "prior", rank=rank, world=world, start=start, report=report)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _load_progress(prog_path: Path, world: int) -> dict:
    """The rank's progress file, or a fresh one; refuses a resume with another rank count."""
    prog = (
        json.loads(prog_path.read_text())
        if prog_path.exists()
        else {"position": 0, "chunks": 0, "done": False, "report": PassReport().as_dict(), "world": world}
    )
    if prog.get("world", world) != world:
        raise ValueError(f"{prog_path}: started with {prog['world']} ranks, now {world}; resume with the same count")
    return prog


class _ChunkWriter:
    """Buffers a rank's kept items, encodes their images `batch` at a time, and writes each chunk as one
    parquet part (atomically), recording the position and pass counts in the progress file after it."""

    def __init__(self, dvae, parts: Path, rank: int, prog: dict, prog_path: Path, report: PassReport, batch: int):
        self.dvae, self.parts, self.rank, self.batch = dvae, parts, rank, batch
        self.prog, self.prog_path, self.report = prog, prog_path, report
        self.caps: list[str] = []
        self.imgs: list[torch.Tensor] = []
        self.grids: list[np.ndarray] = []
        self.written_now = 0  # chunks written by this call (not by earlier runs)

    def add(self, item: dict) -> None:
        self.caps.append(item["caption"])
        self.imgs.append(item["image"])
        if len(self.imgs) == self.batch:
            self._encode_batch()

    def _encode_batch(self) -> None:
        if self.imgs:
            self.grids.append(encode_images(self.dvae, self.imgs))
            self.imgs.clear()

    def flush_chunk(self, position: int) -> None:
        """Writes the buffered items (if any) as the next part, then the progress file at `position`."""
        import datasets  # noqa: PLC0415

        self._encode_batch()
        if self.caps:
            name = self.parts / f"rank{self.rank}-{self.prog['chunks']:06d}.parquet"
            tmp = name.with_suffix(".tmp")
            data = {"caption": list(self.caps), "tokens": np.concatenate(self.grids)}
            datasets.Dataset.from_dict(data).to_parquet(str(tmp))
            os.replace(tmp, name)
            self.prog["chunks"] += 1
            self.written_now += 1
        self.caps.clear()
        self.grids.clear()
        self.prog["position"], self.prog["report"] = position, self.report.as_dict()
        _write_json(self.prog_path, self.prog)


@torch.no_grad()
def encode_shard(
    dvae: torch.nn.Module,
    cfg: ExperimentConfig,
    out_dir: str | Path,
    split: str,
    *,
    rank: int = 0,
    world: int = 1,
    chunk: int = 4096,
    batch: int = 256,
    stop_after_chunks: int | None = None,
    progress: bool = False,
) -> dict:
    """Encode rank `rank`'s share of `split` into parquet chunks, resuming from its progress file.
    `progress` shows a bar (stderr) over the shard's raw records (kept or not; its length unknown when
    streaming)."""
    dvae.eval()
    parts = Path(out_dir) / "parts" / split
    parts.mkdir(parents=True, exist_ok=True)
    prog_path = parts / f"rank{rank}.json"
    prog = _load_progress(prog_path, world)
    if prog["done"]:
        return prog
    report = PassReport.from_dict(prog["report"])
    writer = _ChunkWriter(dvae, parts, rank, prog, prog_path, report, batch)
    position = prog["position"]
    bar = tqdm(
        total=_shard_size(cfg, split, rank, world) if progress else None,
        initial=position,
        desc=f"encode {split}",
        unit="rec",
        disable=not progress,
        dynamic_ncols=True,
    )
    for position, item in _items(cfg, split, rank, world, prog["position"], report):
        bar.update(position - bar.n)
        writer.add(item)
        if len(writer.caps) == chunk:
            writer.flush_chunk(position)
            if stop_after_chunks is not None and writer.written_now >= stop_after_chunks:
                bar.close()
                return prog  # a deliberate interruption (tests); a rerun resumes
    prog["done"] = True
    writer.flush_chunk(position)
    if bar.total is not None:  # records after the last kept one were read too
        bar.update(bar.total - bar.n)
    bar.close()
    return prog


def _shard_size(cfg: ExperimentConfig, split: str, rank: int, world: int) -> int | None:
    """Raw records in rank `rank`'s share of `split` (what `position` counts), None for a streaming source."""
    if cfg.data.dataset == "shapes":
        return len(range(rank, cfg.data.num_train if split == "train" else cfg.data.num_val, world))
    records, _ = raw_records(cfg.data, split)
    if getattr(records, "streaming", False):
        return None
    return len(range(rank, len(records), world))


def merge_parts(out_dir: str | Path, splits: tuple[str, ...], world: int) -> bool:
    """If every rank finished every split, merge parts into the final DatasetDict (once). True if merged now."""
    import datasets  # noqa: PLC0415

    out_dir = Path(out_dir)
    progs = {}
    for split in splits:
        for r in range(world):
            p = out_dir / "parts" / split / f"rank{r}.json"
            if not p.exists() or not json.loads(p.read_text())["done"]:
                return False
            progs[(split, r)] = json.loads(p.read_text())
    try:
        fd = os.open(out_dir / "merge.lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.close(fd)
    except FileExistsError:
        return False
    merged, reports = {}, {}
    for split in splits:
        files = [
            str(out_dir / "parts" / split / f"rank{r}-{c:06d}.parquet")
            for r in range(world)
            for c in range(progs[(split, r)]["chunks"])
        ]
        feats = datasets.Features(
            {"caption": datasets.Value("string"), "tokens": datasets.Sequence(datasets.Value("uint16"))}
        )
        merged[split] = (
            datasets.load_dataset("parquet", data_files=files, split="train", features=feats)
            if files
            else datasets.Dataset.from_dict({"caption": [], "tokens": []}, features=feats)
        )
        rep = PassReport()
        for r in range(world):
            rep.merge(PassReport.from_dict(progs[(split, r)]["report"]))
        reports[split] = rep.as_dict()
    datasets.DatasetDict(merged).save_to_disk(str(out_dir / "dataset"))
    _write_json(out_dir / "encode_report.json", reports)
    return True


def _dataset_dir(path: Path) -> Path:
    return path / "dataset" if (path / "dataset" / "dataset_dict.json").exists() else path


def encode_to_disk(
    dvae: torch.nn.Module,
    cfg: ExperimentConfig,
    out_dir: str | Path,
    splits: tuple[str, ...] = ("train", "val"),
    *,
    rank: int = 0,
    world: int = 1,
    chunk: int = 4096,
    batch: int = 256,
    stop_after_chunks: int | None = None,
    progress: bool = False,
) -> Path:
    """Encode every split (this rank's share), then merge if all ranks are done. Returns out_dir."""
    if cfg.dvae.vocab_size > 65536:
        raise ValueError("dvae.vocab_size: token grids are stored as uint16; at most 65536 codes")
    out_dir = Path(out_dir)
    for split in splits:
        prog = encode_shard(
            dvae,
            cfg,
            out_dir,
            split,
            rank=rank,
            world=world,
            chunk=chunk,
            batch=batch,
            stop_after_chunks=stop_after_chunks,
            progress=progress,
        )
        if not prog["done"]:
            return out_dir
    merge_parts(out_dir, splits, world)
    return out_dir


def load_encoded(path: str | Path, split: str) -> tuple[list[str], TokenTable]:
    """(captions, token grids): the grids stay uint16 in memory; indexing gives an int64 batch."""
    import datasets  # noqa: PLC0415

    ds = datasets.load_from_disk(str(_dataset_dir(Path(path))))[split]
    return list(ds["caption"]), TokenTable.from_column(ds.with_format("arrow")[:]["tokens"])
