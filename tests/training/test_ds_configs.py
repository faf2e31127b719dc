"""Every file in ds_configs/ goes through DeepSpeed's own config parser (unknown keys are errors there) and
says what its name says; the CPU offload config trains under a real ZeRO-3 engine."""

import json

import pytest
from helpers import REPO

CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))
EXPECT = {  # file -> (ZeRO stage, precision, optimizer offload, ZeRO++ hpZ partition, qwZ, qgZ)
    "cpu_zero0_fp32.json": (0, "fp32", None, 1, False, False),
    "cpu_zero3_fp32.json": (3, "fp32", None, 1, False, False),
    "cpu_zero3_offload_fp32.json": (3, "fp32", "cpu", 1, False, False),
    "demo_dvae.json": (0, None, None, 1, False, False),  # precision is the demo's choice
    "demo_prior.json": (0, None, None, 1, False, False),
    "gpu_default_bf16.json": (2, "bf16", None, 1, False, False),
    "gpu_default_fp16.json": (2, "fp16", None, 1, False, False),
    "gpu_zero2_bf16.json": (2, "bf16", None, 1, False, False),
    "gpu_zero3_bf16.json": (3, "bf16", None, 1, False, False),
    "gpu_zero3_bf16_12b.json": (3, "bf16", None, 1, False, False),
    "gpu_zero3_bf16_12b_offload.json": (3, "bf16", "cpu", 1, False, False),
    "gpu_zero3_fp16_12b_v100.json": (3, "fp16", None, 1, False, False),
    "gpu_zero3_fp16_12b_v100_offload.json": (3, "fp16", "cpu", 1, False, False),
    "gpu_zero3_offload_bf16.json": (3, "bf16", "cpu", 1, False, False),
    "gpu_zeropp_bf16.json": (3, "bf16", None, 8, True, True),
}


def test_every_config_is_listed():
    assert {p.name for p in CONFIGS} == set(EXPECT)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_with_deepspeed(path):
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = json.loads(path.read_text())
    assert "train_batch_size" not in raw  # derived from micro-batch x accumulation x world size
    cfg = DeepSpeedConfig(raw)
    stage, precision, offload, hpz, qwz, qgz = EXPECT[path.name]
    z = cfg.zero_config
    assert cfg.zero_optimization_stage == stage
    got = "fp16" if cfg.float16_config.enabled else "bf16" if cfg.bfloat16_config.enabled else "fp32"
    assert precision is None or got == precision
    device = z.offload_optimizer.device if z.offload_optimizer else None
    assert getattr(device, "value", device) == offload
    assert (z.zero_hpz_partition_size, z.zero_quantized_weights, z.zero_quantized_gradients) == (hpz, qwz, qgz)
    if not path.name.startswith("demo_dvae"):
        assert cfg.gradient_clipping == 4.0  # PAPER §3.6 (the prior)


def test_parser_rejects_unknown_keys():
    from deepspeed.runtime.config import DeepSpeedConfig

    with pytest.raises(Exception, match="stage3_typo"):
        DeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "stage3_typo": 1}})


def test_cpu_offload_config_trains(tmp_path, tiny_cfg):
    """ZeRO-3 with the optimizer offloaded to CPU (the client AdamW, zero_force_ds_cpu_optimizer=false)."""
    from helpers import make_encoded_dataset

    from dalle_ds.config import apply_overrides
    from dalle_ds.prior.train import train_prior

    data = make_encoded_dataset(tmp_path / "data", tiny_cfg)
    s = train_prior(
        apply_overrides(tiny_cfg, ["prior_train.steps=3", "prior_train.eval_every=0"]),
        ds_config=REPO / "ds_configs" / "cpu_zero3_offload_fp32.json",
        data_dir=data,
        out_dir=tmp_path / "run",
        progress=False,
    )
    losses = [h["loss"] for h in s["history"]]
    assert len(losses) == 3 and all(x == x for x in losses)
