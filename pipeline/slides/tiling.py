"""The tile grid at a target resolution and reading its tiles.

Tiles are defined at the *target* resolution (``mpp`` µm/px, ``tile_px`` px), not at a pyramid level. Their
geometry is kept in level-0 pixels (floats: 256 px at 0.5 µm/px on a 0.499 µm/px scan is 256.51 level-0 px), pixels
are read from the coarsest pyramid level that is still at least as fine as the target, and area-averaged down to the
exact tile size. Only whole tiles are in the grid: a partial strip at the right and bottom edges is left out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np

from ..core.config import TilingConfig
from ..core.errors import ResolutionTooLowError
from .open import SlideInfo
from .pixels import best_level_for_downsample, resample_boxes
from .readers import as_reader


@dataclass(frozen=True)
class TileGrid:
    slide_width_px: int          # level 0
    slide_height_px: int
    slide_mpp: float             # level-0 µm/px
    target_mpp: float
    tile_px: int                 # at the target resolution
    stride_px: int
    rows: int
    cols: int
    tile_l0_px: float            # tile edge in level-0 pixels
    stride_l0_px: float
    read_level: int              # pyramid level pixels are read from
    read_downsample: float       # that level's downsample

    @property
    def downsample(self) -> float:
        """Target resolution relative to level 0."""
        return self.target_mpp / self.slide_mpp

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    def tile_box_l0(self, row: int, col: int) -> tuple[float, float, float, float]:
        """(x, y, w, h) of a tile in level-0 pixels."""
        return col * self.stride_l0_px, row * self.stride_l0_px, self.tile_l0_px, self.tile_l0_px

    def tile_boxes_l0(self) -> np.ndarray:
        """(rows, cols, 4) array of every tile's (x, y, w, h) in level-0 pixels."""
        rr, cc = np.meshgrid(np.arange(self.rows), np.arange(self.cols), indexing="ij")
        boxes = np.empty((self.rows, self.cols, 4), dtype=np.float64)
        boxes[..., 0] = cc * self.stride_l0_px
        boxes[..., 1] = rr * self.stride_l0_px
        boxes[..., 2] = self.tile_l0_px
        boxes[..., 3] = self.tile_l0_px
        return boxes

    def chunks(self, chunk_tiles: int) -> list[tuple[int, int, int, int]]:
        """(r0, r1, c0, c1) blocks of at most chunk_tiles x chunk_tiles tiles, aligned to the Zarr chunks."""
        return [
            (r0, min(r0 + chunk_tiles, self.rows), c0, min(c0 + chunk_tiles, self.cols))
            for r0 in range(0, self.rows, chunk_tiles)
            for c0 in range(0, self.cols, chunk_tiles)
        ]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TileGrid":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def _count(extent_l0: float, tile_l0: float, stride_l0: float) -> int:
    if extent_l0 + 1e-6 < tile_l0:
        return 0
    return int(math.floor((extent_l0 - tile_l0) / stride_l0 + 1e-9)) + 1


def tile_grid(info: SlideInfo, tiling: TilingConfig) -> TileGrid:
    """The grid of whole tiles covering a slide at the configured target resolution."""
    slide_mpp = info.require_mpp()
    if slide_mpp > tiling.mpp * (1 + tiling.mpp_tolerance):
        raise ResolutionTooLowError(
            f"the slide is scanned at {slide_mpp:.4g} µm/px ({info.mpp_source}), coarser than the target "
            f"{tiling.mpp:.4g} µm/px; tiles would be upsampled",
            path=info.path,
        )
    downsample = tiling.mpp / slide_mpp
    tile_l0 = tiling.tile_px * downsample
    stride_l0 = tiling.step_px * downsample
    level = best_level_for_downsample(info.level_downsamples, downsample)
    return TileGrid(
        slide_width_px=info.width_px,
        slide_height_px=info.height_px,
        slide_mpp=slide_mpp,
        target_mpp=tiling.mpp,
        tile_px=tiling.tile_px,
        stride_px=tiling.step_px,
        rows=_count(info.height_px, tile_l0, stride_l0),
        cols=_count(info.width_px, tile_l0, stride_l0),
        tile_l0_px=tile_l0,
        stride_l0_px=stride_l0,
        read_level=level,
        read_downsample=float(info.level_downsamples[level]),
    )


