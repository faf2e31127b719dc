"""Which precision runs where (training/precision.py): pure functions of (has_cuda, capability), tied to the
files in ds_configs/ they name, and the checks `load_ds_config` applies."""

import json

import pytest
import torch
from helpers import REPO

from dalle_ds.errors import ConfigError
from dalle_ds.training.precision import (
    check_precision,
    configure_matmul,
    default_ds_config,
    matmul_precision,
    precision_of,
)

DEVICES = {  # name -> (has_cuda, capability, precision the default config must train in)
    "cpu": (False, None, "fp32"),
    "V100 sm70": (True, (7, 0), "fp16"),
    "T4 sm75": (True, (7, 5), "fp16"),
    "A100 sm80": (True, (8, 0), "bf16"),
    "H100 sm90": (True, (9, 0), "bf16"),
}


def _ds(name):
    return json.loads((REPO / "ds_configs" / name).read_text())


@pytest.mark.parametrize("device", DEVICES)
def test_default_ds_config_by_device(device):
    """CPU: fp32; sm80+: bf16; older GPUs: fp16. The named file ships and passes the device's own check."""
    has_cuda, cap, want = DEVICES[device]
    name = default_ds_config(has_cuda, cap)
    cfg = _ds(name)
    assert precision_of(cfg) == want
    check_precision(cfg, name, has_cuda, cap)


def test_precision_checks_name_the_fix():
    """fp16 needs a GPU; bf16 needs sm80+ (a V100 has no bf16 units), and the error names the fp16 configs."""
    bf16, fp16 = _ds("gpu_zero3_bf16_12b.json"), _ds("gpu_zero3_fp16_12b_v100.json")
    with pytest.raises(ConfigError, match="fp16.enabled needs a GPU"):
        check_precision(fp16, "x.json", False, None)
    with pytest.raises(ConfigError, match=r"bf16 on sm70.*gpu_default_fp16\.json"):
        check_precision(bf16, "x.json", True, (7, 0))
    check_precision(bf16, "x.json", True, (8, 0))
    check_precision(bf16, "x.json", False, None)  # DeepSpeed runs bf16 on CPU
    check_precision(fp16, "x.json", True, (7, 0))


def test_every_v100_config_is_fp16_and_every_bf16_config_refuses_a_v100():
    """The V100 path stays fp16 and is accepted on sm70; no bf16 file can be paired with a V100."""
    names = sorted(p.name for p in (REPO / "ds_configs").glob("*.json"))
    v100 = [n for n in names if "v100" in n]
    assert v100 and all(precision_of(_ds(n)) == "fp16" for n in v100)
    for n in v100:
        check_precision(_ds(n), n, True, (7, 0))
    bf16 = [n for n in names if precision_of(_ds(n)) == "bf16"]
    assert "gpu_zero3_bf16_12b.json" in bf16 and "gpu_default_bf16.json" in bf16
    for n in bf16:
        with pytest.raises(ConfigError, match="no bf16 units"):
            check_precision(_ds(n), n, True, (7, 0))


@pytest.mark.parametrize(
    "has_cuda,cap,prec,allow,want",
    [
        (True, (8, 0), "fp32", True, "high"),  # TF32 on Ampere+
        (True, (9, 0), "fp32", False, "highest"),  # switched off: IEEE fp32
        (True, (8, 0), "bf16", True, None),  # 16-bit runs: leave torch's default
        (True, (7, 0), "fp32", True, None),  # V100 has no TF32
        (False, None, "fp32", True, None),  # CPU
    ],
)
def test_matmul_precision(has_cuda, cap, prec, allow, want):
    assert matmul_precision(has_cuda, cap, prec, allow) == want


def test_configure_matmul_leaves_cpu_alone():
    """On this CPU machine nothing is set, whatever the switch says."""
    before = torch.get_float32_matmul_precision()
    assert configure_matmul(_ds("cpu_zero0_fp32.json"), True) is None
    assert torch.get_float32_matmul_precision() == before


def test_train_commands_default_to_the_device_config():
    """`train-prior` and `train-dvae` without --ds-config: the file default_ds_config picks for this machine."""
    import argparse

    from dalle_ds.cli.common import add_config_args
    from dalle_ds.training.precision import device_capability

    p = argparse.ArgumentParser()
    add_config_args(p, ds_default="device")
    got = p.parse_args([]).ds_config
    assert got.endswith(default_ds_config(*device_capability()))
    if not torch.cuda.is_available():
        assert got.endswith("cpu_zero0_fp32.json")


def test_triton_dots_follow_torch_fp32_matmul_precision(monkeypatch):
    """The Triton kernels' tl.dot precision: fp32 inputs take TF32 exactly where torch's fp32 matmuls may
    (what configure_matmul sets for allow_tf32 on sm80+), IEEE under "highest" and in the interpreter;
    16-bit inputs always take the tensor-core path."""
    from dalle_ds.kernels.block_sparse_attention import dot_precision

    before = torch.get_float32_matmul_precision()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    try:
        got = {}
        for setting in ("highest", "high", "medium"):
            torch.set_float32_matmul_precision(setting)
            got[setting] = [dot_precision(dt) for dt in (torch.float32, torch.bfloat16, torch.float16)]
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        interp = dot_precision(torch.float32)
    finally:
        torch.set_float32_matmul_precision(before)
    assert got == {
        "highest": ["ieee", "tf32", "tf32"],
        "high": ["tf32", "tf32", "tf32"],
        "medium": ["tf32", "tf32", "tf32"],
    }
    assert interp == "ieee"
