"""Pillow's ``Image.resize`` with the BOX and BILINEAR filters on uint8 RGB arrays, compiled: the same pixels, with
no conversion to and from PIL images, and in bands of output rows that run on threads.

Pillow resizes in two separable passes (horizontal, then vertical) with per-pixel filter weights computed in double
precision and applied in 22-bit fixed point (``libImaging/Resample.c``); the box arrives there as C floats. Each step
is reproduced here in that order, so the result equals ``np.asarray(Image.fromarray(a).resize(size, f, box))`` byte for
byte (``tests/slides/test_resample.py`` checks many sizes, boxes and factors). Output rows depend only on their own
weights, so a band of rows computed alone is the same as those rows of the whole image.
"""

from __future__ import annotations

import math

import numpy as np

from ..core.jit import njit
from ..core.threads import THREADS_PER_TASK, map_threads

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images
BAND_ROWS_MIN = 64  # output rows below which a resize is not split across threads


@njit
def _weights(in_size, in0, in1, out_size, bilinear):
    """(first source pixel, count) and fixed-point weights per output pixel: Pillow's ``precompute_coeffs`` and
    ``normalize_coeffs_8bpc``. ``in0``/``in1``: the box edges, already rounded to float32."""
    scale = np.float64(np.float32(in1) - np.float32(in0)) / out_size
    filterscale = max(scale, 1.0)
    support = (1.0 if bilinear else 0.5) * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    bounds = np.zeros((out_size, 2), np.int64)
    weights = np.zeros((out_size, ksize), np.int32)
    k = np.zeros(ksize, np.float64)
    inv = 1.0 / filterscale
    one = np.float64(1 << PRECISION_BITS)
    for xx in range(out_size):
        center = in0 + (xx + 0.5) * scale
        xmin = int(center - support + 0.5)
        xmin = max(xmin, 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        ww = 0.0
        for x in range(xmax):
            t = (x + xmin - center + 0.5) * inv
            if bilinear:
                t = -t if t < 0.0 else t
                w = 1.0 - t if t < 1.0 else 0.0
            else:
                w = 1.0 if -0.5 < t <= 0.5 else 0.0
            k[x] = w
            ww += w
        for x in range(max(xmax, 0)):
            if ww != 0.0:
                k[x] /= ww
            weights[xx, x] = int(0.5 + k[x] * one) if k[x] >= 0 else int(-0.5 + k[x] * one)
        bounds[xx, 0] = xmin
        bounds[xx, 1] = xmax
    return bounds, weights


@njit
def _horizontal(src, row0, rows, bounds, weights, out):
    """``out[r] = `` row ``row0 + r`` of ``src`` resampled along x, for r < ``rows`` (images as (h, w * 3) rows)."""
    half = np.int32(1 << (PRECISION_BITS - 1))
    for r in range(rows):
        line = src[row0 + r]
        dest = out[r]
        for xx in range(bounds.shape[0]):
            p = 3 * bounds[xx, 0]
            s0 = s1 = s2 = half
            for x in range(bounds[xx, 1]):
                w = weights[xx, x]
                s0 += np.int32(line[p]) * w
                s1 += np.int32(line[p + 1]) * w
                s2 += np.int32(line[p + 2]) * w
                p += 3
            dest[3 * xx] = min(max(s0 >> PRECISION_BITS, 0), 255)
            dest[3 * xx + 1] = min(max(s1 >> PRECISION_BITS, 0), 255)
            dest[3 * xx + 2] = min(max(s2 >> PRECISION_BITS, 0), 255)


@njit
def _vertical(src, row_shift, bounds, weights, y0, y1, out):
    """Output rows ``y0:y1`` resampled along y from ``src``, whose row 0 is source row ``row_shift`` (images as
    (h, w * 3) rows): each output row sums whole source rows, which vectorises."""
    half = np.int32(1 << (PRECISION_BITS - 1))
    n = out.shape[1]
    acc = np.empty(n, np.int32)
    for yy in range(y0, y1):
        ymin = bounds[yy, 0] - row_shift
        acc[:] = half
        for y in range(bounds[yy, 1]):
            w = weights[yy, y]
            line = src[ymin + y]
            for j in range(n):
                acc[j] += np.int32(line[j]) * w
        dest = out[yy]
        for j in range(n):
            dest[j] = min(max(acc[j] >> PRECISION_BITS, 0), 255)


kernels = _weights is not None  # False where numba is missing: callers use PIL itself


@njit
def _resize_rows(image, x_bounds, x_weights, y_bounds, y_weights, need_x, need_y, y0, y1, out):
    """Output rows ``y0:y1`` of the two-pass resize (Pillow's ``ImagingResampleInner``), into ``out``. Pillow 13 runs
    the vertical pass first when the height shrinks by more than twice as many pixels as the width does."""
    src_h, src_w = image.shape[0], image.shape[1] // 3
    out_h, out_w = out.shape[0], out.shape[1] // 3
    if not need_y:  # horizontal pass only: output row = source row (the box's rows are the image's)
        _horizontal(image, y0, y1 - y0, x_bounds, x_weights, out[y0:y1])
        return
    if not need_x:
        _vertical(image, 0, y_bounds, y_weights, y0, y1, out)
        return
    if src_h - out_h > 0 and src_h - out_h > (src_w - out_w) * 2:  # vertical first, on whole source rows
        temp = np.empty((out_h, src_w * 3), np.uint8)
        _vertical(image, 0, y_bounds, y_weights, y0, y1, temp)
        _horizontal(temp, y0, y1 - y0, x_bounds, x_weights, out[y0:y1])
        return
    first = y_bounds[y0, 0]
    last = y_bounds[y1 - 1, 0] + y_bounds[y1 - 1, 1]
    temp = np.empty((last - first, out_w * 3), np.uint8)
    _horizontal(image, first, last - first, x_bounds, x_weights, temp)
    _vertical(temp, first, y_bounds, y_weights, y0, y1, out)


def resize(image: np.ndarray, out_w: int, out_h: int, box: tuple[float, float, float, float], bilinear: bool,
           out: np.ndarray | None = None, threads: bool = False) -> np.ndarray:
    """``Image.fromarray(image).resize((out_w, out_h), BILINEAR if bilinear else BOX, box=box)`` as an array, into
    ``out`` if given. ``threads``: split the output rows over ``core.threads``' pool (a thumbnail a slide's first task
    waits for); the pixels are the same either way."""
    src_h, src_w = image.shape[:2]
    f32 = [np.float32(v) for v in box]  # Pillow parses the box as C floats (and subtracts them as floats)
    box32 = [float(v) for v in f32]
    if out_w < 1 or out_h < 1 or min(box32[:2]) < 0 or box32[2] > src_w or box32[3] > src_h \
            or f32[2] - f32[0] < 0 or f32[3] - f32[1] < 0:  # PIL's checks: the kernels read only inside the image
        raise ValueError(f"resize of a {src_w}x{src_h} image to {out_w}x{out_h}: box {tuple(box)} is not inside it")
    if out is None:
        out = np.empty((out_h, out_w, 3), np.uint8)
    if box32[0] == int(box32[0]) and f32[2] - f32[0] == out_w and box32[1] == int(box32[1]) \
            and f32[3] - f32[1] == out_h:  # Pillow crops a whole-pixel box of the output's size
        x0, y0 = int(box32[0]), int(box32[1])
        out[...] = image[y0:y0 + out_h, x0:x0 + out_w]
        return out
    x_bounds, x_weights = _weights(src_w, box32[0], box32[2], out_w, bilinear)
    y_bounds, y_weights = _weights(src_h, box32[1], box32[3], out_h, bilinear)
    need_x = out_w != src_w or box32[0] != 0 or box32[2] != out_w
    need_y = out_h != src_h or box32[1] != 0 or box32[3] != out_h
    if not need_x and not need_y:
        out[...] = image
        return out
    rows = np.ascontiguousarray(image).reshape(src_h, src_w * 3)
    target = out if out.flags.c_contiguous else np.empty((out_h, out_w, 3), np.uint8)
    flat = target.reshape(out_h, out_w * 3)
    if not threads or out_h < 2 * BAND_ROWS_MIN:
        bands = [(0, out_h)]
    else:
        edges = np.linspace(0, out_h, THREADS_PER_TASK + 1).astype(int)
        bands = list(zip(edges[:-1].tolist(), edges[1:].tolist()))
    map_threads(lambda band: _resize_rows(rows, x_bounds, x_weights, y_bounds, y_weights, need_x, need_y, *band,
                                          flat), bands)
    if target is not out:
        out[...] = target
    return out
