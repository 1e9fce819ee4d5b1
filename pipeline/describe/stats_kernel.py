"""The compiled ``stats`` kernel: the 25 features of ``pipeline.describe.stats`` for a batch of tiles in one numba
pass per tile (``stats_kernel`` is None where numba is missing).
"""

from __future__ import annotations

import math

import numpy as np

from ..core.jit import njit
from .stats import ENTROPY_BINS, HED_LOG_LUT, HED_MATRIX

# --- the numba kernel ----------------------------------------------------------------------------------------------
# Same quantities and float32 arithmetic as _tile_stats_numpy; sums in float64 (one pass, so standard deviations use
# E[x^2] - E[x]^2 in float64, within 1e-6 relative of numpy's two-pass float32 ones; RGB moments exact in integers);
# percentiles exact (numpy's 'linear' method) by bucket counting instead of sorting. cache=True: compiled once
# (~6 s) and reused from disk.

_SORT_MAX = 2048
_BUCKETS = 4096
# the entropy histogram is read off the grey buckets (see stats_kernel): its bins must be whole runs of buckets
assert _BUCKETS % ENTROPY_BINS == 0 and ENTROPY_BINS & (ENTROPY_BINS - 1) == 0
# an upper bound of the H stain value (LUT values are in [0, 1]): only sizes the percentile buckets
_H_BOUND = float(np.maximum(HED_MATRIX[:, 0], 0).sum() * HED_LOG_LUT.max()) + 1e-3


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
def stats_kernel(tiles, out, hed_log_lut, hed_matrix, od_lut, luma_r, luma_g, luma_b, nuclear_thr, entropy_bins):
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
