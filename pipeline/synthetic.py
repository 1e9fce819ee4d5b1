"""Synthetic H&E-like whole-slide images, written as real pyramidal tiled JPEG TIFFs.

Everything here is *procedural*: a pixel's value is a pure function of its level-0 coordinates (and the
slide's seed), so any region of any level can be rendered on demand, in any order and in any pieces, with
identical results.  That lets :func:`write_slide` stream a gigapixel slide tile by tile into tifffile without
ever holding a level in memory.

How a pixel is made
-------------------
* Large-scale fields (tissue, nuclear density, eosin strength, lesion) are evaluated on a fixed lattice of
  level-0 points (spacing :data:`_LATTICE` px, anchored at the origin) and interpolated bilinearly.  Tissue =
  a few random elliptical blobs + fractal value noise, thresholded so that ~``tissue_fraction`` of the slide is
  covered; the lesion = a noisy ellipse placed deep inside tissue, sized to cover ~10-20 % of the tissue.
* Fine detail (collagen fibre texture, nuclei, pixel noise) comes from two precomputed periodic "sheets"
  (periods 769 and 577 px, coprime, so their combination repeats only every ~444k px) sampled at
  ``(x + offset) mod period``; the per-slide offsets depend on the seed.  Every nucleus in a sheet carries a
  random rank in [0, 1); it is drawn where ``rank < local nuclear density`` (fading in over a narrow rank
  band, so a density change across a nucleus dims it rather than cutting it).  The sheets are built once per
  process on first use (~2 s).
* Hematoxylin and eosin amounts are turned into RGB with a Beer-Lambert lookup table (which also holds the
  pixel noise), so the colour step is one gather.
* Lower pyramid levels are rendered with the same function, supersampled (up to 4x4 samples per pixel, exact
  level-0 pixel positions), so level 1 at downsample 4 is exactly the box-filtered level 0.

Speed (one core of a shared 2-core box): level-0 render ~60-70 Mpx/s, render + JPEG ~40 Mpx/s; a full
(1, 4, 16) pyramid ~23 Mpx/s of level-0 area (level 1 costs about as much as level 0 because of the 4x4
supersampling).  A 40000 x 30000 slide writes in about a minute (~190 MB at Q=85).

Coordinates: level-0 pixel ``(i, j)`` covers ``[i, i+1) x [j, j+1)``; its centre is ``(i + 0.5, j + 0.5)``.
:meth:`SyntheticTissue.tissue_at` / :meth:`SyntheticTissue.lesion_at` take continuous level-0 coordinates.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import math
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "SyntheticTissue",
    "write_slide",
    "write_flat_image",
    "make_cohort",
    "slide_levels",
    "BACKGROUND_RGB",
]

#: Nominal background (empty glass) colour.
BACKGROUND_RGB = (240, 238, 242)

_LATTICE = 32  # spacing (level-0 px) of the lattice the smooth fields are evaluated on
_PAD = 512  # sheet padding = the largest level-0 extent of one render block
_MAX_SS = 4  # max supersampling per axis for downsampled levels
_BLOCK = 256  # max output block edge (px) per internal render step

# Beer-Lambert colour model: optical density per unit stain amount (RGB), and the lookup table grid.
_H_OD = np.array([0.62, 0.80, 0.26])  # hematoxylin: blue-purple
_E_OD = np.array([0.05, 0.62, 0.24])  # eosin: pink
_NH, _H_MAX = 128, 1.70  # hematoxylin amount levels / range
_NE, _E_MAX = 64, 1.00  # eosin amount levels / range
_NQ = 7  # noise levels (sum of two sheet noises in 0..3 -> 0..6, triangular)
_NOISE_STEP = 1.25  # intensity change per noise level
_SH = (_NH - 1) / _H_MAX  # stain amount -> LUT level
_SE = (_NE - 1) / _E_MAX
_NUC_H = 1.05  # hematoxylin amount of a stroma nucleus (profile 1)
_LES_H = 1.10  # ... of a lesion nucleus
_FADE = 40.0  # nuclei fade in over a rank interval of 1/_FADE around the local density
_CHUNK = 32  # lattice cells per cached field chunk edge (32 cells x 32 px = 1024 level-0 px)
_CACHE_CHUNKS = 512  # cached lattice chunks per slide (~17 kB each)


# --------------------------------------------------------------------------------------------------------------
# hashing / value noise (used only on lattice points, so cost is negligible)
# --------------------------------------------------------------------------------------------------------------

_M32 = np.uint64(0xFFFFFFFF)


def _hash_u01(ix: np.ndarray, iy: np.ndarray, salt: int) -> np.ndarray:
    """Deterministic uniform [0, 1) value per integer lattice point (vectorised integer hash)."""
    h = ix.astype(np.int64).astype(np.uint64) * np.uint64(0x9E3779B1)
    h = (h + iy.astype(np.int64).astype(np.uint64) * np.uint64(0x85EBCA77) + np.uint64(salt & 0xFFFFFFFF)) & _M32
    h ^= h >> np.uint64(15)
    h = (h * np.uint64(0x2C1B3C6D)) & _M32
    h ^= h >> np.uint64(12)
    h = (h * np.uint64(0x297A2D39)) & _M32
    h ^= h >> np.uint64(15)
    return h.astype(np.float64) * (1.0 / 4294967296.0)


def _value_noise(x: np.ndarray, y: np.ndarray, scale: float, salt: int) -> np.ndarray:
    """Smooth value noise in [-1, 1] with feature size ``scale`` (same units as x, y)."""
    gx = x / scale
    gy = y / scale
    ix = np.floor(gx)
    iy = np.floor(gy)
    fx = gx - ix
    fy = gy - iy
    fx = fx * fx * (3.0 - 2.0 * fx)
    fy = fy * fy * (3.0 - 2.0 * fy)
    ix = ix.astype(np.int64)
    iy = iy.astype(np.int64)
    v00 = _hash_u01(ix, iy, salt)
    v10 = _hash_u01(ix + 1, iy, salt)
    v01 = _hash_u01(ix, iy + 1, salt)
    v11 = _hash_u01(ix + 1, iy + 1, salt)
    v = (v00 * (1 - fx) + v10 * fx) * (1 - fy) + (v01 * (1 - fx) + v11 * fx) * fy
    return 2.0 * v - 1.0


# --------------------------------------------------------------------------------------------------------------
# periodic detail sheets (seed independent, built once per process)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Sheet:
    """One periodic detail sheet; all channels padded by _PAD (wrap) so any block is a plain slice."""

    period: int
    tex: np.ndarray  # float32 eosin factor 0.20 + 0.17 * fibre texture
    nuc: np.ndarray  # float32 stroma nucleus profile [0, 1]
    rk: np.ndarray  # float32 _FADE * rank of the stroma nucleus covering the pixel (0 outside nuclei)
    les: np.ndarray  # float32 lesion nucleus profile, already thresholded on rank (fixed lesion density)
    q: np.ndarray  # int32 pixel noise level 0..3


def _periodic_filtered_noise(rng: np.random.Generator, p: int, angle_deg: float, period_px: float,
                             along_px: float) -> np.ndarray:
    """Periodic (p x p) anisotropic band-pass noise: wavy fibres at ``angle_deg``."""
    white = rng.standard_normal((p, p))
    k = np.fft.fftfreq(p)
    ky, kx = np.meshgrid(k, k, indexing="ij")
    a = math.radians(angle_deg)
    k_along = kx * math.cos(a) + ky * math.sin(a)  # frequency along the fibre direction
    k_across = -kx * math.sin(a) + ky * math.cos(a)
    f0 = 1.0 / period_px
    filt = np.exp(-((k_along * along_px) ** 2)) * np.exp(-(((np.abs(k_across) - f0) / (0.6 * f0)) ** 2))
    out = np.real(np.fft.ifft2(np.fft.fft2(white) * filt))
    out /= out.std() * 2.2
    return np.clip(out, -1.0, 1.0)


def _periodic_smooth_noise(rng: np.random.Generator, p: int, sigma: float) -> np.ndarray:
    white = rng.standard_normal((p, p))
    k = np.fft.fftfreq(p)
    ky, kx = np.meshgrid(k, k, indexing="ij")
    filt = np.exp(-2 * (math.pi * sigma) ** 2 * (kx**2 + ky**2))
    out = np.real(np.fft.ifft2(np.fft.fft2(white) * filt))
    return out / out.std()


def _draw_nuclei(rng: np.random.Generator, p: int, prof: np.ndarray, rank: np.ndarray, chromatin: np.ndarray,
                 *, n_try: int, kind: str, fibre_angle: float) -> None:
    """Dart-throw non-overlapping nuclei on the p x p torus, writing profile and rank in place."""
    cxs = np.empty(n_try)
    cys = np.empty(n_try)
    rbs = np.empty(n_try)
    n = 0
    gap = 2.0 if kind == "stroma" else 1.5
    for _ in range(n_try):
        cx, cy = rng.uniform(0, p, 2)
        if kind == "stroma":
            if rng.random() < 0.6:  # spindle (fibroblast) nucleus along the fibres
                rx, ry = rng.uniform(9, 15), rng.uniform(3.2, 5.0)
                ang = math.radians(fibre_angle + rng.normal(0, 15))
            else:  # round (lymphocyte-like) nucleus
                rx = ry = rng.uniform(5.5, 8.5)
                ang = 0.0
            irr = 0.04
            darkness = rng.uniform(0.75, 1.0)
        else:  # lesion / tumour nuclei: large, pleomorphic
            r = rng.uniform(9, 14.5)
            e = rng.uniform(1.0, 1.45)
            rx, ry = r * math.sqrt(e), r / math.sqrt(e)
            ang = rng.uniform(0, math.pi)
            irr = rng.uniform(0.05, 0.16)
            darkness = rng.uniform(0.7, 1.0)
        rb = max(rx, ry) * (1 + irr)
        if n:
            dx = np.abs(cxs[:n] - cx)
            dy = np.abs(cys[:n] - cy)
            dx = np.minimum(dx, p - dx)
            dy = np.minimum(dy, p - dy)
            if np.any(dx * dx + dy * dy < (rbs[:n] + rb + gap) ** 2):
                continue
        cxs[n], cys[n], rbs[n] = cx, cy, rb
        n += 1
        half = int(math.ceil(rb)) + 2
        xs = np.arange(int(cx) - half, int(cx) + half + 1)
        ys = np.arange(int(cy) - half, int(cy) + half + 1)
        gx, gy = np.meshgrid(xs + 0.5 - cx, ys + 0.5 - cy)
        u = gx * math.cos(ang) + gy * math.sin(ang)
        v = -gx * math.sin(ang) + gy * math.cos(ang)
        theta = np.arctan2(v, u)
        ph1, ph2 = rng.uniform(0, 2 * math.pi, 2)
        radial = 1 + irr * (np.sin(2 * theta + ph1) + 0.6 * np.sin(3 * theta + ph2))
        rr = np.sqrt((u / rx) ** 2 + (v / ry) ** 2) / radial  # 1 at the boundary
        dist_px = (1 - rr) * min(rx, ry)  # ~ distance inside the boundary, px
        edge = np.clip(dist_px / 1.6 + 0.5, 0, 1)
        ix = np.ix_(ys % p, xs % p)
        chrom = chromatin[ix]
        if kind == "stroma":
            body = darkness * (0.80 + 0.20 * chrom)
        else:  # vesicular: darker rim, coarse chromatin, a nucleolus
            rim = np.clip(1.0 - dist_px / 2.5, 0, 1)
            body = darkness * (0.55 + 0.30 * chrom + 0.25 * rim)
            ncx, ncy = rng.uniform(-0.3, 0.3, 2) * min(rx, ry)
            nucleolus = np.exp(-(((gx - ncx) ** 2 + (gy - ncy) ** 2) / 3.0))
            body = np.maximum(body, darkness * nucleolus)
        val = np.clip(body, 0, 1) * edge
        sub_p = prof[ix]
        sub_r = rank[ix]
        m = val > 0
        sub_p[m] = val[m]
        sub_r[m] = rng.random()
        prof[ix] = sub_p
        rank[ix] = sub_r


def _pad_wrap(a: np.ndarray, dtype=np.float32) -> np.ndarray:
    return np.ascontiguousarray(np.pad(a, ((0, _PAD), (0, _PAD)), mode="wrap").astype(dtype))


@functools.lru_cache(maxsize=None)
def _sheet(which: int) -> _Sheet:
    # two sheets with coprime periods; lesion-nucleus density per sheet (A dense, B a sparse overlay)
    p, angle, seed, les_density = {0: (769, 35.0, 1234, 0.88), 1: (577, -25.0, 98765, 0.25)}[which]
    rng = np.random.default_rng(seed)
    tex = _periodic_filtered_noise(rng, p, angle, period_px=14.0, along_px=60.0)
    tex = 0.75 * tex + 0.25 * _periodic_filtered_noise(rng, p, angle + 70, period_px=9.0, along_px=25.0)
    chromatin = np.clip(0.5 + 0.25 * _periodic_smooth_noise(rng, p, 1.0), 0, 1)
    nuc = np.zeros((p, p))
    rank = np.zeros((p, p))
    _draw_nuclei(rng, p, nuc, rank, chromatin, n_try=int(p * p / 35.0**2 * 3), kind="stroma", fibre_angle=angle)
    les = np.zeros((p, p))
    lrank = np.zeros((p, p))
    _draw_nuclei(rng, p, les, lrank, chromatin, n_try=int(p * p / 22.0**2 * 4), kind="lesion", fibre_angle=angle)
    les = np.minimum(les, np.clip(_FADE * (les_density - lrank), 0, None))
    q = rng.integers(0, 4, (p, p))
    return _Sheet(p, _pad_wrap(0.20 + 0.17 * tex), _pad_wrap(nuc), _pad_wrap(_FADE * rank), _pad_wrap(les),
                  _pad_wrap(q, np.int32))


@functools.lru_cache(maxsize=None)
def _lut32() -> np.ndarray:
    """uint32 RGBX lookup table indexed by (hematoxylin level * _NE + eosin level) * _NQ + noise level."""
    h = np.arange(_NH) * (_H_MAX / (_NH - 1))
    e = np.arange(_NE) * (_E_MAX / (_NE - 1))
    q = (np.arange(_NQ) - (_NQ - 1) / 2) * _NOISE_STEP
    od = h[:, None, None] * _H_OD + e[None, :, None] * _E_OD  # (NH, NE, 3)
    rgb = np.asarray(BACKGROUND_RGB, float) * np.power(10.0, -od)
    rgb = rgb[:, :, None, :] + q[None, None, :, None]
    rgbx = np.zeros((_NH * _NE * _NQ, 4), np.uint8)
    rgbx[:, :3] = np.clip(np.rint(rgb), 0, 255).astype(np.uint8).reshape(-1, 3)
    return rgbx.view("<u4").ravel()


def _words_to_rgb(words: np.ndarray) -> np.ndarray:
    """(h, w) uint32 RGBX words -> (h, w, 3) uint8 RGB.

    Stores the 4-byte words at a 3-byte stride into the output buffer (each store's fourth byte is overwritten
    by the next pixel's), several times faster than slicing off the X channel.
    """
    h, w = words.shape
    if _FAST_RGB:
        buf = np.empty(h * w * 3 + 1, np.uint8)
        dst = np.ndarray(shape=(h * w,), dtype="<u4", buffer=buf, offset=0, strides=(3,))
        dst[...] = words.reshape(-1)
        return buf[:-1].reshape(h, w, 3)
    return np.ascontiguousarray(words.astype("<u4", copy=False).view(np.uint8).reshape(h, w, 4)[:, :, :3])


def _check_fast_rgb() -> bool:
    global _FAST_RGB
    words = np.take(_lut32(), np.arange(_NH * _NE * _NQ - 1, -1, -7)[: 97 * 61].reshape(97, 61))
    try:
        _FAST_RGB = True
        fast = _words_to_rgb(words)
        _FAST_RGB = False
        return bool(np.array_equal(fast, _words_to_rgb(words)))
    except Exception:  # pragma: no cover - exotic numpy
        _FAST_RGB = False
        return False


_M_RB = np.uint32(0x00FF00FF)


def _box_reduce_words(words: np.ndarray, ss: int) -> np.ndarray:
    """Rounded mean over ss x ss blocks of RGBX words (ss = 2 or 4), two 16-bit lanes at a time."""
    hh, ww = words.shape[0] // ss, words.shape[1] // ss
    a = words.reshape(hh, ss, ww * ss)
    lo = a[:, 0] & _M_RB  # R and B bytes in 16-bit lanes
    hi = (a[:, 0] >> np.uint32(8)) & _M_RB  # G and X
    for i in range(1, ss):
        lo += a[:, i] & _M_RB
        hi += (a[:, i] >> np.uint32(8)) & _M_RB
    lo3 = lo.reshape(hh, ww, ss)
    hi3 = hi.reshape(hh, ww, ss)
    lo = lo3[:, :, 0].copy()
    hi = hi3[:, :, 0].copy()
    for j in range(1, ss):
        lo += lo3[:, :, j]
        hi += hi3[:, :, j]
    half = np.uint32(((ss * ss) // 2) * 0x00010001)
    shift = np.uint32(2 if ss == 2 else 4)
    lo += half
    hi += half
    lo >>= shift
    lo &= _M_RB
    hi >>= shift
    hi &= _M_RB
    hi <<= np.uint32(8)
    lo |= hi
    return lo


def _box_reduce_rgb(img: np.ndarray, ss: int) -> np.ndarray:
    """Rounded mean over ss x ss blocks of a uint8 (H*ss, W*ss, 3) image (any ss)."""
    hh, ww = img.shape[0] // ss, img.shape[1] // ss
    a = img.reshape(hh, ss, ww * ss * 3)
    r = a[:, 0].astype(np.uint16)
    for i in range(1, ss):
        r += a[:, i]
    r = r.reshape(hh, ww, ss * 3)
    acc = r[:, :, 0:3].copy()
    for j in range(1, ss):
        acc += r[:, :, 3 * j:3 * j + 3]
    acc += (ss * ss) // 2
    acc //= ss * ss
    return acc.astype(np.uint8)


_FAST_RGB = False
_FAST_RGB = _check_fast_rgb()


# --------------------------------------------------------------------------------------------------------------
# the tissue model
# --------------------------------------------------------------------------------------------------------------


def _affine_samples(start_px: int, n: int, ds: float, ss: int) -> tuple[np.ndarray, int | None]:
    """Level-0 integer sample coordinates for ``n`` output pixels from ``start_px`` at downsample ``ds``
    (``ss`` samples per output pixel, output pixel i's samples at positions i*ss .. i*ss+ss-1).

    Returns (coords, step); step is the integer stride when the coordinates are an arithmetic progression
    (then the detail sheets are sliced, not gathered), else None.
    """
    if ds == 1.0 and ss == 1:
        return np.arange(start_px, start_px + n, dtype=np.int64), 1
    s = ds / ss
    if float(ds).is_integer() and float(s).is_integer():
        s_i = int(s)
        base = int(start_px) * int(ds) + s_i // 2
        return base + np.arange(n * ss, dtype=np.int64) * s_i, s_i
    t = start_px + np.arange(n)[:, None] + (np.arange(ss)[None, :] + 0.5) / ss
    return np.floor(t.ravel() * ds).astype(np.int64), None


# field indices in the lattice arrays
_F_T, _F_D, _F_E, _F_L = 0, 1, 2, 3


@dataclass(frozen=True)
class SyntheticTissue:
    """A procedural H&E-like slide of ``width_px`` x ``height_px`` level-0 pixels (see the module docstring).

    ``render`` gives any region of any downsample; ``tissue_at`` / ``lesion_at`` are the ground truth.
    Instances are cheap to build (~20-100 ms), thread-safe, and pickle by their parameters.
    """

    width_px: int
    height_px: int
    seed: int = 0
    lesion: bool = False
    tissue_fraction: float = 0.5
    lesion_fraction: float | None = None  # lesion area / tissue area; None -> drawn in [0.10, 0.20] from the seed
    _p: dict = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.width_px < 1 or self.height_px < 1:
            raise ValueError("width_px and height_px must be >= 1")
        if not 0.0 <= self.tissue_fraction <= 1.0:
            raise ValueError("tissue_fraction must be in [0, 1]")
        if self.lesion_fraction is not None and not 0.0 < self.lesion_fraction < 1.0:
            raise ValueError("lesion_fraction must be in (0, 1)")
        self._build()

    def __reduce__(self):
        return (SyntheticTissue, (self.width_px, self.height_px, self.seed, self.lesion, self.tissue_fraction,
                                  self.lesion_fraction))

    # ---------------------------------------------------------------- set-up
    def _build(self) -> None:
        w, h = self.width_px, self.height_px
        s = float(max(w, h))
        rng = np.random.default_rng([self.seed, 0x5EED])
        p: dict = {"S": s, "salt": int(rng.integers(1, 2**31)), "lesion": None, "thr": math.inf, "kT": 1.0,
                   "kL": 1.0, "lesion_box": None, "cache": OrderedDict(), "lock": threading.Lock()}
        object.__setattr__(self, "_p", p)
        blobs = []
        for _ in range(int(rng.integers(2, 5))):
            cx = rng.uniform(0.3, 0.7) * w / s
            cy = rng.uniform(0.3, 0.7) * h / s
            sa = rng.uniform(0.10, 0.20)
            sb = sa * rng.uniform(0.5, 1.0)
            ang = rng.uniform(0, math.pi)
            blobs.append((cx, cy, sa, sb, math.cos(ang), math.sin(ang)))
        p["blobs"] = blobs
        p["margin"] = 0.10 * min(w, h) + 2 * _LATTICE
        p["offsets"] = [(int(rng.integers(0, _sheet(i).period)), int(rng.integers(0, _sheet(i).period)))
                        for i in (0, 1)]
        # calibration grid (pixel centres of a coarse grid)
        step = max(1.0, s / 320)
        gx = np.arange(step / 2, w, step)
        gy = np.arange(step / 2, h, step)
        X, Y = np.meshgrid(gx, gy)
        t = self._tissue_raw(X, Y)
        if self.tissue_fraction >= 1.0:
            p["thr"] = -math.inf
        elif self.tissue_fraction > 0.0:
            p["thr"] = float(np.quantile(t, 1.0 - self.tissue_fraction))
            p["kT"] = self._edge_gain(t, p["thr"], step, edge_px=2.5)
        tissue = t > p["thr"]
        p["tissue_area_frac"] = float(tissue.mean())
        if self.lesion and tissue.sum() >= 4:
            self._place_lesion(rng, X, Y, tissue, step)

    @staticmethod
    def _edge_gain(t: np.ndarray, thr: float, step: float, edge_px: float) -> float:
        """Gain k so that clip(0.5 + (t - thr) * k) ramps over ~edge_px level-0 px at the boundary."""
        gy, gx = np.gradient(t, step)
        g = np.hypot(gx, gy)
        near = np.abs(t - thr) < 0.05 * (np.ptp(t) + 1e-12)
        gm = float(np.median(g[near])) if near.any() else float(np.median(g))
        return 1.0 / max(edge_px * max(gm, 1e-9), 1e-12)

    def _place_lesion(self, rng: np.random.Generator, X: np.ndarray, Y: np.ndarray, tissue: np.ndarray,
                      step: float) -> None:
        from scipy import ndimage

        p = self._p
        frac = self.lesion_fraction if self.lesion_fraction is not None else float(rng.uniform(0.10, 0.20))
        dist = ndimage.distance_transform_edt(tissue)
        deep = tissue & (dist >= np.quantile(dist[tissue], 0.9))  # centre among the deepest 10 % of tissue
        cand = np.flatnonzero(deep)
        c = int(cand[rng.integers(0, cand.size)])
        ang = rng.uniform(0, math.pi)
        les = {"cx": float(X.flat[c]), "cy": float(Y.flat[c]), "cos": math.cos(ang), "sin": math.sin(ang),
               "ecc": float(rng.uniform(0.65, 1.0)), "r": 1.0, "salt": int(rng.integers(1, 2**31))}
        p["lesion"] = les
        target = frac * tissue.sum()
        lo, hi = 0.0, p["S"]
        for _ in range(24):  # bisection on the radius for the wanted lesion area within tissue
            les["r"] = 0.5 * (lo + hi)
            area = ((self._lesion_raw(X, Y) > 0) & tissue).sum()
            lo, hi = (les["r"], hi) if area < target else (lo, les["r"])
        les["r"] = 0.5 * (lo + hi)
        lf = self._lesion_raw(X, Y)
        p["kL"] = self._edge_gain(lf, 0.0, step, edge_px=4.0)
        # bounding box: conservative box from the lattice, then the exact mask on a grid of pixel centres
        m = (lf > 0) & tissue
        if not m.any():
            return
        ys, xs = np.nonzero(m)
        pad = 2 * step + 2 * _LATTICE
        x0 = int(max(0, math.floor(X[0, xs.min()] - pad)))
        x1 = int(min(self.width_px, math.ceil(X[0, xs.max()] + pad)))
        y0 = int(max(0, math.floor(Y[ys.min(), 0] - pad)))
        y1 = int(min(self.height_px, math.ceil(Y[ys.max(), 0] + pad)))
        fstep = max(1, int(math.ceil(max(x1 - x0, y1 - y0) / 1024)))
        fx = np.arange(x0, x1, fstep) + 0.5
        fy = np.arange(y0, y1, fstep) + 0.5
        fm = self._lesion_grid(fx, fy)
        ys, xs = np.nonzero(fm)
        if xs.size:
            bx0 = int(max(0, fx[xs.min()] - 0.5 - (fstep - 1)))
            by0 = int(max(0, fy[ys.min()] - 0.5 - (fstep - 1)))
            bx1 = int(min(self.width_px, fx[xs.max()] + 0.5 + (fstep - 1)))
            by1 = int(min(self.height_px, fy[ys.max()] + 0.5 + (fstep - 1)))
            p["lesion_box"] = (bx0, by0, bx1 - bx0, by1 - by0)

    # ---------------------------------------------------------------- analytic fields (any float coords)
    def _tissue_raw(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        p = self._p
        s = p["S"]
        u = x / s
        v = y / s
        best = np.zeros(np.broadcast(u, v).shape)
        for cx, cy, sa, sb, c, sn in p["blobs"]:
            du = u - cx
            dv = v - cy
            a = (du * c + dv * sn) / sa
            b = (-du * sn + dv * c) / sb
            best = np.maximum(best, 1.0 / (1.0 + 0.5 * (a * a + b * b)) ** 2)
        salt = p["salt"]
        t = best + 0.30 * _value_noise(u, v, 0.22, salt) + 0.15 * _value_noise(u, v, 0.09, salt + 1)
        t = t + 0.05 * _value_noise(x, y, 400.0, salt + 2) + 0.025 * _value_noise(x, y, 120.0, salt + 3)
        # fade smoothly to background towards the slide borders (tissue never touches the edge)
        # (the fade line is pulled inwards by a random 0-50 % of the margin, so it is not a straight cut)
        m = p["margin"]
        d = np.minimum(np.minimum(x, self.width_px - x), np.minimum(y, self.height_px - y))
        d = d - 0.25 * m * (1.0 + _value_noise(x, y, 0.6 * m, salt + 4))
        f = np.clip(1.0 - d / m, 0.0, 2.0)
        return t - 3.0 * f * f

    def _lesion_raw(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        les = self._p["lesion"]
        if les is None:
            return np.full(np.broadcast(x, y).shape, -1.0)
        dx = x - les["cx"]
        dy = y - les["cy"]
        r = les["r"]
        a = (dx * les["cos"] + dy * les["sin"]) / r
        b = (-dx * les["sin"] + dy * les["cos"]) / (r * les["ecc"])
        salt = les["salt"]
        n = 0.30 * _value_noise(x, y, 0.45 * r, salt) + 0.12 * _value_noise(x, y, 0.15 * r, salt + 1)
        return 1.0 - (a * a + b * b) + n

    def _fields_raw(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(4, ...) float32 at points: tissue T, _FADE * nuclear density, eosin scale (LUT units), lesion L."""
        salt = self._p["salt"]
        t = self._tissue_raw(x, y)
        d = 0.24 + 0.14 * _value_noise(x, y, 1100.0, salt + 10) + 0.03 * _value_noise(x, y, 300.0, salt + 11)
        d = _FADE * np.clip(d, 0.04, 0.6)
        ev = 1.0 + 0.12 * _value_noise(x, y, 1500.0, salt + 20) + 0.08 * _value_noise(x, y, 300.0, salt + 21)
        ev = ev * ((_NE - 1) / _E_MAX)
        lf = self._lesion_raw(x, y)
        return np.stack(np.broadcast_arrays(t, d, ev, lf)).astype(np.float32)

    def _lattice(self, i0: int, i1: int, j0: int, j1: int) -> np.ndarray:
        """Fields at lattice points i0..i1 (x) x j0..j1 (y), inclusive -> (4, nj, ni) float32 (cached chunks)."""
        c = _CHUNK
        ci, cj = i0 // c, j0 // c
        if i1 <= ci * c + c and j1 <= cj * c + c:  # inside one cached chunk
            p = self._p
            key = (ci, cj)
            with p["lock"]:
                chunk = p["cache"].get(key)
                if chunk is not None:
                    p["cache"].move_to_end(key)
            if chunk is None:
                chunk = self._lattice_direct(ci * c, ci * c + c, cj * c, cj * c + c)
                with p["lock"]:
                    p["cache"][key] = chunk
                    while len(p["cache"]) > _CACHE_CHUNKS:
                        p["cache"].popitem(last=False)
            return chunk[:, j0 - cj * c:j1 - cj * c + 1, i0 - ci * c:i1 - ci * c + 1]
        return self._lattice_direct(i0, i1, j0, j1)

    def _lattice_direct(self, i0: int, i1: int, j0: int, j1: int) -> np.ndarray:
        xs = np.arange(i0, i1 + 1, dtype=np.float64) * _LATTICE
        ys = np.arange(j0, j1 + 1, dtype=np.float64) * _LATTICE
        return self._fields_raw(xs[None, :], ys[:, None])

    def _interp_grid(self, fx: np.ndarray, fy: np.ndarray, which: Sequence[int]) -> np.ndarray:
        """Lattice fields interpolated at the grid fx (columns) x fy (rows) of level-0 coords -> (k, ny, nx)."""
        gx = np.asarray(fx, np.float64) / _LATTICE
        gy = np.asarray(fy, np.float64) / _LATTICE
        ixf = np.floor(gx)
        iyf = np.floor(gy)
        tx = (gx - ixf).astype(np.float32)
        ty = (gy - iyf).astype(np.float32)[:, None]
        i0, j0 = int(ixf.min()), int(iyf.min())
        lat = self._lattice(i0, int(ixf.max()) + 1, j0, int(iyf.max()) + 1)[list(which)]
        ix = ixf.astype(np.int64) - i0
        iy = iyf.astype(np.int64) - j0
        c0 = lat[:, :, ix]
        rows = c0 + tx * (lat[:, :, ix + 1] - c0)
        r0 = rows[:, iy]
        return r0 + ty * (rows[:, iy + 1] - r0)

    def _interp_points(self, x: np.ndarray, y: np.ndarray, which: int) -> np.ndarray:
        """One lattice field interpolated at arbitrary points (same arithmetic as the renderer)."""
        x, y = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(y, np.float64))
        if x.size == 0:
            return np.zeros(x.shape, np.float32)
        gx = x / _LATTICE
        gy = y / _LATTICE
        ixf = np.floor(gx)
        iyf = np.floor(gy)
        tx = (gx - ixf).astype(np.float32)
        ty = (gy - iyf).astype(np.float32)
        i0, i1, j0, j1 = int(ixf.min()), int(ixf.max()) + 1, int(iyf.min()), int(iyf.max()) + 1
        ix = ixf.astype(np.int64)
        iy = iyf.astype(np.int64)
        if (i1 - i0 + 1) * (j1 - j0 + 1) <= 4_000_000:
            lat = self._lattice(i0, i1, j0, j1)[which]
            ix -= i0
            iy -= j0

            def f(i, j):
                return lat[j, i]
        else:
            def f(i, j):
                return self._fields_raw(i * float(_LATTICE), j * float(_LATTICE))[which]
        c0 = f(ix, iy)
        r0 = c0 + tx * (f(ix + 1, iy) - c0)
        c1 = f(ix, iy + 1)
        r1 = c1 + tx * (f(ix + 1, iy + 1) - c1)
        return r0 + ty * (r1 - r0)

    def _lesion_grid(self, fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
        v = self._interp_grid(fx, fy, (_F_T, _F_L))
        return (v[0] > np.float32(self._p["thr"])) & (v[1] > 0)

    # ---------------------------------------------------------------- public ground truth
    @property
    def lesion_box_l0(self) -> tuple[int, int, int, int] | None:
        """(x, y, w, h) level-0 bounding box of the planted lesion (of ``lesion_at`` on pixel centres)."""
        return self._p["lesion_box"] if self._p["lesion"] is not None else None

    @property
    def tissue_area_fraction(self) -> float:
        """Measured fraction of the slide covered by tissue (coarse grid)."""
        return self._p["tissue_area_frac"]

    def tissue_at(self, x_l0: np.ndarray, y_l0: np.ndarray) -> np.ndarray:
        """Ground-truth tissue mask at level-0 coordinates (pixel (i, j) has its centre at (i + .5, j + .5))."""
        thr = self._p["thr"]
        if not math.isfinite(thr):
            return np.full(np.broadcast(np.asarray(x_l0), np.asarray(y_l0)).shape, thr < 0)
        return self._interp_points(x_l0, y_l0, _F_T) > np.float32(thr)

    def lesion_at(self, x_l0: np.ndarray, y_l0: np.ndarray) -> np.ndarray:
        """Ground-truth lesion mask (lesion field > 0 and tissue) at level-0 coordinates."""
        if self._p["lesion"] is None:
            return np.zeros(np.broadcast(np.asarray(x_l0), np.asarray(y_l0)).shape, bool)
        return (self._interp_points(x_l0, y_l0, _F_L) > 0) & self.tissue_at(x_l0, y_l0)

    def lesion_at_tiles(self, grid) -> np.ndarray:
        """(rows, cols) bool: whether each tile's centre lies in the lesion, for a
        ``pipeline.slides.tiling.TileGrid`` of this slide (the ground truth a tile-level heatmap is scored against)."""
        rows, cols = np.meshgrid(np.arange(grid.rows), np.arange(grid.cols), indexing="ij")
        half = grid.tile_l0_px / 2
        return self.lesion_at(cols * grid.stride_l0_px + half, rows * grid.stride_l0_px + half)

    # ---------------------------------------------------------------- rendering
    def render(self, x0: int, y0: int, w: int, h: int, downsample: float = 1.0) -> np.ndarray:
        """uint8 RGB (h, w, 3) of the region at (x0, y0) in the coordinates of the level with ``downsample``.

        Output pixel (i, j) averages the level-0 pixels around ((x0 + i + .5) * ds, (y0 + j + .5) * ds)
        (up to 4 x 4 samples; for ds = 4 exactly the 4 x 4 level-0 block).  Deterministic and split-invariant.
        """
        x0, y0, w, h = int(x0), int(y0), int(w), int(h)
        ds = float(downsample)
        if not ds > 0:
            raise ValueError("downsample must be > 0")
        if w <= 0 or h <= 0:
            return np.empty((max(h, 0), max(w, 0), 3), np.uint8)
        words_out = np.empty((h, w), np.uint32)
        ss = 1 if ds <= 1 else min(_MAX_SS, int(math.ceil(ds - 1e-9)))
        bs = max(1, min(_BLOCK, int(_PAD // max(ds, 1.0))))
        # blocks aligned to multiples of bs in level coordinates, so tiles map onto whole lattice chunks
        bys = list(range(y0 - y0 % bs, y0 + h, bs))
        bxs = list(range(x0 - x0 % bs, x0 + w, bs))
        for by in bys:
            ya, yb = max(by, y0), min(by + bs, y0 + h)
            ys, ystep = _affine_samples(ya, yb - ya, ds, ss)
            for bx in bxs:
                xa, xb = max(bx, x0), min(bx + bs, x0 + w)
                xs, xstep = _affine_samples(xa, xb - xa, ds, ss)
                words = self._render_samples(xs, xstep, ys, ystep)
                if ss in (2, 4):
                    words = _box_reduce_words(words, ss)
                elif ss > 1:
                    words = _box_reduce_rgb(_words_to_rgb(words), ss)
                    words = np.pad(words, ((0, 0), (0, 0), (0, 1))).view("<u4")[:, :, 0]
                words_out[ya - y0:yb - y0, xa - x0:xb - x0] = words
        return _words_to_rgb(words_out)

    def _render_samples(self, xs: np.ndarray, xstep: int | None, ys: np.ndarray, ystep: int | None) -> np.ndarray:
        """Point samples at level-0 pixels xs (columns) x ys (rows) -> uint32 RGBX words (len(ys), len(xs))."""
        p = self._p
        nx, ny = xs.size, ys.size
        f32 = np.float32

        def take(sheet: _Sheet, off: tuple[int, int], names: Sequence[str]) -> list[np.ndarray]:
            per = sheet.period
            ax = (int(xs[0]) + off[0]) % per
            ay = (int(ys[0]) + off[1]) % per
            if xstep is not None and ystep is not None:
                sl = (slice(ay, ay + (ny - 1) * ystep + 1, ystep), slice(ax, ax + (nx - 1) * xstep + 1, xstep))
                return [getattr(sheet, nm)[sl] for nm in names]
            ix = np.ix_(ay + (ys - ys[0]), ax + (xs - xs[0]))
            return [getattr(sheet, nm)[ix] for nm in names]

        sa, sb = _sheet(0), _sheet(1)
        offa, offb = p["offsets"]
        (qa,) = take(sa, offa, ("q",))
        (qb,) = take(sb, offb, ("q",))

        thr = p["thr"]
        if thr == math.inf:  # blank slide
            return np.take(_lut32(), qa + qb)

        # smooth fields: lattice covering this block
        gx = (xs + 0.5) / _LATTICE
        ixf = np.floor(gx)
        gy = (ys + 0.5) / _LATTICE
        iyf = np.floor(gy)
        i0, i1 = int(ixf[0]), int(ixf[-1]) + 1
        j0, j1 = int(iyf[0]), int(iyf[-1]) + 1
        lat = self._lattice(i0, i1, j0, j1)  # (4, nj, ni)
        kT = p["kT"]
        half_t = 0.5 / kT
        eps = 1e-4 * (abs(thr) + 1.0) if math.isfinite(thr) else 0.0
        if float(lat[_F_T].max()) < thr - half_t - eps:  # glass only
            return np.take(_lut32(), qa + qb)
        full = float(lat[_F_T].min()) > thr + half_t + eps
        has_les = p["lesion"] is not None and float(lat[_F_L].max()) > -0.5 / p["kL"] - 1e-4
        wanted = [_F_D, _F_E] + ([] if full else [_F_T]) + ([_F_L] if has_les else [])

        # separable bilinear interpolation: along x on the lattice rows, then per run of rows along y
        tx = (gx - ixf).astype(f32)
        ty = (gy - iyf).astype(f32)
        ix = ixf.astype(np.int64) - i0
        iy = iyf.astype(np.int64) - j0
        lx = lat[wanted]
        c0 = lx[:, :, ix]
        rows = c0 + tx * (lx[:, :, ix + 1] - c0)  # (k, nj, nx)
        drows = rows[:, 1:] - rows[:, :-1]
        fld = np.empty((len(wanted), ny, nx), f32)
        cuts = np.flatnonzero(np.diff(iy)) + 1
        starts = np.concatenate(([0], cuts))
        ends = np.concatenate((cuts, [ny]))
        for a, b in zip(starts.tolist(), ends.tolist()):
            j = int(iy[a])
            seg = fld[:, a:b]
            np.multiply(ty[a:b, None], drows[:, j, None, :], out=seg)
            seg += rows[:, j, None, :]
        kd, ev = fld[0], fld[1]

        ta, na, ra = take(sa, offa, ("tex", "nuc", "rk"))
        tb, nb, rb = take(sb, offb, ("tex", "nuc", "rk"))
        # nuclei: drawn where rank < density, fading in over a small rank interval
        nuc = np.subtract(kd, ra)
        np.minimum(nuc, na, out=nuc)
        tmp = np.subtract(kd, rb)
        np.minimum(tmp, nb, out=tmp)
        np.maximum(nuc, tmp, out=nuc)
        np.maximum(nuc, f32(0), out=nuc)
        # eosin (LUT units): fibrous pink stroma with pale gaps, less eosin over nuclei
        e = np.add(ta, tb)
        e *= ev
        np.maximum(e, f32(0.04 * _SE), out=e)
        np.multiply(nuc, f32(0.12 * _SE), out=tmp)
        e -= tmp
        # hematoxylin (LUT units): faint background + nuclei
        hem = np.multiply(nuc, f32(_NUC_H * _SH))
        hem += f32(0.05 * _SH)
        if has_les:
            les = fld[-1]
            les *= f32(p["kL"])
            les += f32(0.5)
            np.clip(les, 0, 1, out=les)
            (la,) = take(sa, offa, ("les",))
            (lb,) = take(sb, offb, ("les",))
            lnuc = np.maximum(la, lb)
            # lesion: purple cytoplasm, little eosin, dense large nuclei
            hem_les = lnuc * f32(_LES_H * _SH) + (tb * f32(0.6 * _SH) + f32(0.18 * _SH))
            e_les = ev * (ta * f32(0.3) + f32(0.18)) - lnuc * f32(0.10 * _SE)
            hem += les * (hem_les - hem)
            e += les * (e_les - e)
        if not full:
            alpha = fld[2]
            alpha *= f32(kT)
            alpha += f32(0.5 - thr * kT)
            np.clip(alpha, 0, 1, out=alpha)
            hem *= alpha
            e *= alpha
        # quantise and look up colours
        hem += f32(0.5)
        np.clip(hem, 0, _NH - 1, out=hem)
        e += f32(0.5)
        np.clip(e, 0, _NE - 1, out=e)
        idx = hem.astype(np.int32)
        idx *= _NE
        idx += e.astype(np.int32)
        idx *= _NQ
        idx += qa
        idx += qb
        return np.take(_lut32(), idx)


# --------------------------------------------------------------------------------------------------------------
# writing slides
# --------------------------------------------------------------------------------------------------------------


def slide_levels(width_px: int, height_px: int, levels: Sequence[float] = (1, 4, 16),
                 tile_px: int = 256) -> list[tuple[float, int, int]]:
    """(downsample, width, height) of the pyramid levels :func:`write_slide` writes.

    Level k has size ``(W // ds, H // ds)``; a level (other than the first) whose width and height are both
    smaller than one tile is skipped.
    """
    out = []
    for i, ds in enumerate(levels):
        lw, lh = int(width_px // ds), int(height_px // ds)
        if i == 0:
            if ds != 1:
                raise ValueError("the first level must have downsample 1")
            out.append((1.0, width_px, height_px))
            continue
        if lw < 1 or lh < 1 or (lw < tile_px and lh < tile_px):
            continue
        out.append((float(ds), lw, lh))
    return out


def _tiles(tissue: SyntheticTissue, lw: int, lh: int, ds: float, tile: int) -> Iterator[np.ndarray]:
    for ty in range(0, lh, tile):
        for tx in range(0, lw, tile):
            # full tiles (the renderer is defined beyond the edge; better JPEG edges than zero padding)
            yield tissue.render(tx, ty, tile, tile, downsample=ds)


def _atomic_target(path: Path) -> Path:
    """A unique temporary name next to ``path`` (same filesystem, so os.replace is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.partial")


def write_slide(path: str | os.PathLike, tissue: SyntheticTissue, *, mpp: float | None = 0.25,
                levels: Sequence[float] = (1, 4, 16), tile_px: int = 256, quality: int = 85,
                style: str = "aperio", objective_power: float | None = 40, maxworkers: int = 1,
                bigtiff: bool | None = None) -> Path:
    """Write ``tissue`` as a pyramidal tiled JPEG TIFF (one tiled page per level), streaming tile by tile.

    style="aperio": Aperio-style ImageDescription on every level page (OpenSlide vendor "aperio",
    openslide.mpp-x = mpp, openslide.objective-power = objective_power).  style="generic": plain pyramidal
    TIFF with resolution tags in centimetres (OpenSlide vendor "generic-tiff", mpp from the tags).
    mpp=None: no MPP in the description and resolution unit NONE, so OpenSlide reports no mpp.
    The file is written to a temporary name in the same directory and renamed into place.
    ``maxworkers`` = JPEG encoding threads in tifffile (rendering stays in the calling thread).
    """
    import tifffile

    path = Path(path)
    if style not in ("aperio", "generic"):
        raise ValueError("style must be 'aperio' or 'generic'")
    if tile_px % 16:
        raise ValueError("tile_px must be a multiple of 16")
    lv = slide_levels(tissue.width_px, tissue.height_px, levels, tile_px)
    w0, h0 = tissue.width_px, tissue.height_px
    if bigtiff is None:
        bigtiff = w0 * h0 * 3 > 2**31  # classic TIFF is plenty for small slides
    tmp = _atomic_target(path)
    try:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
            for i, (ds, lw, lh) in enumerate(lv):
                kw: dict = {}
                if style == "aperio":
                    desc = (f"Aperio Image Library v12.0.5\r\n{w0}x{h0} [0,0 {w0}x{h0}] ({tile_px}x{tile_px})"
                            + (f" -> {lw}x{lh}" if i else "") + f" JPEG/RGB Q={quality}")
                    if i == 0:
                        if objective_power is not None:
                            desc += f"|AppMag = {objective_power:g}"
                        if mpp is not None:
                            desc += f"|MPP = {mpp:g}"
                        desc += f"|Filename = {path.stem}|Synthetic = 1|Seed = {tissue.seed}"
                        desc += f"|Spec = {slide_spec(tissue, mpp, levels, tile_px, quality)}"
                    kw["description"] = desc
                if mpp is not None and style == "generic":
                    m = mpp * ds
                    kw["resolution"] = (1e4 / m, 1e4 / m)
                    kw["resolutionunit"] = "CENTIMETER"
                else:
                    kw["resolution"] = (1, 1)
                    kw["resolutionunit"] = "NONE"
                tif.write(
                    _tiles(tissue, lw, lh, ds, tile_px),
                    shape=(lh, lw, 3),
                    dtype="uint8",
                    tile=(tile_px, tile_px),
                    photometric="rgb",
                    compression="jpeg",
                    compressionargs={"level": int(quality)},
                    subfiletype=1 if i else 0,
                    metadata=None,
                    maxworkers=maxworkers,
                    software=False,
                    **kw,
                )
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_flat_image(path: str | os.PathLike, tissue: SyntheticTissue, *, fmt: str = "png",
                     downsample: float = 1.0, quality: int = 90) -> Path:
    """Write a small plain (non-pyramidal, untiled) image of the whole slide: PNG, JPEG or strip TIFF."""
    path = Path(path)
    fmt = fmt.lower()
    if fmt == "jpg":
        fmt = "jpeg"
    if fmt not in ("png", "jpeg", "tiff", "tif"):
        raise ValueError("fmt must be 'png', 'jpeg' or 'tiff'")
    w = max(1, int(tissue.width_px // downsample))
    h = max(1, int(tissue.height_px // downsample))
    if w * h > 200_000_000:
        raise ValueError("write_flat_image is for small images (< 200 Mpx)")
    img = tissue.render(0, 0, w, h, downsample=downsample)
    buf = io.BytesIO()
    if fmt in ("tiff", "tif"):
        import tifffile

        tifffile.imwrite(buf, img, photometric="rgb", metadata=None)
    else:
        from PIL import Image

        if fmt == "png":
            Image.fromarray(img).save(buf, format="PNG")
        else:
            Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    tmp = _atomic_target(path)
    try:
        with open(tmp, "xb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------------------------------------------
# demo cohort
# --------------------------------------------------------------------------------------------------------------


def slide_spec(tissue: SyntheticTissue, mpp: float | None, levels: Sequence[float], tile_px: int,
               quality: int) -> str:
    """Digest of everything that shapes a written Aperio-style slide (stored in its description as ``Spec``)."""
    payload = {"tissue": [tissue.width_px, tissue.height_px, tissue.seed, tissue.lesion, tissue.tissue_fraction,
                          tissue.lesion_fraction],
               "mpp": mpp, "levels": [float(x) for x in levels], "tile_px": tile_px, "quality": quality}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _written_spec(path: Path) -> str | None:
    """The ``Spec`` a slide was written with (None: not ours, unreadable, or written before specs were stored)."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            fields = dict(part.split(" = ", 1) for part in (tf.pages[0].description or "").split("|")[1:]
                          if " = " in part)
        return fields.get("Spec")
    except Exception:
        return None


def make_cohort(out_dir: str | os.PathLike, n_per_class: int = 6, width_px: int = 6000, height_px: int = 4500,
                mpp: float | None = 0.25, seed: int = 0, *, levels: Sequence[float] = (1, 4, 16),
                quality: int = 85, tissue_fraction: tuple[float, float] = (0.35, 0.6),
                lesion_fraction: tuple[float, float] | None = None, verbose: bool = False) -> Path:
    """Write a two-class demo cohort: ``<out_dir>/<slide_id>.svs`` (Aperio-style TIFF) + ``labels.csv``.

    Class 0 slides have no lesion, class 1 slides have a planted lesion covering a share of the tissue drawn from
    ``lesion_fraction`` (None: 10-20 %); tissue shape and placement vary with each slide's seed.  Slides that already
    exist from the same plan entry and settings (``slide_spec``) are kept, so reruns are quick and a changed cohort is
    rewritten.
    ``labels.csv`` has the header ``slide_id,label`` and integer labels 0/1.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tile_px = 256
    rows = []
    for sid, lab, tissue in cohort_plan(n_per_class, width_px, height_px, seed, tissue_fraction, lesion_fraction):
        rows.append((sid, lab))
        path = out / f"{sid}.svs"
        # kept only when written from the same plan entry: a cohort of another size or seed gives slide i
        # another label and lesion
        if path.exists() and _written_spec(path) == slide_spec(tissue, mpp, levels, tile_px, quality):
            continue
        if verbose:
            print(f"writing {path} (label {lab})", flush=True)
        write_slide(path, tissue, mpp=mpp, levels=levels, tile_px=tile_px, quality=quality, style="aperio")
    text = "slide_id,label\n" + "".join(f"{s},{lab}\n" for s, lab in rows)
    lab_path = out / "labels.csv"
    if not (lab_path.exists() and lab_path.read_text() == text):
        tmp = _atomic_target(lab_path)
        with open(tmp, "x", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows([("slide_id", "label"), *rows])
        os.replace(tmp, lab_path)
    return out


def cohort_plan(n_per_class: int = 6, width_px: int = 6000, height_px: int = 4500, seed: int = 0,
                tissue_fraction: tuple[float, float] = (0.35, 0.6),
                lesion_fraction: tuple[float, float] | None = None) -> list[tuple[str, int, SyntheticTissue]]:
    """(slide_id, label, tissue) of every slide ``make_cohort`` writes with these arguments: the ground truth."""
    n = 2 * int(n_per_class)
    rng = np.random.default_rng([seed, 0xC0])
    labels = np.array([0, 1] * int(n_per_class))
    rng.shuffle(labels)  # slide ids do not give the class away
    plan = []
    for i in range(n):
        lab = int(labels[i])
        rng_i = _rng_for(seed, i)
        tf = float(rng_i.uniform(*tissue_fraction))
        lf = float(rng_i.uniform(*lesion_fraction)) if lesion_fraction is not None and lab else None
        tissue = SyntheticTissue(width_px, height_px, seed=seed * 100003 + i, lesion=bool(lab), tissue_fraction=tf,
                                 lesion_fraction=lf)
        plan.append((f"slide_{i:03d}", lab, tissue))
    return plan


def _rng_for(seed: int, i: int) -> np.random.Generator:
    """Per-slide generator for cohort parameters (independent of how many slides are made)."""
    return np.random.default_rng([seed, i, 0xC1])
