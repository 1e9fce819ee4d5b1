"""Reading slide pixels: through OpenSlide, or by decoding a tiled TIFF's own tiles directly.

OpenSlide is the reference: it reads every format, it is always the source of slide metadata (levels, their sizes
and downsamples, mpp), and it is the fallback. Its ``read_region`` spends most of its time compositing and converting
(21-32 Mpx/s per process here), not decoding, so for slides whose pyramid is a plain tiled TIFF (Aperio SVS, generic
pyramidal TIFF) ``TiffTileReader`` decodes whole native tiles with tifffile + imagecodecs (libjpeg-turbo; JPEG tables
and YCbCr handled by tifffile) at ~5x the speed, with the same pixels.

Both readers share one small interface (``TileReader``), are opened once per task as context managers, and return
RGB uint8 arrays:

* ``read_region(level, x_l0, y_l0, w_lvl, h_lvl)``: OpenSlide's semantics (top-left in level-0 pixels, size in level
  pixels), and exactly OpenSlide's pixels from either reader.
* ``read_level(level, x_lvl, y_lvl, w_lvl, h_lvl)``: top-left in pixels of that level, as the tile grid asks; both
  readers answer ``read_region(level, round(x_lvl * downsample), round(y_lvl * downsample), ...)`` (what the pipeline
  always read), so they agree exactly here too.

Where ``x_l0 / downsample`` is not a whole level pixel (any position but 0 on a level whose downsample is fractional,
e.g. 4.0037 on a slide whose width is not a multiple of 4), OpenSlide shifts the level by that fraction of a pixel and
interpolates; no native tile holds those pixels, so the direct reader hands such a region to OpenSlide (counted in
``delegated_regions``). Level 0 and whole-number downsamples (2, 4 on slides written so) are always decoded directly.
``auto`` therefore picks OpenSlide outright when the tile grid reads a level with a fractional downsample.

Each native tile is decoded once per task: decoded tiles are cached while the strips of a block are read top to
bottom (strips cut native tile rows), and dropped once the reading has moved below them. Pixels outside a level, and
tiles the file leaves out (offset or byte count 0), are background white, as OpenSlide's transparent pixels
composited on white. ``auto`` (``choose_reader``) picks the direct reader for a slide that
qualifies and whose probe tiles decode to OpenSlide's pixels; when a tile fails to decode later, that one region is
read through OpenSlide instead (counted in ``fallback_regions``).

``TiffTileReader.read_level_scaled`` reads a level at 1/2, 1/4 or 1/8 with each JPEG tile decoded at that scale in
the DCT domain (``pipeline.slides.jpeg``; only when the slide's ``ReaderChoice`` allows it, ``reader.scaled_decode``):
not OpenSlide's pixels but close to their area average, which ``read_tile_row`` would compute anyway.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.errors import DirectReadUnsupportedError, TileReadError
from ..core.threads import map_threads
from . import jpeg
from .open import open_handle, remember
from .pixels import read_level_region, reduce_box
from .tiff_pages import LevelPage, NotDirect, level_pages

# OpenSlide vendors whose levels are plain tiled TIFF pages (one page per level, no extra geometry).
DIRECT_VENDORS = frozenset({"aperio", "generic-tiff"})

BACKGROUND = 255  # white: what OpenSlide's transparent pixels become (slides.rgba_to_rgb)

THREADED_TILES = 32  # with ``decode_threads``: regions of this many native tiles are decoded on two threads
# Decoded native tiles kept per task. Reading is row by row, so the tiles of the last native tile row are what the
# next strip reuses; the bound only protects memory against unusual access patterns.
DEFAULT_CACHE_BYTES = 256 << 20
# The simplejpeg check's verdict by encoding: (stream prefix: colour space and shared tables; the tile's headers:
# frame, sampling, own tables). A decoder's output depends on these and the scan data only, so a verdict on one tile
# holds for every tile of that encoding, in any file: a directory of slides from one scanner checks it once per
# process, not once per slide and level (a second decode of a tile, ~0.4 ms).
_FAST_JPEG_BY_ENCODING: dict[tuple[bytes, bytes], bool] = {}


def load_modules() -> None:
    """Import what the direct TIFF reader imports on first use (tifffile, imagecodecs' JPEG codec, PIL's decoder
    plumbing), in this process."""
    import tifffile  # noqa: F401
    from imagecodecs import jpeg8_decode  # noqa: F401  (imagecodecs loads each codec on first use)
    from PIL import ImageFile  # noqa: F401


class TileReader:
    """Common interface: open per task (``with open_reader(...) as reader``), read RGB uint8 regions."""

    kind = "?"
    path: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    fallback_regions: int = 0      # regions the direct reader read through OpenSlide after a decode failure
    delegated_regions: int = 0     # regions at sub-pixel level positions, which only OpenSlide produces

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def read_region(self, level: int, x_l0: int, y_l0: int, w_lvl: int, h_lvl: int) -> np.ndarray:
        raise NotImplementedError

    def read_level(self, level: int, x_lvl: int, y_lvl: int, w_lvl: int, h_lvl: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        return self.read_region(level, int(round(x_lvl * ds)), int(round(y_lvl * ds)), w_lvl, h_lvl)

    def scale_for(self, level: int, factor: float) -> int:
        """Whole-factor shrink this reader can do while decoding (see ``TiffTileReader``); 1 = none."""
        return 1

    def shrink_for(self, level: int, factor: float) -> int:
        """Whole-factor area average this reader can do while assembling (``read_level_shrunk``); 1 = none."""
        return 1

    def read_level_shrunk(self, level: int, x_k: int, y_k: int, w_k: int, h_k: int, k: int) -> np.ndarray:
        """The level area-averaged ``k`` times (coordinates and size in shrunk pixels): ``reduce_box`` of
        ``read_level``, whose pixels every reader's override must give exactly."""
        return reduce_box(self.read_level(level, x_k * k, y_k * k, w_k * k, h_k * k), 0, 0, k, w_k, h_k)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class OpenSlideReader(TileReader):
    """The reference reader: OpenSlide's ``read_region`` composited on white (also the plain-image fallback).

    ``handle``: an already open OpenSlide/ImageSlide handle to wrap (not closed by this reader).
    """

    kind = "openslide"

    def __init__(self, path: str | Path, handle=None):
        self.path = str(path)
        self._own = handle is None
        self._handle = open_handle(Path(path))[0] if handle is None else handle
        self.level_dimensions = tuple((int(w), int(h)) for w, h in self._handle.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._handle.level_downsamples)

    def read_region(self, level: int, x_l0: int, y_l0: int, w_lvl: int, h_lvl: int) -> np.ndarray:
        return read_level_region(self._handle, level, x_l0, y_l0, w_lvl, h_lvl, self.path)

    def close(self) -> None:
        if self._own and self._handle is not None:
            self._handle.close()
        self._handle = None


