"""Building blocks of the synthetic slides: the nominal colours and constants, deterministic value noise on lattice
points, the two periodic detail sheets (fibre texture, nuclei, pixel noise; built once per process) and the
Beer-Lambert colour lookup table.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

#: Version of the rendering recipe in a written slide's ``Spec``: slides written by an earlier one are rewritten
#: (2: H&E-coloured lesion cytoplasm and basophilic cellular patches in all tissue, issue 14).
RENDER_VERSION = 2

#: Nominal background (empty glass) colour.
BACKGROUND_RGB = (240, 238, 242)

LATTICE = 32  # spacing (level-0 px) of the lattice the smooth fields are evaluated on
PAD = 512  # sheet padding = the largest level-0 extent of one render block
MAX_SS = 4  # max supersampling per axis for downsampled levels
BLOCK = 256  # max output block edge (px) per internal render step

# Beer-Lambert colour model: optical density per unit stain amount (RGB), and the lookup table grid.
H_OD = np.array([0.62, 0.80, 0.26])  # hematoxylin: blue-purple
E_OD = np.array([0.05, 0.62, 0.24])  # eosin: pink
NH, _H_MAX = 128, 1.70  # hematoxylin amount levels / range
NE, E_MAX = 64, 1.00  # eosin amount levels / range
NQ = 7  # noise levels (sum of two sheet noises in 0..3 -> 0..6, triangular)
_NOISE_STEP = 1.25  # intensity change per noise level
SH = (NH - 1) / _H_MAX  # stain amount -> LUT level
SE = (NE - 1) / E_MAX
NUC_H = 1.05  # hematoxylin amount of a stroma nucleus (profile 1)
LES_H = 1.10  # ... of a lesion nucleus
LES_CYT_H = (0.06, 0.15) # lesion cytoplasm hematoxylin: base + x fibre texture factor (stain amounts)
LES_CYT_E = (0.12, 0.8)  # lesion cytoplasm eosin: base + x texture factor (x the eosin scale)
FADE = 40.0  # nuclei fade in over a rank interval of 1/FADE around the local density
# Cellular basophilic patches of benign tissue: the patch field (cell noise - threshold) x gain, clipped to [0, 1],
# raises the nuclear density towards its max (third value) and lowers eosin by BASO_EOSIN; above BASO_DENSITY the
# background hematoxylin rises to BASO_H at the max.
BASO_PATCH = (0.55, 3.0, 0.95)
BASO_EOSIN = 0.45
BASO_DENSITY = 0.45
BASO_H = 0.30

# field indices in the lattice arrays
F_T, F_D, F_E, F_L = 0, 1, 2, 3


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


def value_noise(x: np.ndarray, y: np.ndarray, scale: float, salt: int) -> np.ndarray:
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
class DetailSheet:
    """One periodic detail sheet; all channels padded by PAD (wrap) so any block is a plain slice."""

    period: int
    tex: np.ndarray  # float32 eosin factor 0.20 + 0.17 * fibre texture
    nuc: np.ndarray  # float32 stroma nucleus profile [0, 1]
    rk: np.ndarray  # float32 FADE * rank of the stroma nucleus covering the pixel (0 outside nuclei)
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
    return np.ascontiguousarray(np.pad(a, ((0, PAD), (0, PAD)), mode="wrap").astype(dtype))


@functools.lru_cache(maxsize=None)
def detail_sheet(which: int) -> DetailSheet:
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
    les = np.minimum(les, np.clip(FADE * (les_density - lrank), 0, None))
    q = rng.integers(0, 4, (p, p))
    return DetailSheet(p, _pad_wrap(0.20 + 0.17 * tex), _pad_wrap(nuc), _pad_wrap(FADE * rank), _pad_wrap(les),
                  _pad_wrap(q, np.int32))


@functools.lru_cache(maxsize=None)
def lut32() -> np.ndarray:
    """uint32 RGBX lookup table indexed by (hematoxylin level * NE + eosin level) * NQ + noise level."""
    h = np.arange(NH) * (_H_MAX / (NH - 1))
    e = np.arange(NE) * (E_MAX / (NE - 1))
    q = (np.arange(NQ) - (NQ - 1) / 2) * _NOISE_STEP
    od = h[:, None, None] * H_OD + e[None, :, None] * E_OD  # (NH, NE, 3)
    rgb = np.asarray(BACKGROUND_RGB, float) * np.power(10.0, -od)
    rgb = rgb[:, :, None, :] + q[None, None, :, None]
    rgbx = np.zeros((NH * NE * NQ, 4), np.uint8)
    rgbx[:, :3] = np.clip(np.rint(rgb), 0, 255).astype(np.uint8).reshape(-1, 3)
    return rgbx.view("<u4").ravel()


def words_to_rgb(words: np.ndarray) -> np.ndarray:
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
    words = np.take(lut32(), np.arange(NH * NE * NQ - 1, -1, -7)[: 97 * 61].reshape(97, 61))
    try:
        _FAST_RGB = True
        fast = words_to_rgb(words)
        _FAST_RGB = False
        return bool(np.array_equal(fast, words_to_rgb(words)))
    except Exception:  # pragma: no cover - exotic numpy
        _FAST_RGB = False
        return False


_M_RB = np.uint32(0x00FF00FF)


def box_reduce_words(words: np.ndarray, ss: int) -> np.ndarray:
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


def box_reduce_rgb(img: np.ndarray, ss: int) -> np.ndarray:
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
