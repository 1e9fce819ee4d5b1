"""Deep Zoom geometry and the overlay layers of a slide, rendered from its store at the zoom level asked.

A layer is a table of one RGBA colour per tile-grid cell (``cam``: the Grad-CAM through ``inferno``;
``feature_map``: the map's colours; ``tissue``: kept tissue, and the tiles QC excluded (``qc_code``, reasons in
``core.qc_codes``) coloured by reason), plus one
transparent cell for everything off the grid. A Deep Zoom tile of the layer is that table gathered at the cell of
each of its pixels (``cam.heatmaps.region_cells``: the same placement as the pyramidal heatmap TIFF), so nothing is
resampled and a tile costs the same at every zoom. The overlays share the slide's level-0 size, so OpenSeadragon
lays them exactly on the slide.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

from ..cam.heatmaps import CMAP_NAME, region_cells
from ..core.maps import FEATURE_MAP, FEATURE_MAP_FILL
from ..core.pictures import SINGLE_COMPONENT_CMAP, colormap_lut, feature_map_rgb
from ..core.qc_codes import QC_NAMES
from ..core.store import array_attrs, has_array, read_array
from ..slides.tiling import TileGrid

DZ_TILE_PX = 254  # with a 1-px overlap, 256-px tiles (what OpenSlide's Deep Zoom examples serve)
DZ_OVERLAP_PX = 1
LAYERS = ("cam", "feature_map", "tissue")
TISSUE_RGB = (0, 170, 90)
QC_PALETTE = ((230, 50, 50), (250, 160, 0), (160, 60, 220), (30, 140, 230), (240, 80, 200), (120, 80, 40))
LEGEND_STOPS = 11


def dz_level_count(width_px: int, height_px: int) -> int:
    """Deep Zoom levels of an image: level 0 is 1x1 px, the last is the full size (as ``DeepZoomGenerator``)."""
    return int(math.ceil(math.log2(max(width_px, height_px, 1)))) + 1


def dz_tile_box(width_px: int, height_px: int, level: int, col: int, row: int, tile_px: int = DZ_TILE_PX,
                overlap_px: int = DZ_OVERLAP_PX) -> tuple[int, int, int, int, float] | None:
    """(x0, y0, w, h, downsample) of a Deep Zoom tile in its level's pixels; None when the tile does not exist."""
    levels = dz_level_count(width_px, height_px)
    if not 0 <= level < levels:
        return None
    downsample = float(2 ** (levels - 1 - level))
    lw, lh = math.ceil(width_px / downsample), math.ceil(height_px / downsample)
    if not (0 <= col < math.ceil(lw / tile_px) and 0 <= row < math.ceil(lh / tile_px)):
        return None
    x0, y0 = col * tile_px - (overlap_px if col else 0), row * tile_px - (overlap_px if row else 0)
    x1, y1 = min((col + 1) * tile_px + overlap_px, lw), min((row + 1) * tile_px + overlap_px, lh)
    return x0, y0, x1 - x0, y1 - y0, downsample


def dzi_info(width_px: int, height_px: int, fmt: str) -> dict:
    """The Deep Zoom descriptor as OpenSeadragon takes it inline (``Url`` is filled in by the page)."""
    return {"Image": {"xmlns": "http://schemas.microsoft.com/deepzoom/2008", "Format": fmt,
                      "Overlap": str(DZ_OVERLAP_PX), "TileSize": str(DZ_TILE_PX),
                      "Size": {"Width": str(width_px), "Height": str(height_px)}}}


def cell_table(colours_rgba: np.ndarray) -> np.ndarray:
    """(rows, cols, 4) cell colours -> (rows + 1, cols + 1, 4) with a transparent row and column for 'off the grid'."""
    rows, cols = colours_rgba.shape[:2]
    table = np.zeros((rows + 1, cols + 1, 4), dtype=np.uint8)
    table[:rows, :cols] = colours_rgba
    return table


def render_cells(table: np.ndarray, grid: TileGrid, x0: int, y0: int, w: int, h: int,
                 downsample: float) -> np.ndarray:
    """The (h, w, 4) pixels of a region of a level with ``downsample``: each pixel the colour of its grid cell."""
    rows, cols = region_cells(grid, x0, y0, w, h, downsample)
    cols = np.where(cols < 0, grid.cols, cols)
    rows = np.where(rows < 0, grid.rows, rows)
    return table[np.ix_(rows, cols)]


def cam_colours(cam: np.ndarray) -> np.ndarray:
    """(rows, cols) scores in [0, 1], NaN off tissue -> RGBA cells (transparent where NaN)."""
    cam = np.asarray(cam, dtype=np.float32)
    lut = colormap_lut(CMAP_NAME)
    valid = np.isfinite(cam)
    idx = np.clip(np.nan_to_num(cam, nan=0.0) * 255 + 0.5, 0, 255).astype(np.uint8)
    out = np.zeros(cam.shape + (4,), dtype=np.uint8)
    out[..., :3] = lut[idx]
    out[..., 3] = np.where(valid, 255, 0)
    return out


