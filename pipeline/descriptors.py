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
import math

import numpy as np
from skimage.color import hed_from_rgb

from .core.config import DescriptorConfig
from .core.jit import njit

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


# Per-channel-value lookup tables: every per-pixel quantity below that depends on one channel is a gather, with the
# same float32 arithmetic as the direct formula (hed_stains, the ITU-R 601 luma, optical density).
_VALUES = np.arange(256, dtype=np.float32)
_VALUES64 = _VALUES.astype(np.float64)
_HED_LOG_LUT = np.log(np.maximum(_VALUES / 255.0, 1e-6)) / np.float32(np.log(1e-6))
_HED_MATRIX = hed_from_rgb.astype(np.float32)
_OD_LUT64 = (-np.log10(np.maximum(_VALUES, 1.0) / 255.0)).astype(np.float64)
_LUMA_LUTS = (_VALUES * np.float32(0.299), _VALUES * np.float32(0.587), _VALUES * np.float32(0.114))


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
        mean = hist @ _VALUES64 / npx
        out[c] = mean
        out[3 + c] = np.sqrt(hist @ (_VALUES64 - mean) ** 2 / npx)
        od_sum += hist @ _OD_LUT64
    logs = _HED_LOG_LUT[planar]                                         # (3, npx) float32, as hed_stains
    hed = np.empty_like(logs)
    for i in range(3):  # the 3x3 product by hand: a BLAS call this small costs more in thread hand-offs than work
        np.multiply(logs[0], _HED_MATRIX[0, i], out=hed[i])
        hed[i] += logs[1] * _HED_MATRIX[1, i]
        hed[i] += logs[2] * _HED_MATRIX[2, i]
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
    gray = (_LUMA_LUTS[0][r] + _LUMA_LUTS[1][g] + _LUMA_LUTS[2][b]).reshape(h, w)
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


def stats_descriptors(tiles: np.ndarray) -> np.ndarray:
    """(n, h, w, 3) uint8 RGB tiles -> (n, 25) float32, columns named by ``STATS_FEATURE_NAMES``."""
    tiles = np.asarray(tiles)
    if tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise ValueError(f"expected (n, h, w, 3) RGB tiles, got shape {tiles.shape}")
    if tiles.dtype != np.uint8:
        tiles = np.clip(tiles, 0, 255).astype(np.uint8)
    out = np.empty((tiles.shape[0], len(STATS_FEATURE_NAMES)), dtype=np.float64)
    if _stats_kernel is not None and tiles.shape[0]:
        _stats_kernel(np.ascontiguousarray(tiles), out, _HED_LOG_LUT, _HED_MATRIX, _OD_LUT64, *_LUMA_LUTS,
                      np.float32(NUCLEAR_H_THRESHOLD), ENTROPY_BINS)
    else:
        stats_descriptors_numpy(tiles, out)
    return out.astype(np.float32)


def stats_descriptors_numpy(tiles: np.ndarray, out: np.ndarray) -> None:
    """The numpy reference of the stats kernel (same definitions; used where numba is not installed)."""
    for i in range(tiles.shape[0]):
        _tile_stats_numpy(tiles[i], out[i])


# --- the numba kernel ----------------------------------------------------------------------------------------------
# Same quantities and float32 arithmetic as _tile_stats_numpy; sums in float64 (one pass, so standard deviations use
# E[x^2] - E[x]^2 in float64, within 1e-6 relative of numpy's two-pass float32 ones; RGB moments exact in integers);
# percentiles exact (numpy's 'linear' method) by bucket counting instead of sorting. cache=True: compiled once
# (~6 s) and reused from disk.

_SORT_MAX = 2048
_BUCKETS = 4096
# the entropy histogram is read off the grey buckets (see _stats_kernel): its bins must be whole runs of buckets
assert _BUCKETS % ENTROPY_BINS == 0 and ENTROPY_BINS & (ENTROPY_BINS - 1) == 0
# an upper bound of the H stain value (LUT values are in [0, 1]): only sizes the percentile buckets
_H_BOUND = float(np.maximum(_HED_MATRIX[:, 0], 0).sum() * _HED_LOG_LUT.max()) + 1e-3


