"""Rank-0 metrics: JSONL lines, TensorBoard scalars and images, eval pictures as PNG files, and a progress bar
with step, loss and throughput.

metrics.jsonl holds one training record and at most one validation record per step: a resumed run first
drops the records after the step it resumed from (the steps it is about to log again)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from dalle_ds.training.distributed import is_main


class MetricsLogger:
    def __init__(
        self, out_dir: str | Path, *, total_steps: int, start_step: int = 0, desc: str = "train", progress: bool = True
    ):
        self.enabled = is_main()
        self.path = Path(out_dir) / "metrics.jsonl"
        self.writer = None
        self.bar = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._seen = self._truncate(start_step)
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

            self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"))
        except ImportError:  # tensorboard is optional for a bare model-only install
            self.writer = None
        if progress:
            from tqdm import tqdm  # noqa: PLC0415

            self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True)
        self._t = time.perf_counter()

    def log(self, step: int, values: dict) -> None:
        """Scalars go to metrics.jsonl and TensorBoard. A value that is an image, uint8 (H, W, 3) (an eval's
        "recon" or "samples" grid), goes to OUT/<name>_step<N>.png and to TensorBoard's images instead.
        Validation values ("val/...") are also printed: a user should not need TensorBoard to see progress."""
        if not self.enabled:
            return
        images = {k: v for k, v in values.items() if isinstance(v, np.ndarray) and v.ndim == 3}
        scalars = {k: v for k, v in values.items() if k not in images}
        self._append({"step": step, **scalars})
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
        written = [self.log_image(step, k, v) for k, v in images.items()]
        shown = [f"{k} {v:.4g}" for k, v in scalars.items() if k.startswith("val/") and isinstance(v, (int, float))]
        if shown or written:
            self.write(f"step {step}: " + ", ".join(shown + [f"wrote {p.name}" for p in written]))

    def _truncate(self, start_step: int) -> set[tuple[int, str]]:
        """Keep the records up to `start_step` (and drop a line torn by a kill); their (step, kind) pairs."""
        if not self.path.exists():
            return set()
        kept, seen = [], set()
        for line in self.path.read_text(errors="replace").splitlines():
            key = _key(line)
            if key is not None and isinstance(key[0], int) and key[0] <= start_step:
                kept.append(line)
                seen.add(key)
        self._rewrite(kept)
        return seen

    def _rewrite(self, lines: list[str]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        os.replace(tmp, self.path)

    def _append(self, rec: dict) -> None:
        key = (rec["step"], _kind(rec))
        if key in self._seen:  # e.g. the final evaluation of a run resumed at its last step: replace it
            lines = self.path.read_text().splitlines()
            self._rewrite([json.dumps(rec) if _key(line) == key else line for line in lines])
            return
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        self._seen.add(key)

    def log_image(self, step: int, name: str, image: np.ndarray) -> Path:
        """uint8 (H, W, 3) -> OUT/<last part of name>_step<step>.png (atomically) and TensorBoard image `name`."""
        from PIL import Image  # noqa: PLC0415

        path = self.path.parent / f"{name.rsplit('/', 1)[-1]}_step{step}.png"
        tmp = path.with_name(path.name + ".tmp")
        Image.fromarray(image).save(tmp, format="PNG")
        os.replace(tmp, path)
        if self.writer is not None:
            self.writer.add_image(name, image, step, dataformats="HWC")
        return path

    def write(self, line: str) -> None:
        """A line on stdout that leaves the progress bar intact."""
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _kind(rec: dict) -> str:
    return "val" if any(k.startswith("val/") for k in rec) else "train"


def _key(line: str) -> tuple[int, str] | None:
    """(step, kind) of a metrics.jsonl line; None for a line that is not a record (torn by a kill)."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return (rec.get("step"), _kind(rec)) if isinstance(rec, dict) else None
