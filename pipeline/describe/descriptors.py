"""One descriptor vector per tile, computed over whole batches of tiles at once, by the configured encoder.

``stats`` (default, fast, no model): 25 colour, stain and texture statistics (``encoders/stats.py``). Learned
encoders (``keras``, its old name ``cnn``, ``onnx``, ``timm``; ``encoders/``) give their model's pooled features. The
encoder is built once per worker process.
"""

from __future__ import annotations

import numpy as np

from ..core.config import DescriptorConfig
from .encoders import get_encoder
from .encoders.stats import stats_descriptors

__all__ = ["compute_descriptors", "descriptor_names", "stats_descriptors"]


def descriptor_names(config: DescriptorConfig) -> list[str]:
    """Column names of the descriptors (``STATS_FEATURE_NAMES`` for stats, ``<model>_<i>`` for learned encoders)."""
    return get_encoder(config).feature_names()


def compute_descriptors(tiles: np.ndarray, config: DescriptorConfig) -> np.ndarray:
    """(n, h, w, 3) uint8 RGB tiles -> (n, d) float32."""
    return get_encoder(config).encode(tiles)
