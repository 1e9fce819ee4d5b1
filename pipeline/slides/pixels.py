"""Slide pixels: regions of a level as RGB, whole-factor and fractional resampling, thumbnails.

``reduce_box`` shrinks by a whole factor with exactly PIL's ``Image.reduce`` arithmetic (a numba kernel, numpy where
numba is missing); ``resample_boxes`` cuts many tiles out of one read strip; ``read_thumbnail`` reads a slide at a
downsample strip by strip.
"""

from __future__ import annotations

import math

import numpy as np
import openslide
from PIL import Image

from ..core.errors import TileReadError
from ..core.jit import njit
from .resample import kernels as resize_kernels, resize


def best_level_for_downsample(level_downsamples: tuple[float, ...] | list[float], downsample: float) -> int:
    """Coarsest level that is still at least as fine as ``downsample`` (never upsample from a coarser level)."""
    best = 0
    for level, ds in enumerate(level_downsamples):
        if ds <= downsample * (1 + 1e-3):
            best = level if ds >= level_downsamples[best] else best
    return best


def rgba_to_rgb(rgba: np.ndarray, background: int = 255) -> np.ndarray:
    """Composite OpenSlide's RGBA (transparent outside the scanned area) over a white background."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.float32) / 255.0
    out = rgb.astype(np.float32) * a + background * (1.0 - a)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def read_level_region(handle, level: int, x_l0: int, y_l0: int, w_lvl: int, h_lvl: int, path: str = "") -> np.ndarray:
    """RGB uint8 of a region at ``level`` whose top-left is given in level-0 pixels; read errors become TileReadError."""
    try:
        region = handle.read_region((int(x_l0), int(y_l0)), level, (int(w_lvl), int(h_lvl)))
    except openslide.OpenSlideError as err:
        raise TileReadError(f"reading level {level} at ({x_l0}, {y_l0}) failed: {err}", path=path) from None
    except Exception as err:  # noqa: BLE001 - PIL decode errors from the image fallback
        raise TileReadError(f"reading level {level} at ({x_l0}, {y_l0}) failed: {type(err).__name__}: {err}", path=path) from None
    return rgba_to_rgb(np.asarray(region))


def resample(image: np.ndarray, out_w: int, out_h: int, box: tuple[float, float, float, float] | None = None,
             threads: bool = False) -> np.ndarray:
    """Resize (a sub-box of) an RGB image. Area averaging (BOX) when shrinking, bilinear when enlarging.
    ``threads``: a large image's rows split over ``core.threads``' pool (the same pixels)."""
    return resample_boxes(image, out_w, out_h, [box], threads=threads)[0]


def reduce_box(image: np.ndarray, x0: int, y0: int, factor: int, out_w: int, out_h: int,
               out: np.ndarray | None = None) -> np.ndarray:
    """The box (x0, y0, out_w * factor, out_h * factor) of an (h, w, 3) uint8 image shrunk ``factor`` times by
    area averaging, with exactly PIL's ``Image.reduce`` arithmetic (its fixed-point rounding), into ``out``."""
    n = factor * factor
    multiplier = int(np.float32(4294967296.0) / np.float32(256 * n))  # Pillow's division_UINT32(n, 8)
    if out is None:
        out = np.empty((out_h, out_w, 3), dtype=np.uint8)
    if _reduce_box_kernel is None:
        box = image[y0:y0 + out_h * factor, x0:x0 + out_w * factor].astype(np.uint64)
        sums = box.reshape(out_h, factor, out_w, factor, 3).sum(axis=(1, 3))
        out[...] = ((sums + n // 2) * multiplier) >> 24
    elif factor == 2 and image.flags.c_contiguous:
        _reduce_2x2_kernel(image, x0, y0, out)  # the common 0.25 -> 0.5 µm/px case: (sum + 2) >> 2, as PIL
    else:
        _reduce_box_kernel(image, x0, y0, factor, multiplier, out)
    return out


@njit
def _reduce_box_kernel(image, x0, y0, factor, multiplier, out):
    out_h, out_w, _ = out.shape
    amend = (factor * factor) // 2
    for oy in range(out_h):
        ys = y0 + oy * factor
        for ox in range(out_w):
            xs = x0 + ox * factor
            s0 = s1 = s2 = amend
            for y in range(ys, ys + factor):
                for x in range(xs, xs + factor):
                    s0 += image[y, x, 0]
                    s1 += image[y, x, 1]
                    s2 += image[y, x, 2]
            out[oy, ox, 0] = (s0 * multiplier) >> 24
            out[oy, ox, 1] = (s1 * multiplier) >> 24
            out[oy, ox, 2] = (s2 * multiplier) >> 24


@njit
def _reduce_2x2_kernel(image, x0, y0, out):
    # Rows as flat RGB byte vectors. Two passes per output row: a vertical pair sum over the whole row span (unit
    # stride, vectorises), then the horizontal pairs. ((a + b + 1) + (c + d + 1)) >> 2 == (a + b + c + d + 2) >> 2,
    # PIL's rounding; 4x faster than one pass over 2x2 windows. ``out`` may be a view into a larger image.
    out_h, out_w, _ = out.shape
    rows = image.reshape(image.shape[0], image.shape[1] * 3)
    n = 6 * out_w
    pair = np.empty(n, np.uint16)
    one = np.uint16(1)
    for oy in range(out_h):
        a = rows[y0 + 2 * oy, 3 * x0:3 * x0 + n]
        b = rows[y0 + 2 * oy + 1, 3 * x0:3 * x0 + n]
        for j in range(n):
            pair[j] = np.uint16(a[j]) + np.uint16(b[j]) + one
        o = out[oy]
        for ox in range(out_w):
            p = 6 * ox
            o[ox, 0] = (pair[p] + pair[p + 3]) >> 2
            o[ox, 1] = (pair[p + 1] + pair[p + 4]) >> 2
            o[ox, 2] = (pair[p + 2] + pair[p + 5]) >> 2


def load_kernels() -> None:
    """Load the compiled shrink kernels now (from numba's disk cache; the first kernel of a process costs ~0.3 s):
    done once before worker processes are forked, so no worker pays it."""
    for factor in (2, 3):
        reduce_box(np.zeros((6, 6, 3), np.uint8), 0, 0, factor, 2, 2)
        reduce_box(np.zeros((6, 6, 3), np.uint8), 0, 0, factor, 2, 2, out=np.zeros((3, 3, 3), np.uint8)[1:, 1:])
    if resize_kernels:
        for size in (3, 5, 9):  # shrink and enlarge; horizontal pass first, vertical first, one pass only
            resize(np.zeros((8, 6, 3), np.uint8), size, 4, (0.5, 0.0, 5.5, 8.0), bilinear=size > 5)
            resize(np.zeros((8, 6, 3), np.uint8), size, 8, (0.5, 0.0, 5.5, 8.0), bilinear=size > 5)


def resample_boxes(image: np.ndarray, out_w: int, out_h: int,
                   boxes: list[tuple[float, float, float, float] | None],
                   dest: np.ndarray | None = None, threads: bool = False) -> list[np.ndarray]:
    """``resample`` of several boxes of one image: PIL's ``resize`` pixels, computed by ``resample.resize`` (PIL
    itself, converting the image once, where numba is missing).

    Identical to calling ``resample`` per box. ``dest`` (len(boxes), out_h, out_w, 3): every result is written into
    it (straight, without a temporary) and the returned arrays are its rows.
    """
    src_h, src_w = image.shape[:2]
    pil = None
    out = []
    for i, box in enumerate(boxes):
        target = None if dest is None else dest[i]
        if box is None:
            box = (0.0, 0.0, float(src_w), float(src_h))
        bw, bh = box[2] - box[0], box[3] - box[1]
        factor = bw / out_w
        if out_w == bw and out_h == bh and all(float(v).is_integer() for v in box):
            x0, y0 = int(box[0]), int(box[1])
            tile = image[y0:y0 + out_h, x0:x0 + out_w]
        elif factor == bh / out_h and factor >= 2 and factor.is_integer() and all(float(v).is_integer() for v in box):
            # Whole-factor shrink of a pixel-aligned box (e.g. 0.25 -> 0.5 µm/px): PIL's reduce(), the same area
            # average as resize(BOX) up to 1 grey level of rounding, 3x faster; compiled: another 3-5x, no copies.
            out.append(reduce_box(image, int(box[0]), int(box[1]), int(factor), out_w, out_h, out=target))
            continue
        elif resize_kernels:  # PIL's arithmetic compiled: 1.5x faster per tile, 2.5x for a thumbnail (no conversions)
            out.append(resize(image, out_w, out_h, box, bilinear=not (bw >= out_w and bh >= out_h), out=target,
                              threads=threads))
            continue
        else:
            if pil is None:
                pil = Image.fromarray(image)
            shrinking = bw >= out_w and bh >= out_h
            method = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
            tile = np.asarray(pil.resize((out_w, out_h), method, box=box))
        if target is not None:
            target[...] = tile
            tile = target
        out.append(tile)
    return out


def _read_region(handle, level: int, x_l0: int, y_l0: int, w_lvl: int, h_lvl: int, path: str) -> np.ndarray:
    """OpenSlide-semantics region from an OpenSlide handle or a ``pipeline.slides.readers.TileReader``."""
    if hasattr(handle, "read_level"):  # a TileReader (direct TIFF reader or wrapped OpenSlide): same pixels
        return handle.read_region(level, x_l0, y_l0, w_lvl, h_lvl)
    return read_level_region(handle, level, x_l0, y_l0, w_lvl, h_lvl, path)


def read_thumbnail(handle, downsample: float, path: str = "", max_strip_px: int = 1 << 24) -> np.ndarray:
    """The whole slide at ``downsample`` (relative to level 0), read in strips so memory stays bounded.

    ``handle``: an OpenSlide handle or a ``pipeline.slides.readers.TileReader`` (whose ``read_region`` returns
    OpenSlide's pixels), so the thumbnail, and the tissue mask made from it, does not depend on the reader.
    """
    width, height = handle.dimensions
    downsample = max(float(downsample), 1.0)
    out_w = max(1, int(round(width / downsample)))
    out_h = max(1, int(round(height / downsample)))
    level = best_level_for_downsample(list(handle.level_downsamples), downsample)
    lvl_ds = float(handle.level_downsamples[level])
    lvl_w, lvl_h = handle.level_dimensions[level]
    out = np.empty((out_h, out_w, 3), dtype=np.uint8)
    # Strip height in output rows so that one strip at the read level holds at most max_strip_px pixels.
    scale = downsample / lvl_ds  # level pixels per output pixel
    rows_per_strip = max(1, int(max_strip_px / max(lvl_w, 1) / scale))
    for oy in range(0, out_h, rows_per_strip):
        oh = min(rows_per_strip, out_h - oy)
        y_lvl0 = oy * scale
        y_lvl1 = min((oy + oh) * scale, lvl_h)
        iy0 = int(math.floor(y_lvl0))
        iy1 = max(iy0 + 1, int(math.ceil(y_lvl1)))
        strip = _read_region(handle, level, 0, int(round(iy0 * lvl_ds)), lvl_w, iy1 - iy0, path)
        box = (0.0, y_lvl0 - iy0, float(min(out_w * scale, lvl_w)), y_lvl1 - iy0)
        resample_boxes(strip, out_w, oh, [box], dest=out[None, oy:oy + oh], threads=True)
    return out
