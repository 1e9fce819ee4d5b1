"""The compiled ``stats`` kernel: the 25 features of ``pipeline.describe.stats`` for a batch of tiles, one numba pass
over each tile's rows plus exact bucket-select percentiles (``stats_kernel`` is None where numba is missing).
"""

from __future__ import annotations

import math

import numpy as np

from ..core.jit import njit
from .bucket_select import fill_buckets, quantiles_exact
from .stats import ENTROPY_BINS, HED_LOG_LUT, HED_MATRIX

# --- the numba kernel ----------------------------------------------------------------------------------------------
# Same quantities and float32 arithmetic as _tile_stats_numpy; sums in float64 (one pass, so standard deviations use
# E[x^2] - E[x]^2 in float64, within 1e-6 relative of numpy's two-pass float32 ones; RGB moments exact in integers);
# percentiles exact (numpy's 'linear' method) by bucket counting instead of sorting. cache=True: compiled once
# (~6 s) and reused from disk.
# Laid out for LLVM's vectoriser, row by row: the RGB bytes de-interleaved first (loops over (x, channel) indexing do
# not vectorise), table lookups in a scalar loop of their own, the per-pixel float32 arithmetic in a loop with no
# float reductions (vectorised, each value computed exactly as before), and the float64 sums over the row's values
# in small reduction-only kernels that may reassociate (the one fast-math freedom, as _laplacian_abs_sum).

_BUCKETS = 4096
# the entropy histogram is read off the grey buckets (see stats_kernel): its bins must be whole runs of buckets
assert _BUCKETS % ENTROPY_BINS == 0 and ENTROPY_BINS & (ENTROPY_BINS - 1) == 0
# an upper bound of the H stain value (LUT values are in [0, 1]): only sizes the percentile buckets
_H_BOUND = float(np.maximum(HED_MATRIX[:, 0], 0).sum() * HED_LOG_LUT.max()) + 1e-3


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
def _planar_row(flat, r, g, b):
    """One row of interleaved RGB bytes into three planes (flat indexing vectorises; (x, channel) indexing does not)."""
    for x in range(r.size):
        r[x] = flat[3 * x]
        g[x] = flat[3 * x + 1]
        b[x] = flat[3 * x + 2]


@njit
def _lookup_row(r, g, b, logs, od_row, hed_log_lut, od_lut):
    """The per-channel table lookups of a row (gathers, scalar): stain logarithms and each pixel's OD sum."""
    for x in range(r.size):
        logs[0, x] = hed_log_lut[r[x]]
        logs[1, x] = hed_log_lut[g[x]]
        logs[2, x] = hed_log_lut[b[x]]
        od_row[x] = od_lut[r[x]] + od_lut[g[x]] + od_lut[b[x]]


@njit
def _pixel_row(r, g, b, logs, hs, es, ds, sat_row, gray_row, m, luma, nuclear_thr):
    """Per-pixel values of a row (vectorised: no float reductions): H, E, D (clipped at 0), saturation,
    luma; returns the RGB sums and sums of squares (exact integers) and the count of nuclear pixels."""
    s_r = s_g = s_b = q_r = q_g = q_b = nuclear = 0
    eps = np.float32(1e-6)
    zero = np.float32(0.0)
    m00, m01, m02 = m[0, 0], m[0, 1], m[0, 2]
    m10, m11, m12 = m[1, 0], m[1, 1], m[1, 2]
    m20, m21, m22 = m[2, 0], m[2, 1], m[2, 2]
    cr, cg, cb = luma[0], luma[1], luma[2]
    l0s, l1s, l2s = logs[0], logs[1], logs[2]
    for x in range(r.size):
        ri = np.int32(r[x])
        gi = np.int32(g[x])
        bi = np.int32(b[x])
        s_r += ri
        s_g += gi
        s_b += bi
        q_r += ri * ri
        q_g += gi * gi
        q_b += bi * bi
        l0 = l0s[x]
        l1 = l1s[x]
        l2 = l2s[x]
        # same float32 operation order as hed_stains: ((l0*m0 + l1*m1) + l2*m2), then clipped at 0
        vh = max(l0 * m00 + l1 * m10 + l2 * m20, zero)
        hs[x] = vh
        es[x] = max(l0 * m01 + l1 * m11 + l2 * m21, zero)
        ds[x] = max(l0 * m02 + l1 * m12 + l2 * m22, zero)
        nuclear += np.int32(vh > nuclear_thr)
        cmax = np.float32(max(r[x], g[x], b[x]))
        cmin = np.float32(min(r[x], g[x], b[x]))
        sat_row[x] = (cmax - cmin) / max(cmax, eps)
        # luma_c[v] == float32(v) * luma_c[1] (the tables are float32 products), added in the tables' order
        gray_row[x] = np.float32(r[x]) * cr + np.float32(g[x]) * cg + np.float32(b[x]) * cb
    return s_r, s_g, s_b, q_r, q_g, q_b, nuclear


@njit
def _grad_row(g0, g1, out):
    """Gradient magnitudes of one row from forward differences (``g1`` is the next row)."""
    for x in range(out.size):
        gx = g0[x + 1] - g0[x]
        gy = g1[x] - g0[x]
        out[x] = np.sqrt(gx * gx + gy * gy)


@njit(fastmath={"reassoc", "nsz"})
def _sum_sq(values):
    """(sum, sum of squares) of float32 values in float64: a pure reduction (squares of float32 are exact)."""
    s = 0.0
    q = 0.0
    for i in range(values.size):
        v = np.float64(values[i])
        s += v
        q += v * v
    return s, q


@njit
def _add_sum_sq(sums, i, values):
    """``sums[i]`` += (sum, sum of squares) of ``values`` (``_sum_sq``)."""
    s, q = _sum_sq(values)
    sums[i, 0] += s
    sums[i, 1] += q


