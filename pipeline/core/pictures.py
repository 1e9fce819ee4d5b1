"""Small pure functions that turn arrays into pictures (RGB arrays and PNG files) for people to look at.

Array -> RGB functions return ``uint8`` (h, w, 3) arrays and never touch the disk; the ``save_*`` functions write
PNGs atomically (temporary file, then rename). Plots use matplotlib's object API on an Agg canvas (no pyplot, no
global state, no display needed), so they are safe in worker processes and threads.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np

from .maps import FEATURE_MAP_FILL
from .outputs import atomic_write_bytes

WHITE = (255, 255, 255)
# Tissue colours stop short of pure white so that a tissue cell never looks like background.
TISSUE_MAX_LEVEL = 240
SINGLE_COMPONENT_CMAP = "viridis"


def colormap_lut(name: str) -> np.ndarray:
    """(256, 3) uint8 lookup table of a matplotlib colormap."""
    from matplotlib import colormaps

    return (colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255 + 0.5).astype(np.uint8)


def background_cells(feature_map: np.ndarray, fill_value: float) -> np.ndarray:
    """(rows, cols) bool: cells that hold the fill value (or anything non-finite) in any component."""
    fmap = np.asarray(feature_map, dtype=np.float32)
    if fmap.ndim == 2:
        fmap = fmap[..., None]
    return np.any((fmap == np.float32(fill_value)) | ~np.isfinite(fmap), axis=-1)


def feature_map_rgb(feature_map: np.ndarray, fill_value: float = FEATURE_MAP_FILL, background: Sequence[int] = WHITE,
                    cmap: str = SINGLE_COMPONENT_CMAP) -> np.ndarray:
    """Feature map (rows, cols, K) with values in [0, 1] -> (rows, cols, 3) uint8, one pixel per cell.

    K = 1: a colormap (``viridis``: dark = low, yellow = high); K = 2: red = component 1, green = component 2;
    K >= 3: the first three components as red, green, blue. Background cells are ``background`` (white).
    """
    fmap = np.asarray(feature_map, dtype=np.float32)
    if fmap.ndim == 2:
        fmap = fmap[..., None]
    if fmap.ndim != 3 or fmap.shape[-1] < 1:
        raise ValueError(f"expected a (rows, cols, K) feature map, got shape {fmap.shape}")
    bg = background_cells(fmap, fill_value)
    values = np.clip(np.nan_to_num(fmap, nan=0.0), 0.0, 1.0)
    k = fmap.shape[-1]
    if k == 1:
        rgb = colormap_lut(cmap)[(values[..., 0] * 255 + 0.5).astype(np.uint8)]
    else:
        rgb = np.zeros(fmap.shape[:2] + (3,), dtype=np.uint8)
        rgb[..., : min(k, 3)] = (values[..., :3] * TISSUE_MAX_LEVEL + 0.5).astype(np.uint8)
    rgb[bg] = background
    return rgb


def display_factor(rows: int, cols: int, target_px: int = 512, max_factor: int = 16) -> int:
    """Whole zoom factor so that the longer side of a (rows, cols) picture reaches about ``target_px``.

    Maps have one pixel per tile (often 20-200 px a side): enlarging by a whole factor with nearest-neighbour
    keeps every cell a crisp square. Large maps stay at one pixel per cell.
    """
    longest = max(1, int(rows), int(cols))
    return int(max(1, min(max_factor, target_px // longest)))


def upscale_nearest(image: np.ndarray, factor: int) -> np.ndarray:
    """Enlarge an (h, w[, c]) image by a whole factor, each pixel becoming a factor x factor square."""
    factor = int(factor)
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    if factor == 1:
        return np.asarray(image)
    return np.repeat(np.repeat(np.asarray(image), factor, axis=0), factor, axis=1)


def png_bytes(image: np.ndarray) -> bytes:
    """Encode a uint8 (h, w, 3) RGB or (h, w) grey image as PNG."""
    from PIL import Image

    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write an RGB/grey uint8 image as a PNG atomically."""
    return atomic_write_bytes(path, png_bytes(image))


def save_feature_map_png(path: str | Path, feature_map: np.ndarray, fill_value: float = FEATURE_MAP_FILL,
                         target_px: int = 512) -> Path:
    """The feature map as a picture (see ``feature_map_rgb``), enlarged for viewing (see ``display_factor``)."""
    rgb = feature_map_rgb(feature_map, fill_value)
    return save_png(path, upscale_nearest(rgb, display_factor(*rgb.shape[:2], target_px=target_px)))


def figure_png_bytes(fig, dpi: int = 100) -> bytes:
    """Render a matplotlib ``Figure`` on an Agg canvas to PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # attaches an Agg canvas: no pyplot, no interactive backend
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def explained_variance_figure(ratio: Sequence[float], kept: int, title: str = "PCA explained variance"):
    """Bars: variance fraction of each principal component (the ``kept`` first ones highlighted); line: cumulative."""
    from matplotlib.figure import Figure

    ratio = np.asarray(ratio, dtype=np.float64).ravel()
    if ratio.size == 0:
        raise ValueError("no explained-variance values to plot")
    kept = int(np.clip(kept, 0, ratio.size))
    idx = np.arange(1, ratio.size + 1)
    fig = Figure(figsize=(7.0, 4.0), layout="constrained")
    ax = fig.add_subplot()
    colours = ["tab:blue" if i < kept else "lightgray" for i in range(ratio.size)]
    ax.bar(idx, ratio * 100, color=colours, label="per component")
    ax.plot(idx, np.cumsum(ratio) * 100, color="tab:red", marker="o", markersize=3, label="cumulative")
    if kept:
        total = ratio[:kept].sum() * 100
        ax.axvline(kept + 0.5, color="gray", linestyle="--", linewidth=1)
        ax.annotate(f"{kept} kept: {total:.1f}%", xy=(kept + 0.5, total), xytext=(6, -14),
                    textcoords="offset points", fontsize=9)
    ax.set_xlabel("principal component")
    ax.set_ylabel("variance explained (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(0.4, ratio.size + 0.6)
    ax.set_title(title)
    ax.legend(loc="center right", fontsize=9)
    return fig


def save_explained_variance_png(path: str | Path, ratio: Sequence[float], kept: int,
                                title: str = "PCA explained variance") -> Path:
    """``explained_variance_figure`` written as a PNG atomically."""
    return atomic_write_bytes(path, figure_png_bytes(explained_variance_figure(ratio, kept, title)))