def feature_map_colours(fmap: np.ndarray) -> np.ndarray:
    """(rows, cols, K) feature map -> RGBA cells with the map picture's colours, background transparent."""
    fmap = np.asarray(fmap, dtype=np.float32)
    rgb = feature_map_rgb(fmap)
    flat = fmap if fmap.ndim == 3 else fmap[..., None]
    background = np.any((flat == np.float32(FEATURE_MAP_FILL)) | ~np.isfinite(flat), axis=-1)
    return np.concatenate([rgb, np.where(background, 0, 255).astype(np.uint8)[..., None]], axis=-1)


def tissue_colours(tissue_mask: np.ndarray, qc_code: np.ndarray | None = None) -> np.ndarray:
    """Tissue cells green; with a QC code array, excluded cells (code != 0) in the colour of their code."""
    mask = np.asarray(tissue_mask, dtype=bool)
    out = np.zeros(mask.shape + (4,), dtype=np.uint8)
    out[mask] = (*TISSUE_RGB, 255)
    if qc_code is not None:
        codes = np.asarray(qc_code)
        for code in np.unique(codes[codes > 0]):
            out[codes == code] = (*QC_PALETTE[(int(code) - 1) % len(QC_PALETTE)], 255)
    return out


def qc_code_names(store: Path) -> dict[int, str]:
    """{code: reason} of a store's ``qc_code`` array: the table it was written with (its ``codes`` attribute,
    reason -> code), else the current one (``core.qc_codes``)."""
    codes = (array_attrs(store, "qc_code") or {}).get("codes") or {}
    return {**QC_NAMES, **{int(code): str(name) for name, code in codes.items()}}


def _hex(rgb) -> str:
    return "#" + "".join(f"{int(v):02x}" for v in rgb[:3])


def gradient_legend(cmap: str, label: str) -> dict:
    lut = colormap_lut(cmap)
    stops = [_hex(lut[int(round(i * 255 / (LEGEND_STOPS - 1)))]) for i in range(LEGEND_STOPS)]
    return {"kind": "gradient", "stops": stops, "min": "0", "max": "1", "label": label}


def layer_legend(name: str, store: Path, components: int = 1, cam_attrs: dict | None = None) -> dict:
    """What the page draws as the layer's colour bar (a gradient) or key (coloured items)."""
    if name == "cam":
        cls = (cam_attrs or {}).get("class_label")
        return gradient_legend(CMAP_NAME, "Grad-CAM" + (f" of class {cls}" if cls is not None else ""))
    if name == "feature_map":
        if components == 1:
            return gradient_legend(SINGLE_COMPONENT_CMAP, "feature map component 1")
        channels = ["#e60000 component 1", "#00b000 component 2", "#0050ff component 3"][:min(components, 3)]
        return {"kind": "items", "items": [c.split(" ", 1) for c in channels], "label": "feature map (RGB)"}
    items = [[_hex(TISSUE_RGB), "tissue tile, kept"]]
    if has_array(store, "qc_code"):
        names = qc_code_names(store)
        codes = np.unique(read_array(store, "qc_code"))
        items += [[_hex(QC_PALETTE[(int(c) - 1) % len(QC_PALETTE)]), f"excluded: {names.get(int(c), f'QC code {c}')}"]
                  for c in codes if c > 0]
    return {"kind": "items", "items": items, "label": "tissue / QC"}


def layer_table(store: Path, name: str) -> np.ndarray | None:
    """The cell colour table of one layer of a store, or None when the store lacks that layer's array."""
    store = Path(store)
    if name == "cam":
        return cell_table(cam_colours(read_array(store, "cam"))) if has_array(store, "cam") else None
    if name == "feature_map":
        if not has_array(store, FEATURE_MAP):
            return None
        return cell_table(feature_map_colours(read_array(store, FEATURE_MAP)))
    if name == "tissue":
        qc = read_array(store, "qc_code") if has_array(store, "qc_code") else None
        return cell_table(tissue_colours(read_array(store, "tissue_mask"), qc))
    return None


def available_layers(store: Path) -> list[str]:
    arrays = {"cam": "cam", "feature_map": FEATURE_MAP, "tissue": "tissue_mask"}
    return [name for name in LAYERS if has_array(store, arrays[name])]


def png_tile(pixels: np.ndarray) -> bytes:
    """RGBA pixels -> PNG bytes (fast compression: tiles are made on demand and are mostly flat colour)."""
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
