"""Attention: one interface, several backends (DESIGN: `attention`).

    attend(q, k, v, spec, backend="dense")   full-sequence attention under the mask `spec`
    attend_cached(q, k, v, mask_rows)         KV-cache decoding: new query rows against the cache

Every backend computes the same function: softmax(q k^T / sqrt(D) + mask) v, where the mask is the one
defined in `masks.py` (True = may attend). Weights never depend on the backend, so a model trained with
one samples with another.

The registry below names every backend once: `dense` (dense.py, SDPA with the boolean mask, the
reference), `sparse` (sparse.py, PyTorch over the non-empty tiles only) and `triton` (the top-level
`kernels/` package, installed as `dalle_ds.kernels`). A backend that cannot run here (Triton without a
GPU or its interpreter) stays registered and says why when it is asked for.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dalle_ds.attention.dense import attend_cached, dense_attention, mask_on
from dalle_ds.attention.masks import MaskSpec
from dalle_ds.attention.sparse import sparse_attention

try:  # a bare checkout on sys.path has no `dalle_ds.kernels` (setup.py maps kernels/ there on install)
    from dalle_ds.kernels import block_sparse_attention as triton_kernels
except ImportError as e:
    triton_kernels, _KERNELS_IMPORT_ERROR = None, f"{e} (install the package: pip install .)"

__all__ = ["BACKENDS", "attend", "attend_cached", "backend_names", "get_backend", "mask_on", "register_backend"]

# fn(q, k, v, spec) -> out; q, k, v, out: (B, H, L, D) over the whole sequence, L == spec.seq_len
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, MaskSpec], torch.Tensor]


BACKENDS: dict[str, AttentionFn] = {}
# name -> () -> None where the backend can run here, else the reason it cannot
_UNAVAILABLE: dict[str, Callable[[], str | None]] = {}


def register_backend(name: str, fn: AttentionFn, unavailable: Callable[[], str | None] = lambda: None) -> None:
    BACKENDS[name] = fn
    _UNAVAILABLE[name] = unavailable


def _triton_unavailable() -> str | None:
    if triton_kernels is None:
        return f"dalle_ds.kernels cannot be imported: {_KERNELS_IMPORT_ERROR}"
    return triton_kernels.unavailable_reason()


def _triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MaskSpec) -> torch.Tensor:
    return triton_kernels.triton_attention(q, k, v, spec)


register_backend("dense", dense_attention)
register_backend("sparse", sparse_attention)
register_backend("triton", _triton, _triton_unavailable)


def backend_names() -> tuple[str, ...]:
    """Every name `prior.attention_backend` accepts."""
    return ("auto", *BACKENDS)


def choose_auto(has_cuda: bool, capability: tuple[int, int] | None, triton_unavailable: str | None) -> str:
    """What `auto` means: the Triton kernels on a GPU they support (compute capability 8.0+, Triton 3.x's
    floor), else the PyTorch `sparse` path (CPU, V100). On such a GPU a Triton that cannot run is an error,
    not a quiet fallback to a path several times slower: install it, or ask for `sparse` by name."""
    if not has_cuda or capability is None or tuple(capability) < (8, 0):
        return "sparse"
    if triton_unavailable is not None:
        raise ValueError(
            f"attention backend auto on an sm{capability[0]}{capability[1]} GPU needs triton, which cannot run "
            f"here: {triton_unavailable}. Install the package with its kernels (pip install -e .), or set "
            "prior.attention_backend=sparse to run without them"
        )
    return "triton"


def auto_backend() -> str:
    """`choose_auto` for this machine's GPU (see there)."""
    if not torch.cuda.is_available():
        return "sparse"
    return choose_auto(True, tuple(torch.cuda.get_device_capability()), _triton_unavailable())


def get_backend(name: str) -> AttentionFn:
    """The backend function for `name`; a ValueError naming the choices, or why this one cannot run here."""
    if name == "auto":
        name = auto_backend()
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available backends: {', '.join(backend_names())}")
    why = _UNAVAILABLE[name]()
    if why is not None:
        raise ValueError(f"attention backend {name!r} cannot run here: {why}")
    return BACKENDS[name]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MaskSpec, backend: str = "dense") -> torch.Tensor:
    """Masked attention over the whole sequence. q, k, v: (B, H, L, D) with L == spec.seq_len."""
    fn = get_backend(backend)
    if q.shape[-2] != spec.seq_len or k.shape[-2] != spec.seq_len:
        raise ValueError(
            f"attend covers the whole sequence: expected length {spec.seq_len} "
            f"(text {spec.text_len} + image {spec.grid}x{spec.grid}), got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}"
        )
    return fn(q, k, v, spec)  # (B, H, L, D)
