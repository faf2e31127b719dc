"""Train the small contrastive image-text model used to rerank samples (`dalle-ds train-clip` runs it).

Reads the same data as the dVAE (any source, filters and counts included) with the prior's preprocessing
(no flip: captions say "left" and "right"). It trains on the images themselves, not on dVAE
reconstructions: a reconstruction keeps its source's caption even where the dVAE drew another shape, and a
reranker trained on them learned to call the dVAE's blobs crosses (measurements: docs/RESULTS.md).
With clip.hard_negatives > 0, that fraction of each batch comes in pairs of items whose captions differ
in one word ("a small red square at the top" / "a small red circle at the top"): a reranker compares
candidates for one caption, and random in-batch negatives rarely teach such fine differences.
Writes out/clip.pt (config + weights + tokenizer) and out/clip_metrics.json. One process, plain PyTorch:
the model is small. On a GPU (device "auto" finds one) the steps run under bf16 autocast on sm80+ and in
fp32 below (fp16 would need a loss scaler, whose state the checkpoint does not keep; the model is small).
A progress bar shows the loss; checkpoints in out/clip_ckpt/ make a stopped run resume exactly
(rerank/resume.py).
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dalle_ds.config import ExperimentConfig
from dalle_ds.data.sources import image_dataset
from dalle_ds.rerank import resume as resume_io
from dalle_ds.rerank.augment import random_zoom_shift
from dalle_ds.rerank.contrastive import ContrastiveModel
from dalle_ds.rerank.io import save_clip
from dalle_ds.sampling.placement import sample_device
from dalle_ds.tokenizer import CaptionTokenizer
from dalle_ds.training.precision import Capability, has_bf16


def _batch(ds, idx) -> tuple[torch.Tensor, list[str]]:
    items = [ds[int(i)] for i in idx]
    return torch.stack([it["image"] for it in items]).float().div_(255.0), [it["caption"] for it in items]


def neighbour_index(captions: list[str]) -> dict[str, list[int]]:
    """Items whose captions differ in exactly one word share a key: the caption with that word as "*"."""
    index: dict[str, list[int]] = defaultdict(list)
    for i, cap in enumerate(captions):
        words = cap.split()
        for k in range(len(words)):
            index[" ".join(words[:k] + ["*"] + words[k + 1 :])].append(i)
    return index


def neighbour(i: int, captions: list[str], index: dict[str, list[int]], rng: np.random.Generator) -> int | None:
    """An item whose caption differs from item i's in one word (a random word that has such items), or None."""
    words = captions[i].split()
    for k in rng.permutation(len(words)):
        others = [j for j in index[" ".join(words[:k] + ["*"] + words[k + 1 :])] if captions[j] != captions[i]]
        if others:
            return others[rng.integers(len(others))]
    return None


def draw_batch(
    n_items: int,
    bs: int,
    rng: np.random.Generator,
    captions: list[str] | None,
    index: dict[str, list[int]] | None,
    hard_negatives: float,
) -> np.ndarray:
    """bs item indices. With hard negatives, the first pairs (a fraction `hard_negatives` of the batch) are
    an item and a one-word neighbour of it (same colour and place, another shape, ...): in-batch negatives
    of random captions rarely differ in one attribute only, which is all that tells a reranker's candidates
    apart."""
    idx = rng.choice(n_items, size=bs, replace=False)
    if index is None:
        return idx
    for p in range(0, 2 * int(bs * hard_negatives / 2), 2):
        j = neighbour(int(idx[p]), captions, index, rng)
        if j is None:
            continue
        at = np.flatnonzero(idx == j)
        if len(at) and at[0] <= p:  # part of a pair already
            continue
        if len(at):  # later in the batch: move it next to its anchor
            idx[at[0]] = idx[p + 1]
        idx[p + 1] = j
    return idx


def autocast_dtype(device_type: str, capability: Capability) -> torch.dtype | None:
    """The training steps' autocast dtype: bf16 on an sm80+ GPU, None (fp32) on the CPU and older GPUs."""
    return torch.bfloat16 if has_bf16(device_type == "cuda", capability) else None


