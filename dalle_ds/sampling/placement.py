"""Where sampling runs: the device, and the dtype of the prior's weights (`dalle-ds sample --device --dtype`).

    auto device   a CUDA GPU when one is visible (LOCAL_RANK's, else GPU 0), else the CPU
    auto dtype    the training matrix (training/precision.py): bf16 on sm80+, fp16 on older GPUs (V100),
                  fp32 on the CPU

Only the prior's weights (and so its KV cache) take the 16-bit dtype: it does the work (one decode step per
image token) and holds the memory (the 12B prior is 24 GB in bf16, 48 GB in fp32). Its output head and the
sampler's softmax stay fp32 (prior/model.py, sampling/decode.py). The dVAE and the reranker run in fp32 on
the same device: they run once per image, and fp32 keeps the decoder's pixels as trained.
"""

from __future__ import annotations

import torch

from dalle_ds.errors import ConfigError
from dalle_ds.training.precision import Capability, has_bf16, local_gpu_index

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sample_device(name: str = "auto") -> torch.device:
    """ "auto", "cpu", "cuda" or "cuda:N" -> a device that exists here (ConfigError naming --device otherwise)."""
    if name == "auto":
        return torch.device("cuda", local_gpu_index()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device: {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device: {name!r}; sampling runs on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA GPU is visible here (torch.cuda.is_available() is False)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return dev


def sample_dtype(name: str, device_type: str, capability: Capability) -> torch.dtype:
    """The prior's weight dtype for `name` ("auto", "fp32", "bf16", "fp16") on `device_type` ("cpu"/"cuda")
    with the GPU's `capability`; a precision the device lacks is a ConfigError naming the fix."""
    on_gpu = device_type == "cuda"
    sm80 = has_bf16(on_gpu, capability)
    if name == "auto":
        return torch.bfloat16 if sm80 else torch.float16 if on_gpu else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"--dtype: {name!r}; choose auto, {', '.join(DTYPES)}")
    if name == "bf16" and on_gpu and not sm80:
        raise ConfigError(f"--dtype bf16: this GPU (sm{capability[0]}{capability[1]}) has no bf16 units; use fp16")
    if name == "fp16" and not on_gpu:
        raise ConfigError("--dtype fp16 on the CPU: use fp32 or bf16 there (fp16 is for GPUs)")
    return DTYPES[name]


def place_for_sampling(prior: torch.nn.Module, dvae: torch.nn.Module, device: str = "auto", dtype: str = "auto"):
    """Move the prior (in the chosen dtype) and the dVAE (fp32) to the chosen device; returns (device, dtype)."""
    dev = sample_device(device)
    cap = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else None
    dt = sample_dtype(dtype, dev.type, cap)
    prior.to(device=dev, dtype=dt)
    dvae.to(device=dev)
    return dev, dt
