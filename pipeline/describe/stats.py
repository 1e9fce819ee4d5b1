"""The ``stats`` tile descriptor: its 25 features, the lookup tables they are computed with, and the numpy
reference implementation (the compiled kernel in ``stats_kernel`` must agree with it; it is also the fallback where
numba is missing).

Colour statistics in RGB and in the haematoxylin-eosin-DAB stain space (colour deconvolution with Ruifrok & Johnston's
matrix, as scikit-image's), grey-level percentiles and entropy, and gradient/Laplacian texture statistics; all
float32.
"""

from __future__ import annotations

import numpy as np

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
    stains = (np.log(x) / log_adjust) @ HED_MATRIX
    return np.maximum(stains, 0.0)


# Per-channel-value lookup tables: every per-pixel quantity below that depends on one channel is a gather, with the
# same float32 arithmetic as the direct formula (hed_stains, the ITU-R 601 luma, optical density).
VALUES = np.arange(256, dtype=np.float32)
VALUES64 = VALUES.astype(np.float64)
HED_LOG_LUT = np.log(np.maximum(VALUES / 255.0, 1e-6)) / np.float32(np.log(1e-6))
# Ruifrok & Johnston's stain vectors (rows: H, E, DAB optical densities in R, G, B), as scikit-image's ``rgb_from_hed``;
# inverted here, not imported: ``skimage.color`` imports all of ``scipy.linalg`` (~0.17 s of every describe command).
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_MATRIX = np.linalg.inv(RGB_FROM_HED).astype(np.float32)
OD_LUT64 = (-np.log10(np.maximum(VALUES, 1.0) / 255.0)).astype(np.float64)
LUMA_LUTS = (VALUES * np.float32(0.299), VALUES * np.float32(0.587), VALUES * np.float32(0.114))


def _quantiles(values: np.ndarray, qs: list[float]) -> np.ndarray:
    """``np.quantile(values, qs)`` (method 'linear') of a 1-D array; may reorder ``values`` in place.

    One quantile: one partition plus a min (a partition with several kth is slower than a sort); several: one sort.
    """
    n = values.size
    if n == 0:
        return np.full(len(qs), np.nan)
    pos = np.asarray(qs, dtype=np.float64) * (n - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    if len(qs) == 1:
        k = int(lo[0])
        values.partition(k)
        a = np.array([values[k]], dtype=np.float64)
        b = np.array([values[k + 1:].min() if k + 1 < n else values[k]], dtype=np.float64)
    else:
        ordered = np.sort(values)
        a, b = ordered[lo].astype(np.float64), ordered[hi].astype(np.float64)
    t = pos - lo
    return np.where(t >= 0.5, b - (b - a) * (1 - t), a + (b - a) * t)  # numpy's lerp, symmetric in a and b


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    return (float(values.mean()), float(values.std())) if values.size else (np.nan, np.nan)


def _tile_stats_numpy(tile: np.ndarray, out: np.ndarray) -> None:
    """The 25 statistics of one (h, w, 3) uint8 tile into ``out`` (float64).

    One tile at a time, channel-planar: each array is ~64-256 KB, so passes stay in cache, and every reduction runs
    over a contiguous axis (reductions across the 3-channel axis of a (n, h*w, 3) batch are 10-30x slower).
    """
    h, w, _ = tile.shape
    npx = h * w
    planar = np.ascontiguousarray(tile.reshape(npx, 3).T)            # (3, npx) uint8
    od_sum = 0.0
    for c in range(3):
        # exact sums from the channel histogram (float32 sums over 65k pixels drift by ~1e-4)
        hist = np.bincount(planar[c], minlength=256).astype(np.float64)
        mean = hist @ VALUES64 / npx
        out[c] = mean
        out[3 + c] = np.sqrt(hist @ (VALUES64 - mean) ** 2 / npx)
        od_sum += hist @ OD_LUT64
    logs = HED_LOG_LUT[planar]                                         # (3, npx) float32, as hed_stains
    hed = np.empty_like(logs)
    for i in range(3):  # the 3x3 product by hand: a BLAS call this small costs more in thread hand-offs than work
        np.multiply(logs[0], HED_MATRIX[0, i], out=hed[i])
        hed[i] += logs[1] * HED_MATRIX[1, i]
        hed[i] += logs[2] * HED_MATRIX[2, i]
    np.maximum(hed, 0.0, out=hed)
    out[6:9] = hed.mean(axis=1)
    out[9:12] = hed.std(axis=1)
    h_channel = hed[0]
    out[13] = np.count_nonzero(h_channel > NUCLEAR_H_THRESHOLD) / npx
    out[12] = _quantiles(h_channel, [0.9])[0]
    r, g, b = planar
    cmax = np.maximum(np.maximum(r, g), b).astype(np.float32)
    cmin = np.minimum(np.minimum(r, g), b)
    saturation = (cmax - cmin) / np.maximum(cmax, np.float32(1e-6))     # 0 where cmax == 0 (cmin is 0 there too)
    out[14], out[15] = _mean_std(saturation)
    # ITU-R 601 luma, as PIL's "L" conversion
    gray = (LUMA_LUTS[0][r] + LUMA_LUTS[1][g] + LUMA_LUTS[2][b]).reshape(h, w)
    bins = np.minimum((gray.ravel() * np.float32(ENTROPY_BINS / 256.0)).astype(np.int64), ENTROPY_BINS - 1)
    prob = np.bincount(bins, minlength=ENTROPY_BINS) / npx
    prob = prob[prob > 0]
    out[19] = -np.sum(prob * np.log2(prob))
    gx = gray[:-1, 1:] - gray[:-1, :-1]
    gy = gray[1:, :-1] - gray[:-1, :-1]
    grad = np.sqrt(gx * gx + gy * gy).ravel()
    out[20], out[21] = _mean_std(grad)
    lap = (gray[1:-1, :-2] + gray[1:-1, 2:] + gray[:-2, 1:-1] + gray[2:, 1:-1] - 4.0 * gray[1:-1, 1:-1])
    out[23] = np.abs(lap).mean() if lap.size else np.nan
    out[24] = od_sum / npx
    out[16:19] = _quantiles(gray.ravel(), [0.1, 0.5, 0.9])  # last: partitions gray in place
    out[22] = _quantiles(grad, [0.9])[0]


def stats_descriptors_numpy(tiles: np.ndarray, out: np.ndarray) -> None:
    """The numpy reference of the stats kernel (same definitions; used where numba is not installed)."""
    for i in range(tiles.shape[0]):
        _tile_stats_numpy(tiles[i], out[i])
