"""Slide-level heatmap outputs from a per-tile score grid (a CAM): pictures, a pyramidal TIFF, GeoJSON regions.

All functions take the grid of scores (rows, cols) in [0, 1] with NaN where there is no tissue, and the slide's
``TileGrid`` to place each cell in level-0 pixels. Nothing here holds a full-resolution image: the TIFF is rendered
tile by tile while it is written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator

import numpy as np

from ..core.outputs import atomic_output_path, atomic_write_text
from ..core.pictures import colormap_lut
from ..slides.tiling import TileGrid

CMAP_NAME = "inferno"


def colorize(scores: np.ndarray, lut: np.ndarray, background=(255, 255, 255)) -> np.ndarray:
    """Scores in [0, 1] (NaN = background) -> RGB uint8 via a lookup table."""
    valid = np.isfinite(scores)
    idx = np.clip(np.nan_to_num(scores, nan=0.0) * 255 + 0.5, 0, 255).astype(np.uint8)
    rgb = lut[idx]
    rgb[~valid] = background
    return rgb


def cell_index(coords_l0: np.ndarray, stride_l0: float, tile_l0: float, count: int) -> np.ndarray:
    """Grid cell whose centre is nearest to each level-0 coordinate (-1 outside the grid's extent)."""
    idx = np.floor((coords_l0 - (tile_l0 - stride_l0) / 2) / stride_l0).astype(np.int64)
    inside = (coords_l0 >= 0) & (coords_l0 < (count - 1) * stride_l0 + tile_l0)
    idx = np.clip(idx, 0, count - 1)
    return np.where(inside, idx, -1)


def region_cells(grid: TileGrid, x0: int, y0: int, w: int, h: int, downsample: float) -> tuple[np.ndarray, np.ndarray]:
    """Grid row of each pixel row and grid column of each pixel column of a region of a level with ``downsample``
    (-1 off the grid)."""
    xs = (np.arange(x0, x0 + w) + 0.5) * downsample
    ys = (np.arange(y0, y0 + h) + 0.5) * downsample
    return (cell_index(ys, grid.stride_l0_px, grid.tile_l0_px, grid.rows),
            cell_index(xs, grid.stride_l0_px, grid.tile_l0_px, grid.cols))


def render_scores(scores: np.ndarray, grid: TileGrid, x0: int, y0: int, w: int, h: int,
                  downsample: float) -> np.ndarray:
    """Scores of the pixels of a region given in the coordinates of a level with ``downsample`` (NaN outside)."""
    rows, cols = region_cells(grid, x0, y0, w, h, downsample)
    out = scores[np.ix_(np.maximum(rows, 0), np.maximum(cols, 0))].astype(np.float32)
    out[rows < 0, :] = np.nan
    out[:, cols < 0] = np.nan
    return out


def _pyramid_levels(width: int, height: int, tile_px: int, factor: int = 4) -> list[int]:
    levels, ds = [1], factor
    while max(width, height) / ds >= tile_px:
        levels.append(ds)
        ds *= factor
    return levels


def _runs(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values, lengths) of the runs of equal values in a 1-D array."""
    starts = np.flatnonzero(np.diff(idx)) + 1
    starts = np.concatenate(([0], starts))
    lengths = np.diff(np.concatenate((starts, [len(idx)])))
    return idx[starts], lengths


class _LevelRenderer:
    """The tiles of one pyramid level, each expanded from the colours of the few grid cells it shows.

    Equal to ``colorize(render_scores(...))`` tile by tile (the same cell per pixel, the same colours): the cell
    colours are computed once, each tile is the cells' colours repeated over their pixel runs. ``key`` identifies a
    tile's content (its colours and run lengths) so that identical tiles are encoded once.
    """

    def __init__(self, scores: np.ndarray, grid: TileGrid, lut: np.ndarray, width: int, height: int, ds: int,
                 tile_px: int, background=(255, 255, 255)):
        self.tile_px = tile_px
        lw, lh = math.ceil(width / ds), math.ceil(height / ds)
        self.nx, self.ny = math.ceil(lw / tile_px), math.ceil(lh / tile_px)
        # cell of every pixel column / row of the level (tiles past the level's edge included), -1 -> the extra
        # background cell at index rows / cols
        rows, cols = region_cells(grid, 0, 0, self.nx * tile_px, self.ny * tile_px, ds)
        self.cols = np.where(cols < 0, grid.cols, cols)
        self.rows = np.where(rows < 0, grid.rows, rows)
        colours = np.empty((grid.rows + 1, grid.cols + 1, 3), dtype=np.uint8)
        colours[:] = background
        colours[:-1, :-1] = colorize(np.asarray(scores).astype(np.float32), lut, background)
        self.colours = colours

    def tiles(self) -> Iterator[tuple[bytes, np.ndarray, np.ndarray, np.ndarray]]:
        """(key, cell colours (nr, nc, 3), row run lengths, column run lengths) of each tile, row-major."""
        t = self.tile_px
        col_runs = [_runs(self.cols[tx * t:(tx + 1) * t]) for tx in range(self.nx)]
        for ty in range(self.ny):
            ur, nr = _runs(self.rows[ty * t:(ty + 1) * t])
            band = self.colours[ur]
            for uc, nc in col_runs:
                sub = band[:, uc]
                yield sub.tobytes() + nr.tobytes() + nc.tobytes() + np.int64(len(ur)).tobytes(), sub, nr, nc

    @staticmethod
    def expand(sub: np.ndarray, nr: np.ndarray, nc: np.ndarray) -> np.ndarray:
        if sub.shape[0] == 1 and sub.shape[1] == 1:
            tile = np.empty((int(nr[0]), int(nc[0]), 3), dtype=np.uint8)
            tile[:] = sub[0, 0]
            return tile
        return np.repeat(np.repeat(sub, nr, axis=0), nc, axis=1)


def _level_tiles(scores, grid, lut, width, height, ds, tile_px) -> Iterator[np.ndarray]:
    """The RGB tiles of one level, row-major (each tile_px x tile_px, past the level's edge too)."""
    level = _LevelRenderer(scores, grid, lut, width, height, ds, tile_px)
    for _, sub, nr, nc in level.tiles():
        yield level.expand(sub, nr, nc)


def _encoded_level_tiles(scores, grid, lut, width, height, ds, tile_px, encode,
                         cache_entries: int = 2048) -> Iterator[bytes]:
    """The tiles of one level, encoded; a tile equal to a recent one reuses its bytes (most heatmap tiles are
    one flat colour, a few hundred distinct ones per slide)."""
    level = _LevelRenderer(scores, grid, lut, width, height, ds, tile_px)
    cache: dict[bytes, bytes] = {}
    for key, sub, nr, nc in level.tiles():
        data = cache.get(key)
        if data is None:
            data = encode(level.expand(sub, nr, nc))
            if len(cache) >= cache_entries:
                cache.clear()
            cache[key] = data
        yield data


def write_heatmap_tiff(path: str | Path, scores: np.ndarray, grid: TileGrid, *, tile_px: int = 256,
                       quality: int = 90, cmap: str = CMAP_NAME) -> Path:
    """A pyramidal, tiled, JPEG-compressed RGB TIFF of the heatmap with the slide's level-0 size and mpp.

    OpenSlide reads it as a generic TIFF (levels at downsamples 1, 4, 16, ...), QuPath/ASAP can overlay it on the
    slide. Rendered, encoded and written tile by tile: memory stays at a few tiles whatever the slide's size (the
    tiles are encoded here, one at a time, and handed to tifffile as bytes, so tifffile's multi-threaded encoder,
    which buffers up to 512 MB of raw tiles on machines with 4+ cores, is never used). Tiles equal to a recent one
    (the flat-coloured tiles inside one grid cell, most of level 0) are encoded once.
    """
    import tifffile

    width, height = grid.slide_width_px, grid.slide_height_px
    lut = colormap_lut(cmap)
    res_per_cm = 1e4 / grid.slide_mpp
    # exactly what tifffile does for compression="jpeg" on RGB tiles: YCbCr with 2x2 chroma subsampling
    jpeg_encode = tifffile.TIFF.COMPRESSORS[7]

    def encode(tile: np.ndarray) -> bytes:
        return jpeg_encode(tile, level=quality, subsampling=(2, 2), colorspace="RGB", outcolorspace="YCBCR")

    with atomic_output_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
            for i, ds in enumerate(_pyramid_levels(width, height, tile_px)):
                lw, lh = math.ceil(width / ds), math.ceil(height / ds)
                tif.write(
                    _encoded_level_tiles(scores, grid, lut, width, height, ds, tile_px, encode),
                    shape=(lh, lw, 3), dtype=np.uint8, tile=(tile_px, tile_px), compression="jpeg",
                    compressionargs={"level": quality}, subsampling=(2, 2), photometric="rgb",
                    subfiletype=1 if i else 0, resolution=(res_per_cm / ds, res_per_cm / ds),
                    resolutionunit="CENTIMETER", metadata=None,
                )
    return Path(path)


def hot_region_polygons(scores: np.ndarray, grid: TileGrid, threshold: float) -> list[dict]:
    """Contours of the regions where scores >= threshold, in level-0 pixels, with their peak and mean score."""
    from skimage import measure

    filled = np.nan_to_num(scores, nan=0.0)
    padded = np.pad(filled, 1, constant_values=0.0)  # close contours that touch the grid's edge
    labels = measure.label(padded >= threshold)
    polygons = []
    for contour in measure.find_contours(padded, threshold):
        rr, cc = contour[:, 0] - 1, contour[:, 1] - 1  # back to grid cells (cell centres at integer positions)
        xs = np.clip(cc * grid.stride_l0_px + grid.tile_l0_px / 2, 0, grid.slide_width_px)
        ys = np.clip(rr * grid.stride_l0_px + grid.tile_l0_px / 2, 0, grid.slide_height_px)
        ring = np.stack([xs, ys], axis=1)
        if len(ring) < 4:
            continue
        if not np.allclose(ring[0], ring[-1]):
            ring = np.vstack([ring, ring[:1]])
        # the labelled component this contour surrounds, for its statistics
        inside = labels[int(round(contour[:, 0].mean())), int(round(contour[:, 1].mean()))]
        region = padded[labels == inside] if inside else padded[padded >= threshold]
        polygons.append({"ring": ring.round(1).tolist(), "max": float(region.max()) if region.size else threshold,
                         "mean": float(region.mean()) if region.size else threshold})
    return polygons


def write_hot_regions_geojson(path: str | Path, scores: np.ndarray, grid: TileGrid, threshold: float,
                              slide_id: str, class_name: str = "CAM hot region") -> Path:
    """QuPath-importable GeoJSON FeatureCollection of hot regions (level-0 pixel coordinates)."""
    features = []
    for i, poly in enumerate(hot_region_polygons(scores, grid, threshold)):
        features.append({
            "type": "Feature",
            "id": f"{slide_id}-hot-{i}",
            "geometry": {"type": "Polygon", "coordinates": [poly["ring"]]},
            "properties": {
                "objectType": "annotation",
                "name": f"CAM >= {threshold:g}",
                "classification": {"name": class_name, "color": [255, 64, 0]},
                "measurements": {"cam_max": poly["max"], "cam_mean": poly["mean"]},
            },
        })
    collection = {"type": "FeatureCollection", "features": features,
                  "properties": {"slide_id": slide_id, "threshold": threshold, "units": "level-0 pixels"}}
    atomic_write_text(path, json.dumps(collection))
    return Path(path)


def scores_on_thumbnail(scores: np.ndarray, grid: TileGrid, thumb_shape: tuple[int, int],
                        mask_downsample: float) -> np.ndarray:
    """The score grid resampled onto the thumbnail's pixels (NaN off the grid)."""
    h, w = thumb_shape
    return render_scores(scores, grid, 0, 0, w, h, mask_downsample)


def save_overlay_png(path: str | Path, thumbnail: np.ndarray, scores: np.ndarray, grid: TileGrid,
                     mask_downsample: float, title: str, alpha: float = 0.45, cmap: str = CMAP_NAME,
                     colorbar_label: str = "Grad-CAM") -> Path:
    """The CAM over the slide thumbnail, with a colour bar and a title (true / predicted label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    on_thumb = scores_on_thumbnail(scores, grid, thumbnail.shape[:2], mask_downsample)
    h, w = thumbnail.shape[:2]
    fig_w = 7.0
    fig_h = max(3.0, fig_w * h / max(w, 1) * 0.9 + 0.8)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), dpi=110)
    ax.imshow(thumbnail)
    masked = np.ma.masked_invalid(on_thumb)
    # interpolation_stage="data": the scores are resampled to the figure's pixels before the colormap. With
    # "nearest" this draws the same pixels as colouring first, without the float64 RGBA copies of the whole
    # thumbnail-sized layer that matplotlib makes when it colours first (~200 MB for a 4-gigapixel slide).
    im = ax.imshow(masked, cmap=cmap, vmin=0, vmax=1, alpha=alpha, interpolation="nearest",
                   interpolation_stage="data")
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()
    bar = fig.colorbar(im, ax=ax, fraction=0.035, pad=0.02)
    bar.set_alpha(1)
    bar.set_label(colorbar_label)
    fig.tight_layout()
    with atomic_output_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def save_contact_sheet(path: str | Path, entries: list[dict], columns: int = 4, cell_px: int = 320) -> Path:
    """A grid of overlay images with captions. ``entries``: dicts with ``image`` (path) and ``caption``."""
    from PIL import Image, ImageDraw

    rows = max(1, math.ceil(len(entries) / columns))
    caption_px = 36
    sheet = Image.new("RGB", (columns * cell_px, rows * (cell_px + caption_px)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, entry in enumerate(entries):
        r, c = divmod(i, columns)
        x0, y0 = c * cell_px, r * (cell_px + caption_px)
        with Image.open(entry["image"]) as img:
            img = img.convert("RGB")
            img.thumbnail((cell_px - 8, cell_px - 8))
            sheet.paste(img, (x0 + (cell_px - img.width) // 2, y0 + (cell_px - img.height) // 2))
        for j, line in enumerate(str(entry["caption"]).splitlines()[:2]):
            draw.text((x0 + 6, y0 + cell_px + 2 + 16 * j), line, fill=(0, 0, 0))
    with atomic_output_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return Path(path)


def render_slide_outputs(store: str, paths: dict, threshold: float, tiff_tile_px: int, title: str) -> dict:
    """Worker task: the CAM of one slide (already in its store) -> overlay PNG, pyramidal TIFF, GeoJSON.

    ``paths``: {"png", "tiff", "geojson"} targets. Lives here, not beside the Grad-CAM code, so a worker rendering
    files never imports Keras (two thirds of its memory otherwise; benchmarks/README.md).
    """
    from ..core.store import read_array, read_attrs

    attrs = read_attrs(store)
    grid = TileGrid.from_dict(attrs["tile_grid"])
    cam = read_array(store, "cam")
    save_overlay_png(paths["png"], read_array(store, "thumbnail"), cam, grid, float(attrs["mask_downsample"]), title)
    write_heatmap_tiff(paths["tiff"], cam, grid, tile_px=tiff_tile_px)
    write_hot_regions_geojson(paths["geojson"], cam, grid, threshold, attrs.get("slide_id") or Path(store).stem)
    return {k: str(v) for k, v in paths.items()}