@njit
def _kth_from_buckets(values, buckets, n, ranks, counts, scratch, result):
    """result[j] = the ranks[j]-th smallest of values[:n] (ranks ascending), exactly.

    ``buckets[i]`` is the bucket of values[i] and ``counts`` the bucket sizes, for buckets that are monotonic in the
    value (filled while the values were computed). One pass gathers the values of the buckets holding a wanted rank;
    sorting those few gives each rank (buckets keep their order). Crowded buckets are narrowed down instead.
    """
    nb = counts.size
    wanted = np.zeros(nb, np.bool_)
    bucket_of = np.empty(ranks.size, np.int64)
    start_of = np.empty(ranks.size, np.int64)
    count_of = np.empty(ranks.size, np.int64)
    j = 0
    start = 0
    union = 0
    for bi in range(nb):
        c = counts[bi]
        while j < ranks.size and ranks[j] < start + c:
            if not wanted[bi]:
                union += c
            wanted[bi] = True
            bucket_of[j] = bi
            start_of[j] = start
            count_of[j] = c
            j += 1
        start += c
        if j >= ranks.size:
            break
    if union <= _SORT_MAX:
        m = 0
        for i in range(n):
            if wanted[buckets[i]]:
                scratch[m] = values[i]
                m += 1
        part = np.sort(scratch[:m])
        # a rank's place in the sorted union: the counts of the wanted buckets below its own, plus its place there
        offset = 0
        j = 0
        for bi in range(nb):
            if not wanted[bi]:
                continue
            while j < ranks.size and bucket_of[j] == bi:
                result[j] = part[offset + ranks[j] - start_of[j]]
                j += 1
            offset += counts[bi]
            if j >= ranks.size:
                break
        return
    # many values in a few buckets (flat background, skewed values): narrow down inside each wanted bucket
    j = 0
    while j < ranks.size:
        bi = bucket_of[j]
        inside = np.empty(count_of[j], values.dtype)
        c = 0
        for i in range(n):
            if buckets[i] == bi:
                inside[c] = values[i]
                c += 1
        j_end = j
        while j_end < ranks.size and bucket_of[j_end] == bi:
            result[j_end] = _kth_narrowing(inside, ranks[j_end] - start_of[j], counts)
            j_end += 1
        j = j_end


@njit
def _kth_narrowing(values, k, counts):
    """The k-th smallest of ``values`` (not modified): bucket counts narrow the range until few values are left."""
    nb = counts.size
    src = values
    while src.size > _SORT_MAX:
        lo = src.min()
        hi = src.max()
        if not hi > lo:
            return lo
        scale = nb / (np.float64(hi) - lo)
        counts[:] = 0
        for i in range(src.size):
            counts[min(int((src[i] - lo) * scale), nb - 1)] += 1
        start = 0
        bi = 0
        while start + counts[bi] <= k:
            start += counts[bi]
            bi += 1
        dst = np.empty(counts[bi], src.dtype)
        c = 0
        for i in range(src.size):
            if min(int((src[i] - lo) * scale), nb - 1) == bi:
                dst[c] = src[i]
                c += 1
        src = dst
        k -= start
    return np.sort(src)[k]


@njit
def _fill_buckets(values, n, scale, buckets, counts):
    """buckets[i] = bucket of values[i] (value * scale, clipped to the last), and the bucket sizes in ``counts``."""
    nb = counts.size
    counts[:] = 0
    for i in range(n):
        b = min(int(values[i] * scale), nb - 1)
        buckets[i] = b
        counts[b] += 1