@torch.no_grad()
def retrieval_accuracy(model: ContrastiveModel, tok: CaptionTokenizer, ds, *, n: int = 256) -> float:
    """Top-1 image->caption retrieval among n validation pairs (identical captions count as right), on the
    model's device in fp32."""
    model.eval()
    device = next(model.parameters()).device
    x, caps = _batch(ds, range(min(n, len(ds))))
    ids = tok.encode_batch(caps, train=False).to(device)
    sim = model.encode_image(x.to(device)) @ model.encode_text(ids).t()
    best = sim.argmax(1)
    return float(np.mean([caps[int(b)] == caps[i] for i, b in enumerate(best)]))


def _tokenizer(cfg: ExperimentConfig, train_set, state: dict | None, tokenizer_path) -> CaptionTokenizer:
    """The checkpoint's tokenizer when resuming, else the given file, else one trained on the captions."""
    if state is not None:
        return CaptionTokenizer.from_json(state["tokenizer"], cfg.tokenizer)
    if tokenizer_path is not None:
        return CaptionTokenizer.load(tokenizer_path, cfg.tokenizer)
    caps = [train_set[i]["caption"] for i in range(min(len(train_set), 5000))]
    return CaptionTokenizer.train(caps, cfg.tokenizer)


def _optimizer(model: ContrastiveModel, c) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with a 50-step linear warmup into a cosine decay over clip.steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / c.steps)))
    )
    return opt, sched


def _hard_negative_index(train_set, hard_negatives: float) -> tuple[list[str] | None, dict | None]:
    """(captions, one-word-neighbour index) for drawing hard negatives, or (None, None) without them."""
    if hard_negatives <= 0:
        return None, None
    captions = (
        train_set.captions()
        if hasattr(train_set, "captions")
        else [train_set[i]["caption"] for i in range(len(train_set))]
    )
    return captions, neighbour_index(captions)


@dataclass
class _ClipRun:
    """The training state a checkpoint holds, and the clock of this run (seconds add to earlier runs')."""

    cfg: ExperimentConfig
    ckpt_dir: Path
    model: ContrastiveModel
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    rng: np.random.Generator
    tok: CaptionTokenizer
    train_set: object
    history: list
    before: float
    autocast: torch.dtype | None = None  # the steps' autocast dtype on a GPU (autocast_dtype)
    t0: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.t0

    def save(self, step: int) -> None:
        resume_io.save(
            self.ckpt_dir,
            step=step,
            cfg=self.cfg,
            model=self.model,
            opt=self.opt,
            sched=self.sched,
            rng=self.rng,
            tok=self.tok,
            data=self.train_set,
            history=self.history,
            seconds=self.seconds(),
        )


def _train_step(run: _ClipRun, idx: np.ndarray) -> tuple[torch.Tensor, dict]:
    run.model.train()
    x, caps = _batch(run.train_set, idx)
    x = random_zoom_shift(x, run.cfg.clip.augment, run.rng)  # training pictures only, never evaluation
    device = next(run.model.parameters()).device
    ids = run.tok.encode_batch(caps, train=False).to(device)
    with torch.autocast(device.type, dtype=run.autocast, enabled=run.autocast is not None):
        loss, stats = run.model(x.to(device), ids)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    run.opt.step()
    run.sched.step()
    return loss, stats


def _train_steps(run: _ClipRun, start: int, end: int, bs: int, captions, index, progress: bool):
    """Steps start..end, logging and checkpointing; (signal number or None, last step). A SIGTERM or Ctrl-C
    saves the last finished step and stops."""
    c = run.cfg.clip
    bar = tqdm(total=c.steps, initial=start, desc="clip", disable=not progress, dynamic_ncols=True)
    step = start
    with resume_io.StopFlag() as stop:
        for step in range(start, end):
            idx = draw_batch(len(run.train_set), bs, run.rng, captions, index, c.hard_negatives)
            loss, stats = _train_step(run, idx)
            done = step + 1
            bar.update(1)
            if done % c.log_every == 0 or done == c.steps:
                run.history.append({"step": done, "loss": loss.detach().item(), **stats})
                bar.set_postfix(loss=f"{run.history[-1]['loss']:.4f}", batch_acc=f"{stats['acc']:.3f}")
            if stop.signum is not None or done % c.save_every == 0 or done == end:
                run.save(done)
            if stop.signum is not None:
                break
        else:
            step = end
    bar.close()
    return stop.signum, step


