"""Rendering a synthetic slide's pixels: any region of any level, supersampled from level-0 positions
(``TissueRendering``, the rendering half of ``SyntheticTissue``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .noise import (BASO_DENSITY, BASO_H, BASO_PATCH, BLOCK, F_D, F_E, F_L, F_T, FADE, LATTICE, LES_CYT_E, LES_CYT_H,
                    LES_H, MAX_SS, NE, NH, NQ, NUC_H, PAD, SE, SH, DetailSheet, box_reduce_rgb, box_reduce_words,
                    detail_sheet, lut32, words_to_rgb)


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


class TissueRendering:
    """``render``: the pixels of a ``SyntheticTissue`` (mixed into it; uses its fields and lattice)."""

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
        ss = 1 if ds <= 1 else min(MAX_SS, int(math.ceil(ds - 1e-9)))
        bs = max(1, min(BLOCK, int(PAD // max(ds, 1.0))))
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
                    words = box_reduce_words(words, ss)
                elif ss > 1:
                    words = box_reduce_rgb(words_to_rgb(words), ss)
                    words = np.pad(words, ((0, 0), (0, 0), (0, 1))).view("<u4")[:, :, 0]
                words_out[ya - y0:yb - y0, xa - x0:xb - x0] = words
        return words_to_rgb(words_out)

    def _render_samples(self, xs: np.ndarray, xstep: int | None, ys: np.ndarray, ystep: int | None) -> np.ndarray:
        """Point samples at level-0 pixels xs (columns) x ys (rows) -> uint32 RGBX words (len(ys), len(xs))."""
        p = self._p
        nx, ny = xs.size, ys.size
        f32 = np.float32

        def take(sheet: DetailSheet, off: tuple[int, int], names: Sequence[str]) -> list[np.ndarray]:
            per = sheet.period
            ax = (int(xs[0]) + off[0]) % per
            ay = (int(ys[0]) + off[1]) % per
            if xstep is not None and ystep is not None:
                sl = (slice(ay, ay + (ny - 1) * ystep + 1, ystep), slice(ax, ax + (nx - 1) * xstep + 1, xstep))
                return [getattr(sheet, nm)[sl] for nm in names]
            ix = np.ix_(ay + (ys - ys[0]), ax + (xs - xs[0]))
            return [getattr(sheet, nm)[ix] for nm in names]

        sa, sb = detail_sheet(0), detail_sheet(1)
        offa, offb = p["offsets"]
        (qa,) = take(sa, offa, ("q",))
        (qb,) = take(sb, offb, ("q",))

        thr = p["thr"]
        if thr == math.inf:  # blank slide
            return np.take(lut32(), qa + qb)

        # smooth fields: lattice covering this block
        gx = (xs + 0.5) / LATTICE
        ixf = np.floor(gx)
        gy = (ys + 0.5) / LATTICE
        iyf = np.floor(gy)
        i0, i1 = int(ixf[0]), int(ixf[-1]) + 1
        j0, j1 = int(iyf[0]), int(iyf[-1]) + 1
        lat = self._lattice(i0, i1, j0, j1)  # (4, nj, ni)
        kT = p["kT"]
        half_t = 0.5 / kT
        eps = 1e-4 * (abs(thr) + 1.0) if math.isfinite(thr) else 0.0
        if float(lat[F_T].max()) < thr - half_t - eps:  # glass only
            return np.take(lut32(), qa + qb)
        full = float(lat[F_T].min()) > thr + half_t + eps
        has_les = p["lesion"] is not None and float(lat[F_L].max()) > -0.5 / p["kL"] - 1e-4
        wanted = [F_D, F_E] + ([] if full else [F_T]) + ([F_L] if has_les else [])

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
        np.maximum(e, f32(0.04 * SE), out=e)
        np.multiply(nuc, f32(0.12 * SE), out=tmp)
        e -= tmp
        # hematoxylin (LUT units): faint background + nuclei
        hem = np.multiply(nuc, f32(NUC_H * SH))
        hem += f32(0.05 * SH)
        # basophilic cytoplasm where the nuclear density exceeds BASO_DENSITY (the cellular patches)
        np.subtract(kd, f32(FADE * BASO_DENSITY), out=tmp)
        np.maximum(tmp, f32(0), out=tmp)
        tmp *= f32(BASO_H * SH / (FADE * (BASO_PATCH[2] - BASO_DENSITY)))
        hem += tmp
        if has_les:
            les = fld[-1]
            les *= f32(p["kL"])
            les += f32(0.5)
            np.clip(les, 0, 1, out=les)
            (la,) = take(sa, offa, ("les",))
            (lb,) = take(sb, offb, ("les",))
            lnuc = np.maximum(la, lb)
            # lesion: dense large nuclei on pale eosinophilic cytoplasm (H&E colours, not a hue of its own)
            hem_les = lnuc * f32(LES_H * SH) + (tb * f32(LES_CYT_H[1] * SH) + f32(LES_CYT_H[0] * SH))
            e_les = ev * (ta * f32(LES_CYT_E[1]) + f32(LES_CYT_E[0])) - lnuc * f32(0.10 * SE)
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
        np.clip(hem, 0, NH - 1, out=hem)
        e += f32(0.5)
        np.clip(e, 0, NE - 1, out=e)
        idx = hem.astype(np.int32)
        idx *= NE
        idx += e.astype(np.int32)
        idx *= NQ
        idx += qa
        idx += qb
        return np.take(lut32(), idx)