def tile_row_window(grid: TileGrid, row: int, cols: np.ndarray) -> tuple[int, int, int, int]:
    """(ix0, iy0, ix1, iy1): the read-level pixel window ``read_tile_row`` reads for ``cols`` of ``row``."""
    ds = grid.read_downsample
    # Span in level-0 pixels, then in read-level pixels (integer read window, float tile boxes inside it).
    x0_l0 = cols[0] * grid.stride_l0_px
    x1_l0 = cols[-1] * grid.stride_l0_px + grid.tile_l0_px
    y0_l0 = row * grid.stride_l0_px
    y1_l0 = y0_l0 + grid.tile_l0_px
    ix0, iy0 = int(math.floor(x0_l0 / ds)), int(math.floor(y0_l0 / ds))
    lvl_w, lvl_h = max(1, int(round(grid.slide_width_px / ds))), max(1, int(round(grid.slide_height_px / ds)))
    ix1 = min(int(math.ceil(x1_l0 / ds)), lvl_w)
    iy1 = min(int(math.ceil(y1_l0 / ds)), lvl_h)
    return ix0, iy0, ix1, iy1


# A row's tiles are read in runs: where the tiles asked for leave a stretch of at least SKIP_MIN_PX read-level pixels
# (and a whole tile) between them, the pixels there are not decoded. 256 px: the native tile width of most scanners'
# files, so such a stretch spares whole tiles. One read per row decoded them too: 4% more tiles on the benchmarks'
# generated slides (benchmarks/README.md, nineteenth session), more where fragments or cores lie side by side.
SKIP_MIN_PX = 256


def column_runs(grid: TileGrid, cols: np.ndarray) -> list[np.ndarray]:
    """``cols`` (ascending) split where the pixels between two neighbours span at least a whole tile and
    ``SKIP_MIN_PX`` read-level pixels: the pieces ``read_tile_row`` reads one at a time."""
    gap_l0 = np.diff(cols) * grid.stride_l0_px - grid.tile_l0_px  # level-0 pixels between neighbouring tiles
    split = (gap_l0 >= grid.tile_l0_px) & (gap_l0 >= SKIP_MIN_PX * grid.read_downsample)
    return np.split(cols, np.flatnonzero(split) + 1)


def read_tile_row(handle, grid: TileGrid, row: int, cols: np.ndarray, path: str = "",
                  out: np.ndarray | None = None) -> np.ndarray:
    """Tiles ``cols`` of one grid row as uint8 (len(cols), tile_px, tile_px, 3), written into ``out`` when given.

    One read covers the span from the first to the last column of each run (``column_runs``) at the read level; each
    tile is then cut out with sub-pixel precision and area-averaged to ``tile_px``. ``handle``: a
    ``pipeline.slides.readers.TileReader`` or an OpenSlide handle. The window is given in read-level pixels
    (``read_level``), so the direct TIFF reader reads exactly those pixels and OpenSlide reads from
    ``round(x * downsample)`` in level 0, as it always did.
    """
    cols = np.asarray(cols, dtype=int)
    if out is None:
        out = np.empty((len(cols), grid.tile_px, grid.tile_px, 3), dtype=np.uint8)
    if len(cols) == 0:
        return out
    reader = as_reader(handle, path)
    start = 0
    for run in column_runs(grid, cols):
        _read_run(reader, grid, row, run, out[start:start + len(run)])
        start += len(run)
    return out