def _finish(run: _ClipRun, out_dir: Path, val_set, end: int) -> dict:
    """Validation retrieval accuracy, then clip.pt and clip_metrics.json; the summary."""
    val_acc = retrieval_accuracy(run.model, run.tok, val_set)
    save_clip(out_dir / "clip.pt", run.model.state_dict(), run.cfg, run.tok, step=end)
    summary = {
        "step": end,
        "seconds": run.seconds(),
        "val_retrieval_top1": val_acc,
        "history": run.history,
        "path": str(out_dir / "clip.pt"),
    }
    if hasattr(run.train_set, "report"):
        summary["data_report"] = {"train": run.train_set.report.as_dict(), "val": val_set.report.as_dict()}
    (out_dir / "clip_metrics.json").write_text(json.dumps(summary, indent=1))
    return summary


def train_clip(
    cfg: ExperimentConfig,
    out_dir: str | Path,
    *,
    tokenizer_path: str | Path | None = None,
    progress: bool = True,
    resume: bool = True,
    stop_at: int | None = None,
    device: str = "auto",
) -> dict:
    """Train (resuming from out_dir/clip_ckpt/ unless resume=False), then write clip.pt and clip_metrics.json.

    Every clip.save_every steps, at the end and when stopped by SIGTERM or Ctrl-C, the whole training state
    goes to out_dir/clip_ckpt/checkpoint.pt (rerank/resume.py); a resumed run ends with the weights of an
    uninterrupted one. A stopped run returns {"interrupted": signal number, ...} and writes no clip.pt;
    `stop_at` ends the run after that step like a finished one (a rerun with a larger stop_at continues).
    `device`: "auto" (a CUDA GPU if visible), "cpu" or "cuda[:N]"."""
    c = cfg.clip
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / resume_io.CKPT_DIR
    torch.manual_seed(c.seed)
    rng = np.random.default_rng(c.seed)
    train_set = image_dataset(cfg.data, "train", purpose="prior")
    val_set = image_dataset(cfg.data, "val", purpose="prior")
    state = resume_io.load(ckpt_dir, cfg) if resume else None
    tok = _tokenizer(cfg, train_set, state, tokenizer_path)
    dev = sample_device(device)
    model = ContrastiveModel(c, tok.vocab_size, tok.text_len).to(dev)
    opt, sched = _optimizer(model, c)
    bs = min(c.batch_size, len(train_set))
    captions, index = _hard_negative_index(train_set, c.hard_negatives)
    start, history, before = 0, [], 0.0
    if state is not None:  # last, after everything above that reads data or draws random numbers
        resume_io.restore(state, model=model, opt=opt, sched=sched, rng=rng, data=train_set)
        start, history, before = int(state["step"]), list(state["history"]), float(state["seconds"])
        print(f"clip: resuming from step {start} ({ckpt_dir})", flush=True)
    end = c.steps if stop_at is None else min(c.steps, stop_at)
    cap = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else None
    autocast = autocast_dtype(dev.type, cap)
    run = _ClipRun(cfg, ckpt_dir, model, opt, sched, rng, tok, train_set, history, before, autocast)
    signum, step = _train_steps(run, start, end, bs, captions, index, progress)
    if signum is not None:  # the checkpoint of the last finished step is saved; no clip.pt
        return {"interrupted": signum, "step": step + 1, "path": None, "checkpoint": str(ckpt_dir)}
    return _finish(run, out_dir, val_set, end)
