"""Process-group set-up for the DeepSpeed entry points (single process, `deepspeed` launcher, CPU or GPU)."""

from __future__ import annotations

import os
import socket
import sys

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Initialise torch.distributed through DeepSpeed, once.

    Launched by `deepspeed`/`torchrun` the rank variables are already set. Run as plain `python`, we
    set them for a world of one so the same DeepSpeed engine code path is exercised on a laptop.
    """
    import deepspeed  # noqa: PLC0415 - keep import cost out of model-only users
    import deepspeed.ops  # noqa: PLC0415

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    # The shared-memory comm op only speeds up inference all-reduce on CPU, and JIT-compiling it costs
    # 30-45 s per fresh machine; gloo's own collectives are what training uses.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)


def shutdown_distributed() -> None:
    """Wait for every rank, then tear the process group down. Exiting with a live gloo group let its threads
    be destroyed while still joinable, which ends a finished rank with "terminate called without an active
    exception" (exit -6) now and then."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def end_process_distributed() -> None:
    """For scripts whose work is done and written: leave the process group, flush, and end the process without
    the interpreter's teardown, where a gloo thread still joinable aborted a finished rank now and then even
    after destroy_process_group (CI, two-rank ZeRO-3 runs under load)."""
    shutdown_distributed()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average scalar metrics over ranks so rank 0 logs the global value."""
    if not torch.distributed.is_initialized() or world_size() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device())
    torch.distributed.all_reduce(t)
    t /= world_size()
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not torch.distributed.is_initialized() or world_size() == 1:
        return [obj]
    out = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out
