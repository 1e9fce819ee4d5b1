"""``SyntheticTissue``: the tissue model of one synthetic slide (large-scale fields on a lattice, the lesion) and its
ground truth (``tissue_at``, ``lesion_at``); its pixels come from ``TissueRendering``.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .noise import BASO_EOSIN, BASO_PATCH, E_MAX, F_L, F_T, FADE, LATTICE, NE, detail_sheet, value_noise
from .render import TissueRendering

_CHUNK = 32  # lattice cells per cached field chunk edge (32 cells x 32 px = 1024 level-0 px)
_CACHE_CHUNKS = 512  # cached lattice chunks per slide (~17 kB each)


@dataclass(frozen=True)
class SyntheticTissue(TissueRendering):
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
        p["margin"] = 0.10 * min(w, h) + 2 * LATTICE
        p["offsets"] = [(int(rng.integers(0, detail_sheet(i).period)), int(rng.integers(0, detail_sheet(i).period)))
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
        pad = 2 * step + 2 * LATTICE
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
        t = best + 0.30 * value_noise(u, v, 0.22, salt) + 0.15 * value_noise(u, v, 0.09, salt + 1)
        t = t + 0.05 * value_noise(x, y, 400.0, salt + 2) + 0.025 * value_noise(x, y, 120.0, salt + 3)
        # fade smoothly to background towards the slide borders (tissue never touches the edge)
        # (the fade line is pulled inwards by a random 0-50 % of the margin, so it is not a straight cut)
        m = p["margin"]
        d = np.minimum(np.minimum(x, self.width_px - x), np.minimum(y, self.height_px - y))
        d = d - 0.25 * m * (1.0 + value_noise(x, y, 0.6 * m, salt + 4))
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
        n = 0.30 * value_noise(x, y, 0.45 * r, salt) + 0.12 * value_noise(x, y, 0.15 * r, salt + 1)
        return 1.0 - (a * a + b * b) + n

    def _fields_raw(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(4, ...) float32 at points: tissue T, FADE * nuclear density, eosin scale (LUT units), lesion L."""
        salt = self._p["salt"]
        t = self._tissue_raw(x, y)
        d = 0.24 + 0.14 * value_noise(x, y, 1100.0, salt + 10) + 0.03 * value_noise(x, y, 300.0, salt + 11)
        # cellular, basophilic patches (every slide, both classes): dense nuclei, less eosin, and the renderer adds
        # background hematoxylin above BASO_DENSITY, so benign tissue has hematoxylin-rich areas as real H&E does
        cell = value_noise(x, y, 520.0, salt + 12) + 0.4 * value_noise(x, y, 170.0, salt + 13)
        patch = np.clip((cell - BASO_PATCH[0]) * BASO_PATCH[1], 0.0, 1.0)
        d = FADE * np.clip(d + (BASO_PATCH[2] - d) * patch, 0.04, BASO_PATCH[2])
        ev = 1.0 + 0.12 * value_noise(x, y, 1500.0, salt + 20) + 0.08 * value_noise(x, y, 300.0, salt + 21)
        ev = ev * (1.0 - BASO_EOSIN * patch) * ((NE - 1) / E_MAX)
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
        xs = np.arange(i0, i1 + 1, dtype=np.float64) * LATTICE
        ys = np.arange(j0, j1 + 1, dtype=np.float64) * LATTICE
        return self._fields_raw(xs[None, :], ys[:, None])

    def _interp_grid(self, fx: np.ndarray, fy: np.ndarray, which: Sequence[int]) -> np.ndarray:
        """Lattice fields interpolated at the grid fx (columns) x fy (rows) of level-0 coords -> (k, ny, nx)."""
        gx = np.asarray(fx, np.float64) / LATTICE
        gy = np.asarray(fy, np.float64) / LATTICE
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
        gx = x / LATTICE
        gy = y / LATTICE
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
                return self._fields_raw(i * float(LATTICE), j * float(LATTICE))[which]
        c0 = f(ix, iy)
        r0 = c0 + tx * (f(ix + 1, iy) - c0)
        c1 = f(ix, iy + 1)
        r1 = c1 + tx * (f(ix + 1, iy + 1) - c1)
        return r0 + ty * (r1 - r0)

    def _lesion_grid(self, fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
        v = self._interp_grid(fx, fy, (F_T, F_L))
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
        return self._interp_points(x_l0, y_l0, F_T) > np.float32(thr)

    def lesion_at(self, x_l0: np.ndarray, y_l0: np.ndarray) -> np.ndarray:
        """Ground-truth lesion mask (lesion field > 0 and tissue) at level-0 coordinates."""
        if self._p["lesion"] is None:
            return np.zeros(np.broadcast(np.asarray(x_l0), np.asarray(y_l0)).shape, bool)
        return (self._interp_points(x_l0, y_l0, F_L) > 0) & self.tissue_at(x_l0, y_l0)

    def lesion_at_tiles(self, grid) -> np.ndarray:
        """(rows, cols) bool: whether each tile's centre lies in the lesion, for a
        ``pipeline.slides.tiling.TileGrid`` of this slide (the ground truth a tile-level heatmap is scored against)."""
        rows, cols = np.meshgrid(np.arange(grid.rows), np.arange(grid.cols), indexing="ij")
        half = grid.tile_l0_px / 2
        return self.lesion_at(cols * grid.stride_l0_px + half, rows * grid.stride_l0_px + half)
