"""One descriptor vector per tile, computed over whole batches of tiles at once.

``stats`` (default, fast, no model): colour statistics in RGB and in the haematoxylin-eosin-DAB stain space
(colour deconvolution with scikit-image's Ruifrok & Johnston matrix), grey-level percentiles and entropy, and
gradient/Laplacian texture statistics. 25 numbers per tile, all float32. Computed by a numba kernel (one pass over
the pixels per tile plus exact bucket-select percentiles, ~2.5x faster than the numpy version, which stays as the
reference the tests compare it with and as the fallback where numba is missing).

``cnn``: global-average-pooled features of a Keras ImageNet backbone, batched (on GPU when there is one). The model is
built once per worker process.
"""

from __future__ import annotations

import functools

import numpy as np

from ..core.config import DescriptorConfig
from .stats import (ENTROPY_BINS, HED_LOG_LUT, HED_MATRIX, LUMA_LUTS, NUCLEAR_H_THRESHOLD, OD_LUT64,
                    STATS_FEATURE_NAMES, stats_descriptors_numpy)
from .stats_kernel import stats_kernel


def stats_descriptors(tiles: np.ndarray) -> np.ndarray:
    """(n, h, w, 3) uint8 RGB tiles -> (n, 25) float32, columns named by ``STATS_FEATURE_NAMES``."""
    tiles = np.asarray(tiles)
    if tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise ValueError(f"expected (n, h, w, 3) RGB tiles, got shape {tiles.shape}")
    if tiles.dtype != np.uint8:
        tiles = np.clip(tiles, 0, 255).astype(np.uint8)
    out = np.empty((tiles.shape[0], len(STATS_FEATURE_NAMES)), dtype=np.float64)
    if stats_kernel is not None and tiles.shape[0]:
        stats_kernel(np.ascontiguousarray(tiles), out, HED_LOG_LUT, HED_MATRIX, OD_LUT64, *LUMA_LUTS,
                     np.float32(NUCLEAR_H_THRESHOLD), ENTROPY_BINS)
    else:
        stats_descriptors_numpy(tiles, out)
    return out.astype(np.float32)


@functools.lru_cache(maxsize=2)
def _cnn_model(backbone: str, weights: str | None, input_px: int):
    # Imported here: Keras (and its backend) is heavy and only the cnn descriptor needs it.
    import keras

    constructor = getattr(keras.applications, backbone)
    return constructor(include_top=False, weights=weights, input_shape=(input_px, input_px, 3), pooling="avg")


_PREPROCESS_MODULES = {
    "InceptionV3": "inception_v3", "MobileNetV2": "mobilenet_v2", "ResNet50": "resnet50",
    "EfficientNetB0": "efficientnet", "DenseNet121": "densenet",
}


def cnn_descriptors(tiles: np.ndarray, config: DescriptorConfig) -> np.ndarray:
    """(n, h, w, 3) uint8 -> (n, d) float32 pooled backbone features."""
    import keras

    model = _cnn_model(config.cnn_backbone, config.cnn_weights, config.cnn_input_px)
    module = getattr(keras.applications, _PREPROCESS_MODULES[config.cnn_backbone])
    x = keras.ops.convert_to_tensor(np.asarray(tiles, dtype=np.float32))
    if tiles.shape[1] != config.cnn_input_px or tiles.shape[2] != config.cnn_input_px:
        x = keras.ops.image.resize(x, (config.cnn_input_px, config.cnn_input_px), antialias=True)
    x = module.preprocess_input(x)
    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)), dtype=np.float32)


def descriptor_names(config: DescriptorConfig) -> list[str]:
    if config.name == "stats":
        return list(STATS_FEATURE_NAMES)
    dims = int(_cnn_model(config.cnn_backbone, config.cnn_weights, config.cnn_input_px).output_shape[-1])
    return [f"{config.cnn_backbone.lower()}_{i}" for i in range(dims)]


def compute_descriptors(tiles: np.ndarray, config: DescriptorConfig) -> np.ndarray:
    if config.name == "stats":
        return stats_descriptors(tiles)
    return cnn_descriptors(tiles, config)
