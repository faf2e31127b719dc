"""`dalle-ds export` (safetensors + config + tokenizer, no DeepSpeed needed to load and sample), and a
two-rank ZeRO-3 CPU run with per-resblock scaling, activation checkpointing and EMA switched on."""

import json
import subprocess
import sys

import torch
from helpers import child_env, launch_deepspeed, make_encoded_dataset, write_ds_config

from dalle_ds.config import apply_overrides
from dalle_ds.prior.io import load_prior, read_export
from dalle_ds.prior.train import train_prior
from dalle_ds.training.export import export_run

NO_DEEPSPEED = """
import sys
sys.modules["deepspeed"] = None  # any import of deepspeed now fails
import torch
from dalle_ds.prior.io import load_prior
from dalle_ds.sampling.decode import sample_image_tokens
model, tok, cfg = load_prior(sys.argv[1])
text = tok.encode_batch(["a small red circle"])
torch.manual_seed(0)
out = sample_image_tokens(model, text)
assert out.shape == (1, cfg.prior.image_len), out.shape
print("sampled", out.tolist())
"""


def test_export_loads_and_samples_without_deepspeed(tmp_path, tiny_cfg):
    """The export of the latest checkpoint equals the trained weights bit for bit, and a process in which
    `import deepspeed` fails loads it and samples; the CLI subcommand writes the same files."""
    data = make_encoded_dataset(tmp_path / "data", tiny_cfg)
    cfg = apply_overrides(tiny_cfg, ["prior_train.steps=3", "prior_train.eval_every=0"])
    s = train_prior(
        cfg,
        ds_config=write_ds_config(tmp_path / "ds.json", micro=4, stage=0),
        data_dir=data,
        out_dir=tmp_path / "run",
        progress=False,
    )
    out = export_run(tmp_path / "run", tmp_path / "export")
    state, config, _ = read_export(out)
    trained = torch.load(s["path"], weights_only=False)["state_dict"]
    assert set(state) == set(trained) and all(torch.equal(state[k], trained[k]) for k in state)
    model, _, saved = load_prior(out)
    assert saved == cfg
    proc = subprocess.run(
        [sys.executable, "-c", NO_DEEPSPEED, str(out)], env=child_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "sampled" in proc.stdout, proc.stderr[-3000:]
    cli = subprocess.run(
        [sys.executable, "-m", "dalle_ds.cli.export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "cli")],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert (tmp_path / "cli" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_two_rank_zero3_with_scaling_checkpointing_and_ema(tmp_path, tiny_cfg):
    """`deepspeed --num_gpus 2`, ZeRO-3, pow2 per-resblock scaling, activation checkpointing of every 2nd
    layer, EMA: the loss curve equals the plain single-process run (scaling and recomputation are exact),
    the ZeRO-3 checkpoint consolidates to the trained weights, and the EMA export loads and differs."""
    data = make_encoded_dataset(tmp_path / "data", tiny_cfg)
    steps = 5
    single = train_prior(
        apply_overrides(tiny_cfg, [f"prior_train.steps={steps}"]),
        ds_config=write_ds_config(tmp_path / "one.json", micro=8, stage=0),
        data_dir=data,
        out_dir=tmp_path / "single",
        progress=False,
    )
    launch_deepspeed(
        2,
        29733,
        "run_tiny_prior.py",
        data,
        tmp_path / "two",
        write_ds_config(tmp_path / "z3.json", micro=4, stage=3),
        steps,
        "prior_train.grad_scaling=pow2",
        "prior_train.grad_scale_init_log2=5",
        "prior_train.grad_scale_min_log2=0",
        "prior_train.grad_scale_growth_interval=2",
        "prior_train.activation_checkpoint_every=2",
        "prior_train.ema_decay=0.5",
        "prior_train.ema_every=2",
    )
    two = json.loads((tmp_path / "two" / "losses.json").read_text())
    ref = [h["loss"] for h in single["history"]]
    assert torch.allclose(torch.tensor(two), torch.tensor(ref), rtol=1e-4, atol=1e-5), (two, ref)
    metrics = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in metrics if "loss" in m]
    assert metrics[-1]["gscale/log2_mean"] == 8.0  # M·2^5 = 2^6 (M = 2 ranks), doubled after steps 2 and 4
    payload = torch.load(tmp_path / "two" / "prior.pt", weights_only=False)
    out = export_run(tmp_path / "two", tmp_path / "export")
    state, _, _ = read_export(out)
    assert all(torch.equal(state[k], payload["state_dict"][k]) for k in state)
    ema_out = export_run(tmp_path / "two", tmp_path / "export_ema", ema=True)
    ema_state, _, _ = read_export(ema_out)
    assert not torch.equal(ema_state["head.weight"], state["head.weight"])
    model, tok, cfg = load_prior(ema_out)
    text = tok.encode_batch(["a small red circle"])
    assert model.logits(text, torch.zeros(1, cfg.prior.image_len, dtype=torch.long))[1].isfinite().all()
