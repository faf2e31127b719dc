"""Custom Triton kernels for dalle_ds, each with a plain-PyTorch reference beside it.

Installed as `dalle_ds.kernels` (setup.py maps this folder) so it cannot collide with the unrelated
PyPI package named `kernels`. The block-sparse attention kernels are checked against `reference.py`.
"""

from .reference import reference_attention

__all__ = ["reference_attention"]
