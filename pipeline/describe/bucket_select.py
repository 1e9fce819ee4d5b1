"""Exact order statistics of the ``stats`` kernel by bucket counting (numba): a histogram of monotonic buckets finds
the few buckets holding the wanted ranks, and only their values are sorted; the same values as numpy's quantiles
(method 'linear'), without sorting a tile's 65k values.
"""

from __future__ import annotations

import math

import numpy as np

from ..core.jit import njit

SORT_MAX = 2048  # at most this many values are sorted; more in the wanted buckets: narrowed down first


@njit
def kth_from_buckets(values, buckets, n, ranks, counts, scratch, result):
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
    if union <= SORT_MAX:
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
    while src.size > SORT_MAX:
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
def fill_buckets(values, n, scale, buckets, counts, split):
    """buckets[i] = bucket of values[i] (value * scale, clipped to the last), and the bucket sizes in ``counts``.

    The indices in one vectorised pass, then the counts in four interleaved histograms (``split``, (4, nb) int32):
    runs of equal buckets (flat background) would otherwise chain every increment on the one before.
    """
    nb = counts.size
    last = np.int32(nb - 1)
    for i in range(n):
        buckets[i] = min(np.int32(values[i] * scale), last)
    split[:] = 0
    n4 = n - n % 4
    for i in range(0, n4, 4):
        split[0, buckets[i]] += 1
        split[1, buckets[i + 1]] += 1
        split[2, buckets[i + 2]] += 1
        split[3, buckets[i + 3]] += 1
    for i in range(n4, n):
        split[0, buckets[i]] += 1
    for b in range(nb):
        counts[b] = split[0, b] + split[1, b] + split[2, b] + split[3, b]


@njit
def quantiles_exact(values, buckets, n, counts, qs, scratch, out, first):
    """numpy's 'linear' quantiles ``qs`` of values[:n] into out[first:first+len(qs)] (see kth_from_buckets)."""
    nq = qs.size
    ranks = np.empty(2 * nq, np.int64)
    pos = np.empty(nq)
    for j in range(nq):
        pos[j] = qs[j] * (n - 1)
        k = int(math.floor(pos[j]))
        ranks[2 * j] = k
        ranks[2 * j + 1] = min(k + 1, n - 1)
    vals = np.empty(2 * nq, values.dtype)
    kth_from_buckets(values, buckets, n, ranks, counts, scratch, vals)
    for j in range(nq):
        a = np.float64(vals[2 * j])
        b = np.float64(vals[2 * j + 1])
        t = pos[j] - ranks[2 * j]
        out[first + j] = b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t
