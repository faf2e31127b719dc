"""Rank-0 metrics: JSONL lines, TensorBoard scalars and a progress bar with step, loss and throughput."""

from __future__ import annotations

import json
import time
from pathlib import Path

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
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

            self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"))
        except ImportError:  # tensorboard is optional for a bare model-only install
            self.writer = None
        if progress:
            from tqdm import tqdm  # noqa: PLC0415

            self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True)
        self._t = time.perf_counter()

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
