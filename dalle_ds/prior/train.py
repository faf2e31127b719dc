"""Stage 2: train the sparse-attention transformer prior over [text | image tokens] under DeepSpeed;
`dalle-ds train-prior` runs it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from dalle_ds.config import ExperimentConfig, PriorTrainConfig
from dalle_ds.data.encode_grids import load_encoded
from dalle_ds.dvae.io import load_dvae
from dalle_ds.prior.io import save_prior
from dalle_ds.prior.model import Prior
from dalle_ds.prior.samples import SampleGrid, fixed_captions
from dalle_ds.tokenizer import CaptionTokenizer
from dalle_ds.training import activation_checkpointing
from dalle_ds.training import checkpoint as ckpt
from dalle_ds.training.compression import make_compressor
from dalle_ds.training.distributed import barrier, device, init_distributed, is_main, world_size
from dalle_ds.training.ema import EMA
from dalle_ds.training.engine import build_engine, load_ds_config
from dalle_ds.training.eval_guard import finite_eval
from dalle_ds.training.grad_scaling import ScalingPolicy, scaler_for
from dalle_ds.training.loop import LoopConfig, fit
from dalle_ds.training.node_exchange import NodeExchange
from dalle_ds.training.node_groups import NodeMPU, node_groups, resolve_ranks_per_node
from dalle_ds.training.precision import configure_matmul


def lr_factor(step: int, t: PriorTrainConfig) -> float:
    """Linear warm-up (PAPER §3.6), then cosine decay to lr_end_ratio: a smooth stand-in for the paper's
    manual halving on plateaus, which needs a human watching the loss."""
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    frac = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    return t.lr_end_ratio + (1.0 - t.lr_end_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))


def block_scaler(engine, t: PriorTrainConfig):
    """The per-resblock gradient scaler prior_train asks for (a step-pipeline stage), or None when
    grad_scaling is off."""
    if t.grad_scaling == "off":
        return None
    policy = ScalingPolicy(
        mode=t.grad_scaling,
        on_nonfinite=t.grad_scaling_policy,
        init_log2=t.grad_scale_init_log2,
        min_log2=t.grad_scale_min_log2,
        max_log2=t.grad_scale_max_log2,
        growth_interval=t.grad_scale_growth_interval,
        world=world_size(),
    )
    return scaler_for(engine, engine.module, policy)


def node_groups_for(t: PriorTrainConfig):
    """Node groups when gradients between nodes are compressed and there is more than one node, else None
    (plain ZeRO-3 over every rank)."""
    if t.compression == "none":
        return None
    groups = node_groups(resolve_ranks_per_node(t.ranks_per_node, world_size()))
    if groups.num_nodes == 1:
        if is_main():
            print(
                f"prior_train.compression={t.compression}: one node ({world_size()} ranks), nothing crosses a "
                "node boundary; training without compression"
            )
        return None
    return groups


def get_tokenizer(
    cfg: ExperimentConfig, out_dir: Path, captions: list[str], path: str | Path | None
) -> CaptionTokenizer:
    """Load the given tokenizer, or the run's own, or train one on the training captions (rank 0)."""
    own = out_dir / "tokenizer.json"
    if path is not None:
        return CaptionTokenizer.load(path, cfg.tokenizer)
    if is_main() and not own.exists():
        own.parent.mkdir(parents=True, exist_ok=True)
        CaptionTokenizer.train(captions, cfg.tokenizer).save(own)
    barrier()
    return CaptionTokenizer.load(own, cfg.tokenizer)


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module, tok: CaptionTokenizer, captions: list[str], tokens: torch.Tensor, *, batch: int = 64
) -> dict:
    """Mean text and image cross-entropy over the validation split (no BPE dropout)."""
    model.eval()
    sums, n = {"loss_text": 0.0, "loss_image": 0.0}, 0
    for s in range(0, len(captions), batch):
        text = tok.encode_batch(captions[s : s + batch], train=False).to(device())
        _, stats = model(text, tokens[s : s + batch].to(device()))
        k = text.shape[0]
        for key in sums:
            sums[key] += float(stats[key]) * k
        n += k
    return {key: v / max(n, 1) for key, v in sums.items()}


