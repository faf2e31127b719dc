"""Stage 1: train the discrete VAE under a DeepSpeed engine (PAPER §1); `dalle-ds train-dvae` runs it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from dalle_ds.config import ExperimentConfig
from dalle_ds.data.report import PassReport
from dalle_ds.data.sources import image_dataset
from dalle_ds.data.split import warn_if_small_val
from dalle_ds.data.stream import StreamOrder, first_items
from dalle_ds.dvae import DVAE
from dalle_ds.dvae.io import save_dvae
from dalle_ds.dvae.recon import RECON_IMAGES, recon_grid
from dalle_ds.dvae.schedules import dvae_schedules
from dalle_ds.training import checkpoint as ckpt
from dalle_ds.training.distributed import device, gather_objects, init_distributed, is_main, rank, world_size
from dalle_ds.training.ema import EMA
from dalle_ds.training.engine import build_engine, compute_dtype, load_ds_config, micro_batch
from dalle_ds.training.eval_guard import finite_eval
from dalle_ds.training.loop import LoopConfig, fit
from dalle_ds.training.precision import configure_matmul


def load_images(dataset, indices: list[int]) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float in [0, 1]."""
    return stack_images([dataset[i] for i in indices])


VAL_LIMIT = 512  # validation images for the reconstruction PSNR


@torch.no_grad()
def recon_psnr(dvae: torch.nn.Module, dataset, *, batch: int = 64, limit: int = VAL_LIMIT) -> float:
    """PSNR (dB) of argmax-token reconstructions (encode -> decode), the path the prior sees."""
    dvae.eval()
    n = min(len(dataset), limit)
    if n == 0:
        return float("nan")
    se, count = 0.0, 0
    dtype = next(dvae.parameters()).dtype
    for start in range(0, n, batch):
        x = load_images(dataset, list(range(start, min(n, start + batch)))).to(device())
        x_hat = dvae.decode(dvae.encode(x.to(dtype))).float()
        se += (x_hat - x).pow(2).sum().item()
        count += x.numel()
    return 10.0 * math.log10(1.0 / max(se / count, 1e-12))


