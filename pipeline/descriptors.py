"""One descriptor vector per tile, computed over whole batches of tiles at once.

``stats`` (default, fast, no model): colour statistics in RGB and in the haematoxylin-eosin-DAB stain space
(colour deconvolution with scikit-image's Ruifrok & Johnston matrix), grey-level percentiles and entropy, and
gradient/Laplacian texture statistics. 25 numbers per tile, all float32.

``cnn``: global-average-pooled features of a Keras ImageNet backbone, batched (on GPU when there is one). The model is
built once per worker process.
"""

from __future__ import annotations

import functools

import numpy as np
from skimage.color import hed_from_rgb

from .config import DescriptorConfig

STATS_FEATURE_NAMES: tuple[str, ...] = (
    "rgb_mean_r", "rgb_mean_g", "rgb_mean_b", "rgb_std_r", "rgb_std_g", "rgb_std_b",
    "hed_mean_h", "hed_mean_e", "hed_mean_d", "hed_std_h", "hed_std_e", "hed_std_d",
    "hed_p90_h", "nuclear_fraction",
    "sat_mean", "sat_std",
    "gray_p10", "gray_p50", "gray_p90", "gray_entropy",
    "grad_mean", "grad_std", "grad_p90", "laplacian_abs_mean", "od_sum_mean",
)

# A pixel counts as nuclear (haematoxylin-rich) above this H optical density (scikit-image's HED scale).
NUCLEAR_H_THRESHOLD = 0.05
ENTROPY_BINS = 16


def hed_stains(rgb: np.ndarray) -> np.ndarray:
    """Colour deconvolution into H, E, DAB (same formula as ``skimage.color.rgb2hed``, in float32 for memory)."""
    x = np.maximum(rgb.astype(np.float32) / 255.0, 1e-6)
    log_adjust = np.float32(np.log(1e-6))
    stains = (np.log(x) / log_adjust) @ hed_from_rgb.astype(np.float32)
    return np.maximum(stains, 0.0)


def _per_tile(values: np.ndarray) -> np.ndarray:
    """Flatten every axis but the first: (n, ...) -> (n, m)."""
    return values.reshape(values.shape[0], -1)


def stats_descriptors(tiles: np.ndarray) -> np.ndarray:
    """(n, h, w, 3) uint8 RGB tiles -> (n, 25) float32, columns named by ``STATS_FEATURE_NAMES``."""
    tiles = np.asarray(tiles)
    if tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise ValueError(f"expected (n, h, w, 3) RGB tiles, got shape {tiles.shape}")
    n = tiles.shape[0]
    rgb = tiles.astype(np.float32)
    flat_rgb = rgb.reshape(n, -1, 3)
    rgb_mean = flat_rgb.mean(axis=1)
    rgb_std = flat_rgb.std(axis=1)

    hed = hed_stains(tiles).reshape(n, -1, 3)
    hed_mean = hed.mean(axis=1)
    hed_std = hed.std(axis=1)
    h_channel = hed[..., 0]
    hed_p90_h = np.quantile(h_channel, 0.9, axis=1)
    nuclear_fraction = (h_channel > NUCLEAR_H_THRESHOLD).mean(axis=1)

    cmax = rgb.max(axis=-1)
    cmin = rgb.min(axis=-1)
    saturation = _per_tile(np.where(cmax > 0, (cmax - cmin) / np.maximum(cmax, 1e-6), 0.0))
    sat_mean, sat_std = saturation.mean(axis=1), saturation.std(axis=1)

    # ITU-R 601 luma, as PIL's "L" conversion
    gray = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    gray_flat = _per_tile(gray)
    gray_p = np.quantile(gray_flat, [0.1, 0.5, 0.9], axis=1)  # (3, n)
    bins = np.clip((gray_flat * (ENTROPY_BINS / 256.0)).astype(np.int64), 0, ENTROPY_BINS - 1)
    counts = np.bincount((bins + np.arange(n)[:, None] * ENTROPY_BINS).ravel(), minlength=n * ENTROPY_BINS)
    prob = counts.reshape(n, ENTROPY_BINS) / gray_flat.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        gray_entropy = -np.sum(np.where(prob > 0, prob * np.log2(prob), 0.0), axis=1)

    gx = gray[:, :-1, 1:] - gray[:, :-1, :-1]
    gy = gray[:, 1:, :-1] - gray[:, :-1, :-1]
    grad = _per_tile(np.sqrt(gx * gx + gy * gy))
    lap = (gray[:, 1:-1, :-2] + gray[:, 1:-1, 2:] + gray[:, :-2, 1:-1] + gray[:, 2:, 1:-1]
           - 4.0 * gray[:, 1:-1, 1:-1])
    lap_abs_mean = _per_tile(np.abs(lap)).mean(axis=1)

    od_sum = -np.log10(np.maximum(flat_rgb, 1.0) / 255.0).sum(axis=-1).mean(axis=1)

    columns = [
        rgb_mean, rgb_std, hed_mean, hed_std,
        hed_p90_h[:, None], nuclear_fraction[:, None],
        sat_mean[:, None], sat_std[:, None],
        gray_p.T, gray_entropy[:, None],
        grad.mean(axis=1)[:, None], grad.std(axis=1)[:, None], np.quantile(grad, 0.9, axis=1)[:, None],
        lap_abs_mean[:, None], od_sum[:, None],
    ]
    return np.concatenate(columns, axis=1).astype(np.float32)


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