def train_prior(
    cfg: ExperimentConfig,
    *,
    ds_config,
    data_dir: str | Path,
    out_dir: str | Path,
    tokenizer_path: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    stop_at: int | None = None,
    dvae_path: str | Path | None = None,
) -> dict:
    """Train, then export `out_dir/prior.pt` (config + weights + tokenizer). Returns a summary.

    With `dvae_path` (the dVAE the tokens were encoded with) every prior_train.eval_every steps and at the end
    also writes OUT/samples_stepN.png: one sample for each of the first SAMPLE_CAPTIONS distinct val captions."""
    init_distributed()
    out_dir = Path(out_dir)
    tcfg = cfg.prior_train
    torch.manual_seed(tcfg.seed)
    ds_cfg = load_ds_config(ds_config)
    if configure_matmul(ds_cfg, tcfg.allow_tf32) == "high" and is_main():
        print("fp32 on an sm80+ GPU: matmuls in TF32 (prior_train.allow_tf32=false for IEEE fp32)")
    captions, tokens = load_encoded(data_dir, "train")
    val_captions, val_tokens = load_encoded(data_dir, "val")
    if tokens.shape[1] != cfg.prior.image_len or int(tokens.max()) >= cfg.prior.image_vocab_size:
        raise ValueError(
            f"{data_dir}: token grids have {tokens.shape[1]} tokens with max id {int(tokens.max())}, "
            f"but prior.image_grid={cfg.prior.image_grid} and prior.image_vocab_size="
            f"{cfg.prior.image_vocab_size}; encode with the matching dVAE"
        )
    tok = get_tokenizer(cfg, out_dir, captions, tokenizer_path)
    if is_main():  # with tokenizer.json, what `dalle-ds export` needs next to the checkpoints
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        if tokenizer_path is not None:
            (out_dir / "tokenizer.json").write_text(tok.to_json())
    model = Prior(cfg.prior)
    activation_checkpointing.apply(model, tcfg.activation_checkpoint_every)
    groups = node_groups_for(tcfg)
    engine = build_engine(
        model,
        ds_cfg,
        lr=tcfg.lr,
        betas=tcfg.betas,
        eps=tcfg.eps,
        weight_decay=tcfg.weight_decay,
        lr_lambda=lambda step: lr_factor(step, tcfg),
        mpu=NodeMPU(groups) if groups is not None else None,
    )
    extra_state, stages = {}, []
    if groups is not None:
        engine.node_groups = groups
        exchange = NodeExchange(
            engine,
            groups,
            make_compressor(tcfg.compression, rank=tcfg.powersgd_rank, fixed_q=tcfg.powersgd_fixed_q, seed=tcfg.seed),
        )
        extra_state["node_exchange"] = exchange
        stages.append(exchange)
    scaler = block_scaler(engine, tcfg)
    if scaler is not None:
        stages.append(scaler)
    ema = EMA(engine.module, tcfg.ema_decay) if tcfg.ema_decay > 0 else None

    def loss_fn(eng, idx, step):
        text = tok.encode_batch([captions[i] for i in idx], train=True).to(device())  # BPE dropout here only
        image = tokens[idx].to(device())
        loss, stats = eng(text, image)
        return loss, stats, text.numel() + image.numel()

    samples = None
    if dvae_path is not None:  # loaded on every rank: a wrong file fails them all, before any collective
        samples = SampleGrid(cfg, tok, load_dvae(dvae_path, cfg)[0], fixed_captions(val_captions))
    elif is_main():
        print(
            "train-prior: no --dvae given, so no sample grids while training (give the dVAE the tokens were "
            "encoded with to get OUT/samples_stepN.png every prior_train.eval_every steps)",
            flush=True,
        )

    def eval_fn(module):
        out = validation_loss(module, tok, val_captions, val_tokens)
        if samples is not None:
            grid = samples(module)
            if grid is not None:  # rank 0; the logger writes it to OUT/samples_stepN.png and TensorBoard
                out["samples"] = grid
        return out

    eval_fn = finite_eval(eval_fn, lambda: engine.global_steps, "prior")  # a NaN validation loss stops the run

    loop = LoopConfig(
        steps=tcfg.steps,
        log_every=tcfg.log_every,
        save_every=tcfg.save_every,
        eval_every=tcfg.eval_every,
        seed=tcfg.seed,
        desc="prior",
        progress=progress,
        stop_at=stop_at,
        keep_last=cfg.checkpoint.keep_last,
    )
    result = fit(
        engine,
        loss_fn=loss_fn,
        num_items=len(captions),
        ds_cfg=ds_cfg,
        out_dir=out_dir,
        loop=loop,
        eval_fn=eval_fn,
        resume=resume,
        grad_scaler=scaler,
        ema=ema,
        ema_every=tcfg.ema_every,
        extra_state=extra_state,
        stages=stages,
    )
    if result.interrupted:  # SIGTERM: the checkpoint is saved; exit without the export
        return {
            "step": result.step,
            "seconds": result.seconds,
            "history": result.history,
            "interrupted": True,
            "val_loss_text": None,
            "val_loss_image": None,
            "path": None,
        }
    state = ckpt.gathered_state_dict(engine.module)
    ema_state = None
    if ema is not None:  # the averaged weights, gathered from their ZeRO-3 shards
        with ema.swapped_in():
            ema_state = ckpt.gathered_state_dict(engine.module)
    if is_main():
        save_prior(out_dir / "prior.pt", state, cfg, tok, step=result.step, ema_state_dict=ema_state)
    return {
        "step": result.step,
        "seconds": result.seconds,
        "history": result.history,
        "val_loss_text": result.last_eval.get("loss_text"),
        "val_loss_image": result.last_eval.get("loss_image"),
        "path": str(out_dir / "prior.pt"),
    }
