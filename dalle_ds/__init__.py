"""dalle_ds: a DeepSpeed training stack for DALL·E-style text-to-image models."""

__version__ = "0.1.0"