@njit
def _quantiles_exact(values, buckets, n, counts, qs, scratch, out, first):
    """numpy's 'linear' quantiles ``qs`` of values[:n] into out[first:first+len(qs)] (see _kth_from_buckets)."""
    nq = qs.size
    ranks = np.empty(2 * nq, np.int64)
    pos = np.empty(nq)
    for j in range(nq):
        pos[j] = qs[j] * (n - 1)
        k = int(math.floor(pos[j]))
        ranks[2 * j] = k
        ranks[2 * j + 1] = min(k + 1, n - 1)
    vals = np.empty(2 * nq, values.dtype)
    _kth_from_buckets(values, buckets, n, ranks, counts, scratch, vals)
    for j in range(nq):
        a = np.float64(vals[2 * j])
        b = np.float64(vals[2 * j + 1])
        t = pos[j] - ranks[2 * j]
        out[first + j] = b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t


@njit(fastmath={"reassoc", "nsz"})
def _laplacian_abs_sum(gray):
    """Sum of |4-neighbour Laplacian| over the interior of ``gray``: a pure reduction, so reassociating the float64
    sum (the only fast-math freedom given) lets it vectorise; each term is computed exactly as numpy does."""
    h, w = gray.shape
    four = np.float32(4.0)
    total = 0.0
    for y in range(1, h - 1):
        row = 0.0
        for x in range(1, w - 1):
            lv = gray[y, x - 1] + gray[y, x + 1] + gray[y - 1, x] + gray[y + 1, x] - four * gray[y, x]
            row += abs(lv)
        total += row
    return total