def train_dvae(
    cfg: ExperimentConfig,
    *,
    ds_config,
    out_dir: str | Path,
    resume: bool = True,
    progress: bool = True,
    stop_at: int | None = None,
) -> dict:
    """Train, then export the EMA weights to `out_dir/dvae.pt`. Returns a summary (rank 0).

    With data.streaming (external sources) each rank reads its own shard on the fly through a StreamOrder
    whose position is checkpointed; the validation PSNR uses the first VAL_LIMIT usable val items.
    Every dvae_train.eval_every steps and at the end it logs the val PSNR (printed, metrics.jsonl, TensorBoard)
    and writes OUT/recon_stepN.png: RECON_IMAGES fixed val images above their reconstructions."""
    init_distributed()
    # Late in the temperature schedule the relaxed codes hold values below 1e-38 (denormals), which made a
    # CPU step ~2x slower (86 against 44 ms at temperature 1/16); flush them to zero (process-wide).
    torch.set_flush_denormal(True)
    out_dir = Path(out_dir)
    tcfg = cfg.dvae_train
    torch.manual_seed(tcfg.seed)
    ds_cfg = load_ds_config(ds_config)
    if configure_matmul(ds_cfg, tcfg.allow_tf32) == "high" and is_main():
        print("fp32 on an sm80+ GPU: matmuls in TF32 (dvae_train.allow_tf32=false for IEEE fp32)")
    stream = None
    if cfg.data.streaming and cfg.data.dataset != "shapes":
        # two micro-batches decoded ahead in a thread, overlapping the step
        stream = StreamOrder(
            cfg.data, "train", "dvae", rank=rank(), world=world_size(), prefetch=2 * micro_batch(ds_cfg)
        )
        val_report = PassReport()
        val_cache: list[dict] = []  # read at the first eval, so training starts without a val scan
    else:
        train_set, val_set = image_dataset(cfg.data, "train"), image_dataset(cfg.data, "val")
        data_report = log_data_report(
            out_dir, {"train": train_set.report, "val": val_set.report} if hasattr(train_set, "report") else {}
        )
    model = DVAE(cfg.dvae)
    engine = build_engine(
        model,
        ds_cfg,
        lr=tcfg.lr,
        betas=tcfg.betas,
        eps=tcfg.eps,
        weight_decay=tcfg.weight_decay,
        lr_lambda=lambda step: dvae_schedules(step, tcfg)["lr"] / tcfg.lr,
    )
    ema = EMA(engine.module, tcfg.ema_decay)
    dtype = compute_dtype(ds_cfg)

    def loss_fn(eng, idx, step):
        x = (stack_images(idx) if stream is not None else load_images(train_set, idx)).to(device(), dtype)
        s = dvae_schedules(step, tcfg)
        loss, stats = eng(x, temperature=s["temperature"], kl_weight=s["kl_weight"], mse_weight=s["mse_weight"])
        return loss, {k: stats[k] for k in ("nll", "kl", "recon_mse", "codebook_usage")}, x.numel()

    shown: list = []  # the RECON_IMAGES val items of every recon grid, read once (the same crops in each)

    def eval_fn(module):
        if stream is not None and not val_cache:
            val_cache.extend(first_items(cfg.data, "val", VAL_LIMIT, report=val_report))
            warn_if_small_val(len(val_cache), f"{cfg.data.path} (first {VAL_LIMIT} val items read)")
        vals = val_cache if stream is not None else val_set
        if not shown:  # before recon_psnr reads the val set: a resumed run then shows the same crops
            shown.extend(vals[i] for i in range(min(RECON_IMAGES, len(vals))))
        with ema.swapped_in():
            psnr = recon_psnr(module, vals)
            grid = recon_grid(module, torch.stack([it["image"] for it in shown]), [it["caption"] for it in shown])
        return {"recon_psnr": psnr, "recon": grid}  # the logger writes "recon" to OUT/recon_stepN.png

    def has_val() -> bool:
        return len(val_cache if stream is not None else val_set) > 0

    # a NaN PSNR of real validation images stops the run
    eval_fn = finite_eval(eval_fn, lambda: engine.global_steps, "dVAE", allow_inf=True, has_data=has_val)

    loop = LoopConfig(
        steps=tcfg.steps,
        log_every=tcfg.log_every,
        save_every=tcfg.save_every,
        eval_every=tcfg.eval_every,
        seed=tcfg.seed,
        desc="dVAE",
        progress=progress,
        stop_at=stop_at,
        keep_last=cfg.checkpoint.keep_last,
    )
    result = fit(
        engine,
        loss_fn=loss_fn,
        num_items=0 if stream is not None else len(train_set),
        ds_cfg=ds_cfg,
        out_dir=out_dir,
        loop=loop,
        ema=ema,
        eval_fn=eval_fn,
        schedule_fn=lambda step: dvae_schedules(step, tcfg),
        resume=resume,
        order=stream,
        extra_state={"stream": stream} if stream is not None else None,
    )
    if stream is not None:  # counts over everything the ranks read (resumed runs included), per-rank positions
        stream.close()
        ranks = gather_objects(stream.state_dict())
        train_report = PassReport()
        for st in ranks:
            train_report.merge(PassReport.from_dict(st["report"]))
        data_report = log_data_report(out_dir, {"train": train_report, "val": val_report}, stream_ranks=ranks)
    if result.interrupted:  # SIGTERM: the checkpoint is saved; exit without the export
        return {"step": result.step, "seconds": result.seconds, "history": result.history, "interrupted": True}
    with ema.swapped_in():
        state = ckpt.gathered_state_dict(engine.module)
    if is_main():
        save_dvae(out_dir / "dvae.pt", state, cfg, step=result.step)
    return {
        "step": result.step,
        "seconds": result.seconds,
        "recon_psnr": result.last_eval.get("recon_psnr"),
        "history": result.history,
        "path": str(out_dir / "dvae.pt"),
        "data_report": data_report,
    }


def stack_images(items: list[dict]) -> torch.Tensor:
    """A stream's items -> (B, 3, H, W) float in [0, 1]."""
    return torch.stack([it["image"] for it in items]).float().div_(255.0)


def log_data_report(out_dir: Path, reports: dict[str, PassReport], **extra) -> dict:
    """Print each split's pass counts (skipped by defect, filtered by rule, converted) and write
    out_dir/data_report.json (plus `extra`) on rank 0; {} for the built-in data, which has no pass."""
    out = {name: rep.as_dict() for name, rep in reports.items()}
    if out and is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "data_report.json").write_text(json.dumps({**out, **extra}, indent=1))
        for name, rep in reports.items():
            print(f"[{name}] {rep.summary()}", flush=True)
    return {**out, **extra} if out else {}
