"""Tissue detection on a low-resolution image and its projection onto the tile grid.

Otsu's threshold on saturation (H&E tissue is coloured, glass is grey-white) or on optical density, with a floor so
that a blank slide does not get split into "tissue" and "background" noise, then morphology in microns (closing,
small specks removed, small holes filled). The mask is then averaged over each tile's footprint.
"""

from __future__ import annotations

import numpy as np

from ..core.config import TissueConfig
from .morphology import close_disk, otsu_threshold, remove_small_holes, remove_small_objects
from .tiling import TileGrid


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Optical density -log10(I/255) per channel, float32, with I clipped to >= 1 so white is ~0."""
    return -np.log10(np.maximum(rgb.astype(np.float32), 1.0) / 255.0)


def channel_extremes(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(brightest, darkest) channel of each pixel of (..., 3) ``rgb``, in its dtype: channel by channel, as
    reducing the 3-long last axis (``max(axis=-1)``) is ~5x slower on a thumbnail."""
    rgb = np.asarray(rgb)
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.maximum(np.maximum(red, green), blue), np.minimum(np.minimum(red, green), blue)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (max - min) / max, 0 where max is 0: ``skimage.color.rgb2hsv(rgb)[..., 1]`` without the hue and
    value planes it also computes (10x faster on a thumbnail, which a slide's first task waits for).

    For uint8 input the division runs in float32: for every (max - min, max) pair of bytes it gives exactly the
    float64 quotient cast to float32 (checked over all 65,536 pairs in ``tests/slides/test_tissue.py``), 3x faster."""
    brightest, darkest = channel_extremes(rgb)
    cmax = brightest.astype(np.float32 if brightest.dtype == np.uint8 else np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        sat = (cmax - darkest) / cmax
    sat[brightest == 0] = 0.0
    return sat.astype(np.float32, copy=False)


def tissue_signal(rgb: np.ndarray, method: str) -> np.ndarray:
    """The per-pixel quantity thresholded by Otsu."""
    if method == "otsu_saturation":
        return saturation(rgb)
    if method == "otsu_od":
        return optical_density(rgb).sum(axis=-1)
    raise ValueError(f"unknown tissue method {method!r}")


def tissue_mask(rgb: np.ndarray, config: TissueConfig, mask_mpp: float) -> np.ndarray:
    """Boolean tissue mask of a low-resolution RGB image whose pixels are ``mask_mpp`` microns."""
    signal = tissue_signal(rgb, config.method)
    floor = config.min_saturation if config.method == "otsu_saturation" else config.min_od
    if signal.size < 2 or float(signal.max()) <= floor:
        return np.zeros(signal.shape, dtype=bool)
    threshold = otsu_threshold(signal)
    mask = signal > max(float(threshold), floor)
    px_area_um2 = mask_mpp * mask_mpp
    radius = int(round(config.closing_um / mask_mpp))
    if radius > 0:
        mask = close_disk(mask, radius)
    min_px = int(config.min_object_um2 / px_area_um2)
    if min_px > 1:
        mask = remove_small_objects(mask, max_size=min_px - 1)
    hole_px = int(config.min_hole_um2 / px_area_um2)
    if hole_px > 1:
        mask = remove_small_holes(mask, max_size=hole_px - 1)
    return mask


def tile_tissue_fraction(mask: np.ndarray, mask_downsample: float, grid: TileGrid) -> np.ndarray:
    """Fraction of each tile's footprint that is tissue, float32 (rows, cols).

    ``mask_downsample`` is level-0 pixels per mask pixel. Uses a summed-area table, so it is exact over the mask pixels
    a tile covers (at least one) and costs O(mask + tiles).
    """
    if grid.rows == 0 or grid.cols == 0:
        return np.zeros((grid.rows, grid.cols), dtype=np.float32)
    h, w = mask.shape
    # a boolean mask sums in integers (exact, as float64 sums of 0/1 are, 2x faster): rows, then columns, in place
    kind = np.float64 if mask.dtype.kind == "f" else np.int32 if mask.size < 2 ** 31 else np.int64
    sat = np.zeros((h + 1, w + 1), dtype=kind)
    np.cumsum(mask, axis=1, dtype=sat.dtype, out=sat[1:, 1:])
    np.cumsum(sat[1:, 1:], axis=0, out=sat[1:, 1:])
    boxes = grid.tile_boxes_l0() / mask_downsample
    x0 = np.clip(np.floor(boxes[..., 0] + 1e-6).astype(int), 0, w - 1)
    y0 = np.clip(np.floor(boxes[..., 1] + 1e-6).astype(int), 0, h - 1)
    x1 = np.clip(np.ceil(boxes[..., 0] + boxes[..., 2] - 1e-6).astype(int), x0 + 1, w)
    y1 = np.clip(np.ceil(boxes[..., 1] + boxes[..., 3] - 1e-6).astype(int), y0 + 1, h)
    total = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    area = (x1 - x0) * (y1 - y0)
    return (total / area).astype(np.float32)


def tissue_tiles(fraction: np.ndarray, fraction_min: float) -> np.ndarray:
    """The tiles that count as tissue: ``fraction`` >= ``fraction_min``, where 0 means "any tissue at all", not
    "every tile"."""
    return fraction > 0 if fraction_min == 0 else fraction >= fraction_min


def mask_downsample_for(slide_mpp: float, config: TissueConfig) -> float:
    """Level-0 pixels per mask pixel (never below 1: tiny slides are masked at full resolution)."""
    return max(1.0, config.mask_mpp / slide_mpp)


def mask_mpp_for(slide_mpp: float, config: TissueConfig) -> float:
    return slide_mpp * mask_downsample_for(slide_mpp, config)