@njit
def _mean_std(o, mean_at, std_at, s, q, n):
    """``o[mean_at]``, ``o[std_at]``: mean and standard deviation of ``n`` values from their float64 sum and sum of
    squares (E[x^2] - E[x]^2)."""
    m = s / n
    o[mean_at] = m
    o[std_at] = math.sqrt(max(q / n - m * m, 0.0))


@njit(fastmath={"reassoc", "nsz"})
def _sum(values):
    s = 0.0
    for i in range(values.size):
        s += values[i]
    return s


@njit
def stats_kernel(tiles, out, hed_log_lut, hed_matrix, od_lut, luma_r, luma_g, luma_b, nuclear_thr, entropy_bins):
    """The 25 statistics of each (h, w, 3) uint8 tile of ``tiles`` into ``out`` (n, 25) float64.

    Row by row (see the comment above); percentiles and the entropy histogram from bucket counts afterwards.
    """
    n, h, w, _ = tiles.shape
    npx = h * w
    nb = _BUCKETS
    luma = np.array([luma_r[1], luma_g[1], luma_b[1]], np.float32)
    h_values = np.empty(npx, np.float32)
    gray = np.empty((h, w), np.float32)
    n_grad = (h - 1) * (w - 1)
    grad = np.empty(max(n_grad, 1), np.float32)
    scratch = np.empty(npx, np.float32)
    planes = np.empty((3, w), np.uint8)
    logs = np.empty((3, w), np.float32)
    e_row = np.empty(w, np.float32)
    d_row = np.empty(w, np.float32)
    sat_row = np.empty(w, np.float32)
    od_row = np.empty(w, np.float64)
    # percentile buckets: value * scale, monotonic (upper bounds need not be tight). The grey scale is a power of two,
    # so bucket // (nb / entropy_bins) is exactly the entropy bin int(gray * entropy_bins / 256).
    gray_scale = np.float32(nb / 256.0)
    h_scale = np.float32(nb / _H_BOUND)
    grad_scale = np.float32(nb / 362.0)
    per_bin = nb // entropy_bins
    buckets = np.empty(npx, np.int32)
    counts = np.empty(nb, np.int64)
    split = np.empty((4, nb), np.int32)
    q90 = np.array([0.9])
    q_gray = np.array([0.1, 0.5, 0.9])
    sums = np.empty((5, 2))  # (sum, sum of squares) of H, E, D, saturation and gradient magnitude
    for t in range(n):
        rows = tiles[t].reshape(h, w * 3)
        s_r = s_g = s_b = q_r = q_g = q_b = nuclear = 0
        od = 0.0
        sums[:] = 0.0
        for y in range(h):
            _planar_row(rows[y], planes[0], planes[1], planes[2])
            _lookup_row(planes[0], planes[1], planes[2], logs, od_row, hed_log_lut, od_lut)
            h_row = h_values[y * w:(y + 1) * w]
            a = _pixel_row(planes[0], planes[1], planes[2], logs, h_row, e_row, d_row, sat_row, gray[y], hed_matrix, luma,
                           nuclear_thr)
            s_r += a[0]
            s_g += a[1]
            s_b += a[2]
            q_r += a[3]
            q_g += a[4]
            q_b += a[5]
            nuclear += a[6]
            od += _sum(od_row)
            _add_sum_sq(sums, 0, h_row)
            _add_sum_sq(sums, 1, e_row)
            _add_sum_sq(sums, 2, d_row)
            _add_sum_sq(sums, 3, sat_row)
        o = out[t]
        for c, (s_c, q_c) in enumerate(((s_r, q_r), (s_g, q_g), (s_b, q_b))):
            m = s_c / npx
            o[c] = m
            o[3 + c] = math.sqrt(max((q_c - s_c * m) / npx, 0.0))
        for i, (mean_at, std_at) in enumerate(((6, 9), (7, 10), (8, 11), (14, 15))):  # H, E, D, saturation
            _mean_std(o, mean_at, std_at, sums[i, 0], sums[i, 1], npx)
        o[13] = nuclear / npx
        fill_buckets(h_values, npx, h_scale, buckets, counts, split)
        quantiles_exact(h_values, buckets, npx, counts, q90, scratch, o, 12)
        # texture on the luma image: forward differences and the 4-neighbour Laplacian
        if n_grad > 0:
            for y in range(h - 1):
                g_row = grad[y * (w - 1):(y + 1) * (w - 1)]
                _grad_row(gray[y], gray[y + 1], g_row)
                _add_sum_sq(sums, 4, g_row)
            _mean_std(o, 20, 21, sums[4, 0], sums[4, 1], n_grad)
            fill_buckets(grad, n_grad, grad_scale, buckets, counts, split)
            quantiles_exact(grad, buckets, n_grad, counts, q90, scratch, o, 22)
        else:
            o[20] = np.nan
            o[21] = np.nan
            o[22] = np.nan
        n_lap = max(h - 2, 0) * max(w - 2, 0)
        o[23] = _laplacian_abs_sum(gray) / n_lap if n_lap > 0 else np.nan
        o[24] = od / npx
        flat_gray = gray.reshape(npx)
        fill_buckets(flat_gray, npx, gray_scale, buckets, counts, split)
        e = 0.0
        for i in range(entropy_bins):
            c = 0
            for bb in range(i * per_bin, (i + 1) * per_bin):
                c += counts[bb]
            if c > 0:
                q = c / npx
                e -= q * math.log2(q)
        o[19] = e
        # last: the narrowing path of the selection reuses counts as scratch
        quantiles_exact(flat_gray, buckets, npx, counts, q_gray, scratch, o, 16)
