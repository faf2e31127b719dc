"""Stage 1: the discrete VAE (PAPER §1)."""

from dalle_ds.dvae.loss import map_pixels, unmap_pixels
from dalle_ds.dvae.model import DVAE

__all__ = ["DVAE", "map_pixels", "unmap_pixels"]
