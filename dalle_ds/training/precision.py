"""Which precision runs where: the default DeepSpeed config per device, the precision checks, and TF32.

The supported matrix (README "Supported hardware"):

    device                 compute dtype   attention `auto`   default --ds-config
    CPU                    fp32 (bf16 ok)  sparse             cpu_zero0_fp32.json   (debug, tests, the demo)
    A100 / H100 (sm80+)    bf16            triton             gpu_default_bf16.json
    V100 (sm70)            fp16            sparse             gpu_default_fp16.json (no bf16 units; Triton 3.x
                                                                                    has no sm70 tensor-core path)

Each rule is a pure function of (has_cuda, capability) so it is tested without a GPU; `device_capability()`
reads them from the machine. fp32 on a GPU runs its matmuls in TF32 when `allow_tf32` (the training
configs' switch, default on): `torch.set_float32_matmul_precision("high")`, which Ampere and later execute on
tensor cores at about 8x fp32's rate with a 10-bit mantissa; the Triton kernels follow the same setting
(`kernels/block_sparse_attention.dot_precision`).
"""

from __future__ import annotations

import os

import torch

from dalle_ds.errors import ConfigError

Capability = tuple[int, int] | None  # (major, minor) of the CUDA device, None without one

BF16_MIN_CAPABILITY = (8, 0)  # Ampere: bf16 tensor cores (V100 has none)
TF32_MIN_CAPABILITY = (8, 0)  # TF32 tensor cores start with Ampere
FP16_MIN_CAPABILITY = (7, 0)  # Volta: fp16 tensor cores


def local_gpu_index() -> int:
    """This rank's GPU: LOCAL_RANK's, as the launcher assigns devices (GPU 0 when the rank sees only one)."""
    index = int(os.environ.get("LOCAL_RANK") or 0)
    if index >= torch.cuda.device_count():  # one visible GPU per rank (e.g. a scheduler's CUDA_VISIBLE_DEVICES)
        index = 0
    return index


def device_capability() -> tuple[bool, Capability]:
    """(has_cuda, capability of this rank's GPU, `local_gpu_index`)."""
    if not torch.cuda.is_available():
        return False, None
    return True, tuple(torch.cuda.get_device_capability(local_gpu_index()))


def has_bf16(has_cuda: bool, capability: Capability) -> bool:
    """A GPU with bf16 units (sm80+)."""
    return has_cuda and capability is not None and tuple(capability) >= BF16_MIN_CAPABILITY


def default_ds_config(has_cuda: bool, capability: Capability) -> str:
    """The ds_configs/ file `train-prior` and `train-dvae` use without --ds-config: fp32 on CPU, bf16 on
    sm80+, fp16 on older GPUs (V100)."""
    if not has_cuda:
        return "cpu_zero0_fp32.json"
    return "gpu_default_bf16.json" if has_bf16(has_cuda, capability) else "gpu_default_fp16.json"


def precision_of(ds_cfg: dict) -> str:
    """ "bf16", "fp16" or "fp32": what a DeepSpeed config trains in."""
    if ds_cfg.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds_cfg.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def check_precision(ds_cfg: dict, where: str, has_cuda: bool, capability: Capability) -> None:
    """Refuse a precision the device cannot run, naming the config to use instead."""
    prec = precision_of(ds_cfg)
    if prec == "fp16" and not has_cuda:
        raise ConfigError(
            f"{where}: fp16.enabled needs a GPU (DeepSpeed refuses fp16 on CPU); use a bf16 or fp32 config on CPU"
        )
    if prec == "bf16" and has_cuda and capability is not None and tuple(capability) < BF16_MIN_CAPABILITY:
        major, minor = capability
        raise ConfigError(
            f"{where}: bf16 on sm{major}{minor}: this GPU has no bf16 units (V100 is sm70); use an fp16 config "
            "(ds_configs/gpu_default_fp16.json, gpu_zero3_fp16_12b_v100*.json)"
        )


def matmul_precision(has_cuda: bool, capability: Capability, prec: str, allow_tf32: bool) -> str | None:
    """The `torch.set_float32_matmul_precision` value for a run: "high" (TF32) for fp32 on sm80+ when allowed,
    "highest" when fp32 there is not allowed TF32; None (leave torch's default) on CPU, older GPUs or in
    16-bit, where fp32 matmuls are rare (the fp32 head) and TF32 would not apply or not be wanted."""
    if not has_cuda or prec != "fp32" or capability is None or tuple(capability) < TF32_MIN_CAPABILITY:
        return None
    return "high" if allow_tf32 else "highest"


def configure_matmul(ds_cfg: dict, allow_tf32: bool) -> str | None:
    """Apply `matmul_precision` to this process (called at training start); returns what was set."""
    has_cuda, cap = device_capability()
    setting = matmul_precision(has_cuda, cap, precision_of(ds_cfg), allow_tf32)
    if setting is not None:
        torch.set_float32_matmul_precision(setting)
        torch.backends.cudnn.allow_tf32 = setting == "high"  # the dVAE's convolutions
    return setting