@njit
def _stats_kernel(tiles, out, hed_log_lut, hed_matrix, od_lut, luma_r, luma_g, luma_b, nuclear_thr, entropy_bins):
    """The 25 statistics of each (h, w, 3) uint8 tile of ``tiles`` into ``out`` (n, 25) float64.

    The per-pixel loop has no scattered writes (histogram increments there cost more than all the arithmetic): RGB
    moments are exact integer sums, the entropy histogram is read off the grey-level percentile buckets afterwards.
    """
    n, h, w, _ = tiles.shape
    npx = h * w
    nb = _BUCKETS
    h_values = np.empty(npx, np.float32)
    gray = np.empty((h, w), np.float32)
    n_grad = (h - 1) * (w - 1)
    grad = np.empty(max(n_grad, 1), np.float32)
    scratch = np.empty(npx, np.float32)
    eps = np.float32(1e-6)
    zero = np.float32(0.0)
    m00, m01, m02 = hed_matrix[0, 0], hed_matrix[0, 1], hed_matrix[0, 2]
    m10, m11, m12 = hed_matrix[1, 0], hed_matrix[1, 1], hed_matrix[1, 2]
    m20, m21, m22 = hed_matrix[2, 0], hed_matrix[2, 1], hed_matrix[2, 2]
    # percentile buckets: value * scale, monotonic (upper bounds need not be tight). The grey scale is a power of two,
    # so bucket // (nb / entropy_bins) is exactly the entropy bin int(gray * entropy_bins / 256).
    gray_scale = np.float32(nb / 256.0)
    h_scale = np.float32(nb / _H_BOUND)
    grad_scale = np.float32(nb / 362.0)
    per_bin = nb // entropy_bins
    gray_buckets = np.empty(npx, np.uint16)
    h_buckets = np.empty(npx, np.uint16)
    grad_buckets = np.empty(max(n_grad, 1), np.uint16)
    gray_counts = np.empty(nb, np.int64)
    h_counts = np.empty(nb, np.int64)
    grad_counts = np.empty(nb, np.int64)
    q90 = np.array([0.9])
    q_gray = np.array([0.1, 0.5, 0.9])
    for t in range(n):
        tile = tiles[t]
        s_r = s_g = s_b = q_r = q_g = q_b = 0
        od = 0.0
        sh = se = sd = qh = qe = qd = 0.0
        nuclear = 0
        sat_sum = 0.0
        sat_sq = 0.0
        p = 0
        for y in range(h):
            for x in range(w):
                r = tile[y, x, 0]
                g = tile[y, x, 1]
                b = tile[y, x, 2]
                ri = np.int64(r)
                gi = np.int64(g)
                bi = np.int64(b)
                s_r += ri
                s_g += gi
                s_b += bi
                q_r += ri * ri
                q_g += gi * gi
                q_b += bi * bi
                od += od_lut[r] + od_lut[g] + od_lut[b]
                l0 = hed_log_lut[r]
                l1 = hed_log_lut[g]
                l2 = hed_log_lut[b]
                # same float32 operation order as hed_stains: ((l0*m0 + l1*m1) + l2*m2), then clipped at 0
                vh = max(l0 * m00 + l1 * m10 + l2 * m20, zero)
                ve = max(l0 * m01 + l1 * m11 + l2 * m21, zero)
                vd = max(l0 * m02 + l1 * m12 + l2 * m22, zero)
                sh += vh
                se += ve
                sd += vd
                qh += np.float64(vh) * vh
                qe += np.float64(ve) * ve
                qd += np.float64(vd) * vd
                h_values[p] = vh
                if vh > nuclear_thr:
                    nuclear += 1
                cmax = np.float32(max(r, g, b))
                cmin = np.float32(min(r, g, b))
                s = (cmax - cmin) / max(cmax, eps)
                sat_sum += s
                sat_sq += np.float64(s) * s
                gray[y, x] = luma_r[r] + luma_g[g] + luma_b[b]
                p += 1
        o = out[t]
        for c, (s_c, q_c) in enumerate(((s_r, q_r), (s_g, q_g), (s_b, q_b))):
            m = s_c / npx
            o[c] = m
            o[3 + c] = math.sqrt(max((q_c - s_c * m) / npx, 0.0))
        for i, (s_i, q_i) in enumerate(((sh, qh), (se, qe), (sd, qd))):
            m = s_i / npx
            o[6 + i] = m
            o[9 + i] = math.sqrt(max(q_i / npx - m * m, 0.0))
        o[13] = nuclear / npx
        _fill_buckets(h_values, npx, h_scale, h_buckets, h_counts)
        _quantiles_exact(h_values, h_buckets, npx, h_counts, q90, scratch, o, 12)
        m = sat_sum / npx
        o[14] = m
        o[15] = math.sqrt(max(sat_sq / npx - m * m, 0.0))
        # texture on the luma image: forward differences (bucketed as they are made) and the 4-neighbour Laplacian
        grad_counts[:] = 0
        gs = 0.0
        gq = 0.0
        k = 0
        for y in range(h - 1):
            for x in range(w - 1):
                gx = gray[y, x + 1] - gray[y, x]
                gy = gray[y + 1, x] - gray[y, x]
                gv = np.sqrt(gx * gx + gy * gy)
                grad[k] = gv
                gb = min(int(gv * grad_scale), nb - 1)
                grad_buckets[k] = gb
                grad_counts[gb] += 1
                gs += gv
                gq += np.float64(gv) * gv
                k += 1
        if n_grad > 0:
            m = gs / n_grad
            o[20] = m
            o[21] = math.sqrt(max(gq / n_grad - m * m, 0.0))
            _quantiles_exact(grad, grad_buckets, n_grad, grad_counts, q90, scratch, o, 22)
        else:
            o[20] = np.nan
            o[21] = np.nan
            o[22] = np.nan
        n_lap = max(h - 2, 0) * max(w - 2, 0)
        o[23] = _laplacian_abs_sum(gray) / n_lap if n_lap > 0 else np.nan
        o[24] = od / npx
        flat_gray = gray.reshape(npx)
        _fill_buckets(flat_gray, npx, gray_scale, gray_buckets, gray_counts)
        e = 0.0
        for i in range(entropy_bins):
            c = 0
            for bb in range(i * per_bin, (i + 1) * per_bin):
                c += gray_counts[bb]
            if c > 0:
                q = c / npx
                e -= q * math.log2(q)
        o[19] = e
        # last: the narrowing path of the selection reuses gray_counts as scratch
        _quantiles_exact(flat_gray, gray_buckets, npx, gray_counts, q_gray, scratch, o, 16)


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