def as_reader(handle, path: str = "") -> TileReader:
    """A TileReader for ``handle``: itself if it already is one, else an OpenSlide handle wrapped (not owned)."""
    if isinstance(handle, TileReader):
        return handle
    return OpenSlideReader(path or getattr(handle, "_filename", ""), handle=handle)


# --- the direct TIFF reader -----------------------------------------------------------------------------------------


class TiffTileReader(TileReader):
    """Decodes whole native tiles of the level's TIFF page; each tile once per task (a per-task tile cache).

    ``level_dimensions`` / ``level_downsamples``: OpenSlide's (from ``SlideInfo``), the source of truth the pages are
    matched to; ``fallback``: when a tile fails to decode, read that region through OpenSlide instead of raising
    ``TileReadError``. Raises ``DirectReadUnsupportedError`` when the file cannot be read this way.
    """

    kind = "tiff"

    def __init__(self, path: str | Path, level_dimensions: Sequence[Sequence[int]],
                 level_downsamples: Sequence[float], *, fallback: bool = False,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, max_jpeg_scale: int = 1, decode_threads: bool = False):
        self.path = str(path)
        self.level_dimensions = tuple((int(w), int(h)) for w, h in level_dimensions)
        self.level_downsamples = tuple(float(d) for d in level_downsamples)
        self.fallback = fallback
        self.max_jpeg_scale = int(max_jpeg_scale)
        self.decode_threads = decode_threads  # for a thumbnail, which a slide's plan waits for (``map_threads``)
        self.fallback_regions = 0
        self.delegated_regions = 0
        self.tiles_decoded = 0
        self._cache: dict[tuple[int, int, int, int], np.ndarray | None] = {}
        self._cache_bytes = 0
        self._cache_limit = int(cache_bytes)
        self._openslide: OpenSlideReader | None = None
        self._fd = -1
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
            self._levels = level_pages(self.path, os.fstat(self._fd), self.level_dimensions)
        except NotDirect as err:
            self.close()
            raise DirectReadUnsupportedError(str(err), path=self.path) from None
        except Exception as err:  # noqa: BLE001 - tifffile raises many types for files it cannot parse
            self.close()
            raise DirectReadUnsupportedError(f"tifffile cannot open it ({type(err).__name__}: {err})",
                                             path=self.path) from None

    # -- native tiles --

    def _decode_tile(self, lp: LevelPage, level: int, ty: int, tx: int, scale: int = 1) -> np.ndarray | None:
        """One native tile (at 1/``scale``) cropped to the image, or None for a tile the file leaves out."""
        index = ty * lp.tiles_across + tx
        offset, count = int(lp.offsets[index]), int(lp.bytecounts[index])
        if offset == 0 or count == 0:
            return None
        data = os.pread(self._fd, count, offset)
        if len(data) != count:
            raise ValueError(f"file ends inside tile {index} (wanted {count} bytes at {offset})")
        encoding = None
        if scale == 1 and lp.fast_jpeg is None and lp.jpeg_prefix is not None and jpeg.available():
            encoding = (lp.jpeg_prefix, jpeg.headers(data))
            lp.fast_jpeg = _FAST_JPEG_BY_ENCODING.get(encoding) if encoding[1] else None  # None: not seen yet
        if scale == 1 and lp.fast_jpeg:
            tile = jpeg.decode_scaled(jpeg.full_stream(lp.jpeg_prefix, data), lp.tile_w, lp.tile_h, 1)
        elif scale == 1:
            tile, _, _ = lp.decode(data, index, jpegtables=lp.jpegtables)
            tile = tile[0] if tile.ndim == 4 else tile
            if lp.fast_jpeg is None and encoding is not None:
                # simplejpeg decodes these tiles ~20% faster (same libjpeg-turbo, no tifffile layers); used for the
                # level once it gives this first tile's exact pixels, and for tiles of the same encoding elsewhere
                fast = jpeg.decode_scaled(jpeg.full_stream(lp.jpeg_prefix, data), lp.tile_w, lp.tile_h, 1)
                lp.fast_jpeg = fast.shape == tile.shape and np.array_equal(fast, tile)
                if encoding[1]:
                    remember(_FAST_JPEG_BY_ENCODING, encoding, lp.fast_jpeg)
        else:
            tile = jpeg.decode_scaled(jpeg.full_stream(lp.jpeg_prefix, data), lp.tile_w, lp.tile_h, scale)
        tile_w, tile_h = lp.tile_w // scale, lp.tile_h // scale
        h = min(tile_h, -(-lp.height // scale) - ty * tile_h)
        w = min(tile_w, -(-lp.width // scale) - tx * tile_w)
        if tile.shape[0] < h or tile.shape[1] < w or tile.shape[-1] != 3:
            raise ValueError(f"tile {index} decodes to shape {tile.shape}, expected at least ({h}, {w}, 3)")
        return tile[:h, :w]

    def _tile(self, lp: LevelPage, level: int, ty: int, tx: int, scale: int = 1,
              decoded: np.ndarray | None = None) -> np.ndarray | None:
        """A native tile from the cache, else ``decoded`` (decoded ahead by ``_decode_ahead``), else decoded now."""
        key = (level, ty, tx, scale)
        if key in self._cache:
            return self._cache[key]
        tile = self._decode_tile(lp, level, ty, tx, scale) if decoded is None else decoded
        self.tiles_decoded += tile is not None  # a tile the file leaves out is not decoded
        size = 0 if tile is None else tile.nbytes
        if self._cache_bytes + size > self._cache_limit:
            self._cache.clear()
            self._cache_bytes = 0
        self._cache[key] = tile
        self._cache_bytes += size
        return tile

    def _evict_rows_above(self, level: int, ty0: int) -> None:
        """Regions are read top to bottom: tiles above the current request are not needed again."""
        stale = [k for k in self._cache if k[0] != level or k[1] < ty0]
        for k in stale:
            tile = self._cache.pop(k)
            self._cache_bytes -= 0 if tile is None else tile.nbytes

    # -- the interface --

    def read_native(self, level: int, x_lvl: int, y_lvl: int, w_lvl: int, h_lvl: int) -> np.ndarray:
        """The level's own pixels from its native tiles (top-left in that level's pixels; outside = white).

        A tile that fails to decode raises ``TileReadError`` (no fallback here: ``read_region`` does that).
        """
        try:
            return self._decode_region(level, int(x_lvl), int(y_lvl), int(w_lvl), int(h_lvl))
        except Exception as err:  # noqa: BLE001 - imagecodecs/tifffile raise many types for damaged tiles
            raise TileReadError(f"decoding level {level} tiles at ({x_lvl}, {y_lvl}) failed: "
                                f"{type(err).__name__}: {err}", path=self.path) from None

    def centre_tile(self, level: int) -> tuple[int, int, int, int, int, int]:
        """(x, y, tile_w, tile_h, level_w, level_h): where the native tile in the middle of ``level`` starts, in the
        level's pixels, its size, and the level page's size: the tile the reader probes look at."""
        lp = self._levels[level]
        tx, ty = lp.tiles_across // 2, math.ceil(lp.height / lp.tile_h) // 2
        return tx * lp.tile_w, ty * lp.tile_h, lp.tile_w, lp.tile_h, lp.width, lp.height

    def tile_coding(self, level: int, x_lvl: int, y_lvl: int) -> tuple | None:
        """How the JPEG tile holding level pixel (x, y) is coded, apart from its pixels: tile size, stream prefix
        (tables, colour-space marker), its own headers up to its scan; None if not JPEG or the headers are unread."""
        lp = self._levels[level]
        index = (y_lvl // lp.tile_h) * lp.tiles_across + x_lvl // lp.tile_w
        offset, count = int(lp.offsets[index]), int(lp.bytecounts[index])
        if lp.jpeg_prefix is None or offset == 0 or count == 0:
            return None
        head = jpeg.headers(os.pread(self._fd, min(count, 4096), offset))
        return None if head is None else (lp.tile_w, lp.tile_h, lp.jpeg_prefix, head)

    def scale_for(self, level: int, factor: float) -> int:
        """The DCT-domain scale (1, 2, 4 or 8) ``read_level_scaled`` uses for tiles of ``level`` that are shrunk by
        ``factor`` (level pixels per output pixel): 1 unless the level is JPEG, its downsample is whole and scaled
        decoding is allowed (``max_jpeg_scale``)."""
        lp = self._levels[level]
        if self.max_jpeg_scale < 2 or lp.jpeg_prefix is None or not jpeg.available() \
                or not float(self.level_downsamples[level]).is_integer():
            return 1
        return jpeg.scale_for(factor, lp.tile_w, lp.tile_h, self.max_jpeg_scale)

    def shrink_for(self, level: int, factor: float) -> int:
        """``factor`` when it is whole (>= 2), divides the level's tile size and the level lies on whole level-0
        pixels (no region of it goes to OpenSlide): ``read_level_shrunk`` then shrinks each native tile as it is
        decoded; else 1."""
        lp = self._levels[level]
        k = int(round(factor))
        if k < 2 or abs(factor - k) > 1e-9 or lp.tile_w % k or lp.tile_h % k \
                or not float(self.level_downsamples[level]).is_integer():
            return 1
        return k

    def read_level_shrunk(self, level: int, x_k: int, y_k: int, w_k: int, h_k: int, k: int) -> np.ndarray:
        """``reduce_box`` of ``read_level`` (the same pixels), without assembling the full-size region: each native
        tile is area-averaged into the output as it is decoded (a quarter of the memory traffic at k = 2). A region
        reaching outside the level, or a tile that fails to decode, is read the usual way (with its fallback)."""
        lp = self._levels[level]
        x, y, w, h = x_k * k, y_k * k, w_k * k, h_k * k
        if x >= 0 and y >= 0 and x + w <= lp.width and y + h <= lp.height:
            try:
                return self._decode_region(level, x, y, w, h, shrink=k)
            except Exception:  # noqa: BLE001 - read again below: it raises TileReadError or falls back to OpenSlide
                pass
        return super().read_level_shrunk(level, x_k, y_k, w_k, h_k, k)

    def read_level_scaled(self, level: int, x_s: int, y_s: int, w_s: int, h_s: int, scale: int) -> np.ndarray:
        """The level at 1/``scale`` (coordinates and size in scaled pixels), each native JPEG tile decoded at that
        scale by libjpeg (``pipeline.slides.jpeg``). Not OpenSlide's pixels: close to their ``scale`` x ``scale`` area
        average. A tile that fails: the region is read at full size (with the usual fallback) and area-averaged."""
        if scale == 1:
            return self.read_level(level, x_s, y_s, w_s, h_s)
        try:
            return self._decode_region(level, int(x_s), int(y_s), int(w_s), int(h_s), scale)
        except Exception as err:  # noqa: BLE001 - libjpeg raises ValueError/RuntimeError for damaged tiles
            if not self.fallback:
                raise TileReadError(f"decoding level {level} tiles at 1/{scale} at ({x_s}, {y_s}) failed: "
                                    f"{type(err).__name__}: {err}", path=self.path) from None
        full = self.read_level(level, x_s * scale, y_s * scale, w_s * scale, h_s * scale)
        return reduce_box(full, 0, 0, scale, int(w_s), int(h_s))

    def _decode_region(self, level: int, x_lvl: int, y_lvl: int, w_lvl: int, h_lvl: int,
                       scale: int = 1, shrink: int = 1) -> np.ndarray:
        """Pixels of ``level`` at 1/``scale`` (coordinates in those pixels) assembled from native tiles; with
        ``shrink`` each tile's part is area-averaged ``shrink`` times into the output (a region inside the level whose
        coordinates are multiples of ``shrink``: see ``read_level_shrunk``)."""
        lp = self._levels[level]
        tile_w, tile_h = lp.tile_w // scale, lp.tile_h // scale
        width, height = -(-lp.width // scale), -(-lp.height // scale)
        out = np.empty((h_lvl // shrink, w_lvl // shrink, 3), dtype=np.uint8)
        x0, y0 = max(x_lvl, 0), max(y_lvl, 0)
        x1, y1 = min(x_lvl + w_lvl, width), min(y_lvl + h_lvl, height)
        if x0 >= x1 or y0 >= y1:
            out.fill(BACKGROUND)
            return out
        if (x0, y0, x1, y1) != (x_lvl, y_lvl, x_lvl + w_lvl, y_lvl + h_lvl):
            out.fill(BACKGROUND)  # part of the region lies outside the level
        ty0, ty1 = y0 // tile_h, (y1 - 1) // tile_h
        tx0, tx1 = x0 // tile_w, (x1 - 1) // tile_w
        self._evict_rows_above(level, ty0)
        ahead = self._decode_ahead(lp, level, range(ty0, ty1 + 1), range(tx0, tx1 + 1), scale)
        for ty in range(ty0, ty1 + 1):
            ty_top = ty * tile_h
            sy0, sy1 = max(y0, ty_top), min(y1, ty_top + tile_h)
            for tx in range(tx0, tx1 + 1):
                tx_left = tx * tile_w
                sx0, sx1 = max(x0, tx_left), min(x1, tx_left + tile_w)
                tile = self._tile(lp, level, ty, tx, scale, ahead.get((ty, tx)))
                dst = out[(sy0 - y_lvl) // shrink:(sy1 - y_lvl) // shrink, (sx0 - x_lvl) // shrink:(sx1 - x_lvl) // shrink]
                if tile is None:
                    dst.fill(BACKGROUND)
                elif shrink > 1:
                    reduce_box(tile, sx0 - tx_left, sy0 - ty_top, shrink, dst.shape[1], dst.shape[0], out=dst)
                else:
                    dst[...] = tile[sy0 - ty_top:sy1 - ty_top, sx0 - tx_left:sx1 - tx_left]
        return out

    def _decode_ahead(self, lp: LevelPage, level: int, rows: range, cols: range, scale: int) -> dict:
        """(ty, tx) -> tile for the uncached tiles of a large region, decoded row by row on ``map_threads``."""
        if not self.decode_threads or len(rows) * len(cols) < THREADED_TILES or len(rows) < 2:
            return {}

        def decode_row(ty: int) -> list:
            return [self._decode_tile(lp, level, ty, tx, scale) if (level, ty, tx, scale) not in self._cache else None
                    for tx in cols]

        return {(ty, tx): tile for ty, row in zip(rows, map_threads(decode_row, list(rows)))
                for tx, tile in zip(cols, row) if tile is not None}

    def read_region(self, level: int, x_l0: int, y_l0: int, w_lvl: int, h_lvl: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        x_lvl, y_lvl = x_l0 / ds, y_l0 / ds  # the division OpenSlide does
        if not (x_lvl.is_integer() and y_lvl.is_integer()):
            self.delegated_regions += 1
            return self._reference().read_region(level, x_l0, y_l0, w_lvl, h_lvl)
        if not self.fallback:
            return self.read_native(level, x_lvl, y_lvl, w_lvl, h_lvl)
        try:
            return self._decode_region(level, int(x_lvl), int(y_lvl), int(w_lvl), int(h_lvl))
        except Exception:  # noqa: BLE001 - a damaged tile: this region comes from OpenSlide (which may fail too)
            self.fallback_regions += 1
            return self._reference().read_region(level, x_l0, y_l0, w_lvl, h_lvl)

    def _reference(self) -> OpenSlideReader:
        if self._openslide is None:
            self._openslide = OpenSlideReader(self.path)
        return self._openslide

    def close(self) -> None:
        if self._openslide is not None:
            self._openslide.close()
            self._openslide = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._cache.clear()
        self._cache_bytes = 0