def _read_run(reader, grid: TileGrid, row: int, cols: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``read_tile_row`` of one run of columns, in one read."""
    ix0, iy0, ix1, iy1 = tile_row_window(grid, row, cols)
    # Level pixels per output pixel; a reader that decodes JPEG at 1/2, 1/4, 1/8 (DCT-domain scaling) reads the
    # window at that scale, and only what is left of the shrink is done here (nothing, when the factor is whole).
    factor = grid.tile_l0_px / grid.read_downsample / grid.tile_px
    scale = reader.scale_for(grid.read_level, factor)
    shrink = reader.shrink_for(grid.read_level, factor) if scale == 1 else 1
    stride_lvl = grid.stride_l0_px / grid.read_downsample
    if shrink > 1 and stride_lvl % shrink == 0 and not (ix0 % shrink or iy0 % shrink or ix1 % shrink or iy1 % shrink):
        # every tile box on whole multiples of the factor: each native tile is area-averaged as it is decoded, the
        # same pixels as shrinking the assembled strip
        ix0, iy0, ix1, iy1 = ix0 // shrink, iy0 // shrink, ix1 // shrink, iy1 // shrink
        strip = reader.read_level_shrunk(grid.read_level, ix0, iy0, ix1 - ix0, iy1 - iy0, shrink)
        scale = shrink
    elif scale > 1:
        ix0, iy0 = ix0 // scale, iy0 // scale
        ix1, iy1 = -(-ix1 // scale), -(-iy1 // scale)
        strip = reader.read_level_scaled(grid.read_level, ix0, iy0, ix1 - ix0, iy1 - iy0, scale)
    else:
        strip = reader.read_level(grid.read_level, ix0, iy0, ix1 - ix0, iy1 - iy0)
    ds = grid.read_downsample * scale
    y0_l0 = row * grid.stride_l0_px
    top = y0_l0 / ds - iy0
    bottom = min((y0_l0 + grid.tile_l0_px) / ds - iy0, strip.shape[0])
    boxes = []
    for col in cols:
        left = col * grid.stride_l0_px / ds - ix0
        right = min(left + grid.tile_l0_px / ds, strip.shape[1])
        boxes.append((left, top, right, bottom))
    resample_boxes(strip, grid.tile_px, grid.tile_px, boxes, dest=out)
    return out


def iter_tile_batches(handle, grid: TileGrid, tissue_tiles: np.ndarray, block: tuple[int, int, int, int],
                      batch_tiles: int, path: str = "") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (positions (n, 2) as global row/col, tiles (n, px, px, 3)) for the tissue tiles of one block, in batches.

    ``tissue_tiles`` is the block's boolean mask (r1-r0, c1-c0). Rows are read one strip at a time, each straight into
    its batch (a row that straddles two batches goes through a temporary), so memory is one strip plus one batch and
    every batch is a new array. ``handle``: a ``pipeline.slides.readers.TileReader`` or an OpenSlide handle.
    """
    handle = as_reader(handle, path)
    r0, r1, c0, c1 = block
    px = grid.tile_px
    tiles = positions = None
    filled = 0
    for r in range(r0, r1):
        cols = np.flatnonzero(tissue_tiles[r - r0]) + c0
        if len(cols) == 0:
            continue
        if tiles is None:
            tiles = np.empty((batch_tiles, px, px, 3), dtype=np.uint8)
            positions = np.empty((batch_tiles, 2), dtype=np.int64)
        if filled + len(cols) <= batch_tiles:
            read_tile_row(handle, grid, r, cols, path, out=tiles[filled:filled + len(cols)])
            row_tiles = None
        else:
            row_tiles = read_tile_row(handle, grid, r, cols, path)
        done = 0
        while done < len(cols):
            take = min(len(cols) - done, batch_tiles - filled)
            if row_tiles is not None:
                tiles[filled:filled + take] = row_tiles[done:done + take]
            positions[filled:filled + take, 0] = r
            positions[filled:filled + take, 1] = cols[done:done + take]
            filled += take
            done += take
            if filled == batch_tiles:
                yield positions, tiles
                tiles = np.empty((batch_tiles, px, px, 3), dtype=np.uint8)
                positions = np.empty((batch_tiles, 2), dtype=np.int64)
                filled = 0
    if filled:
        yield positions[:filled], tiles[:filled]
