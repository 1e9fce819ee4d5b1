"""The tiled TIFF pages behind a slide's OpenSlide levels, for ``TiffTileReader`` (``pipeline/slides/readers.py``):
which page holds each level, whether its tiles decode straight to OpenSlide's RGB pixels, and what decoding one needs,
bound once when the file is opened.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import jpeg
from .open import file_identity, remember

# TIFF compressions decoded directly: the lossless ones give the stored values by construction, JPEG is tested against
# OpenSlide (tests/slides/test_readers.py), and ``auto`` probes every slide anyway. Others (e.g. Aperio's JPEG 2000, whose
# colour handling is OpenSlide's own) stay with OpenSlide.
DIRECT_COMPRESSIONS = {1: "none", 5: "lzw", 7: "jpeg", 8: "deflate", 32946: "deflate"}


@dataclass
class LevelPage:
    """What decoding one level needs, bound once when the file is opened (see the decode gotcha below)."""

    page_index: int
    width: int
    height: int
    tile_w: int
    tile_h: int
    tiles_across: int
    offsets: np.ndarray
    bytecounts: np.ndarray
    decode: object               # tifffile's page.decode closure
    jpegtables: bytes | None
    compression: int
    jpeg_prefix: bytes | None    # for scaled decoding: SOI + colour-space marker + tables (None: not JPEG)
    fast_jpeg: bool | None = None  # simplejpeg gives tifffile's pixels for full-size tiles (None: not checked yet)


class NotDirect(Exception):
    """Why a slide cannot be read directly (``TiffTileReader`` turns it into ``DirectReadUnsupportedError``)."""


def page_problem(page) -> str | None:
    """Why a tiled page cannot be decoded straight to OpenSlide's RGB pixels (None if it can)."""
    if page.compression not in DIRECT_COMPRESSIONS:
        return f"compression {int(page.compression)} is not decoded directly"
    if page.bitspersample != 8 or page.samplesperpixel != 3 or page.planarconfig != 1:
        return (f"{page.samplesperpixel} samples of {page.bitspersample} bits "
                f"(planar config {int(page.planarconfig)}), not interleaved 8-bit RGB")
    photometric = int(page.photometric)
    if not (photometric == 2 or (photometric == 6 and page.compression == 7)):
        return f"photometric {photometric} is neither RGB nor JPEG YCbCr"
    if page.imagedepth != 1 or page.tiledepth != 1:
        return "volumetric tiles"
    if page.predictor not in (1, 2):
        return f"predictor {page.predictor}"
    return None


def map_levels(tif, level_dimensions: Sequence[Sequence[int]]) -> list[LevelPage]:
    """The TIFF page holding each OpenSlide level, matched by dimensions.

    Aperio SVS keeps level 0 as page 0, a stripped thumbnail, the other levels, then label and macro images; a
    generic pyramidal TIFF has one tiled page per level. Untiled pages (thumbnail, label) never match; among tiled
    pages of equal size the first unused one wins, which is OpenSlide's order too.
    """
    pages = list(tif.pages)
    used: set[int] = set()
    out = []
    for level, (w, h) in enumerate(level_dimensions):
        index = next((i for i, p in enumerate(pages) if i not in used and p.is_tiled
                      and int(p.imagewidth) == int(w) and int(p.imagelength) == int(h)), None)
        if index is None:
            raise NotDirect(f"no tiled TIFF page of {w}x{h} px for level {level}")
        used.add(index)
        page = pages[index]
        problem = page_problem(page)
        if problem:
            raise NotDirect(f"level {level} (page {index}): {problem}")
        # tifffile gotcha: the decode closure and the JPEG tables load tag values through the file handle, so bind
        # them now, before any tile is read (reads go through a separate descriptor with os.pread anyway).
        out.append(LevelPage(
            page_index=index, width=int(page.imagewidth), height=int(page.imagelength),
            tile_w=int(page.tilewidth), tile_h=int(page.tilelength),
            tiles_across=math.ceil(int(page.imagewidth) / int(page.tilewidth)),
            offsets=np.asarray(page.dataoffsets, dtype=np.int64),
            bytecounts=np.asarray(page.databytecounts, dtype=np.int64),
            decode=page.decode, jpegtables=page.jpegtables, compression=int(page.compression),
            jpeg_prefix=jpeg.stream_prefix(page.jpegtables, rgb=int(page.photometric) == 2)
            if int(page.compression) == 7 else None))
    return out


_LEVEL_PAGES: dict[tuple, list[LevelPage]] = {}  # file identity + level sizes -> its parsed pages
# Files whose pages a process keeps: a worker reads a slide's plan and blocks within moments, and a large slide's tile
# offsets take megabytes (16 bytes per native tile).
PAGES_REMEMBERED = 16


def level_pages(path: str, stat: os.stat_result, levels: tuple) -> list[LevelPage]:
    """The file's ``map_levels``, parsed once per process and shared by its readers (each slide is opened by its probe,
    its thumbnail and each of its blocks; parsing the pages costs ~1.5 ms of a block's ~3 ms fixed cost), with each
    level's ``fast_jpeg`` verdict once a reader has checked it. The pages are bound at parsing, so the TIFF is closed
    again at once. Keyed by ``file_identity`` (a file changed moments ago is parsed afresh, and checked afresh)."""
    import tifffile

    identity = file_identity(path, stat)
    if identity is not None and (*identity, levels) in _LEVEL_PAGES:
        return _LEVEL_PAGES[(*identity, levels)]
    with tifffile.TiffFile(path) as tif:
        pages = map_levels(tif, levels)
    for page in pages:  # shared: read-only
        page.offsets.flags.writeable = page.bytecounts.flags.writeable = False
    return pages if identity is None else remember(_LEVEL_PAGES, (*identity, levels), pages, PAGES_REMEMBERED)
