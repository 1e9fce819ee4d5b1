"""The tiled TIFF pages behind a slide's OpenSlide levels, for ``TiffTileReader`` (``pipeline/slides/readers.py``):
which page holds each level, whether its tiles decode straight to OpenSlide's RGB pixels, and what decoding one needs,
bound once when the file is opened.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
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


def map_levels(tiled: list["TiledPage"], level_dimensions: Sequence[Sequence[int]]) -> list[LevelPage]:
    """The TIFF page holding each OpenSlide level, matched by dimensions among a file's tiled pages.

    Aperio SVS keeps level 0 as page 0, a stripped thumbnail, the other levels, then label and macro images; a
    generic pyramidal TIFF has one tiled page per level. Untiled pages (thumbnail, label) never match; among tiled
    pages of equal size the first unused one wins, which is OpenSlide's order too.
    """
    used: set[int] = set()
    out = []
    for level, (w, h) in enumerate(level_dimensions):
        match = next((t for t in tiled if t.index not in used and t.width == int(w) and t.height == int(h)), None)
        if match is None:
            raise NotDirect(f"no tiled TIFF page of {w}x{h} px for level {level}")
        used.add(match.index)
        if match.page is None:
            raise NotDirect(f"level {level} (page {match.index}): {match.problem}")
        out.append(match.page)
    return out


@dataclass
class TiledPage:
    """A tiled page of a file: its index and size, and the page bound for decoding, or why it cannot be decoded
    directly (``page`` None)."""

    index: int
    width: int
    height: int
    page: LevelPage | None
    problem: str | None


@dataclass
class ParsedTiff:
    """One parse of a TIFF: where each page's image data ends (its largest offset + byte count; 0 without data), for
    the completeness check (``open.check_tiff_complete``), and its tiled pages, for the direct reader's levels."""

    data_ends: list[int]
    tiled: list[TiledPage]


def _bind(index: int, page, offsets: np.ndarray, counts: np.ndarray) -> TiledPage:
    width, height = int(page.imagewidth), int(page.imagelength)
    try:
        problem = page_problem(page)
        if problem:
            return TiledPage(index, width, height, None, problem)
        # tifffile gotcha: the decode closure and the JPEG tables load tag values through the file handle, so bind
        # them now, before any tile is read (reads go through a separate descriptor with os.pread anyway).
        offsets.flags.writeable = counts.flags.writeable = False  # shared by a process's readers: read-only
        return TiledPage(index, width, height, LevelPage(
            page_index=index, width=width, height=height, tile_w=int(page.tilewidth), tile_h=int(page.tilelength),
            tiles_across=math.ceil(width / int(page.tilewidth)), offsets=offsets, bytecounts=counts,
            decode=page.decode, jpegtables=page.jpegtables, compression=int(page.compression),
            jpeg_prefix=jpeg.stream_prefix(page.jpegtables, rgb=int(page.photometric) == 2)
            if int(page.compression) == 7 else None), None)
    except Exception as err:  # noqa: BLE001 - a page tifffile cannot describe is read through OpenSlide
        return TiledPage(index, width, height, None, f"tifffile cannot bind it ({type(err).__name__}: {err})")


_PARSED: dict[tuple, ParsedTiff] = {}  # file identity -> its parse
# Files whose parse a process keeps: a worker reads a slide's plan and blocks within moments, and a large slide's tile
# offsets take megabytes (16 bytes per native tile).
PAGES_REMEMBERED = 16


def parsed_tiff(path: str | Path, stat: os.stat_result) -> ParsedTiff:
    """The file's pages, parsed once per process with tifffile (which raises on a damaged directory) and shared: the
    completeness check, the reader probe, the thumbnail and each block all open the slide, and a parse costs ~1 ms
    (a 1-gigapixel slide's several). The pages are bound at parsing, so the TIFF is closed again at once. Keyed by
    ``file_identity``: a file changed moments ago is parsed afresh."""
    import tifffile

    identity = file_identity(str(path), stat)
    if identity is not None and identity in _PARSED:
        return _PARSED[identity]
    ends, tiled = [], []
    with tifffile.TiffFile(path) as tif:
        for index, page in enumerate(tif.pages):
            offsets = np.asarray(page.dataoffsets, dtype=np.int64)
            counts = np.asarray(page.databytecounts, dtype=np.int64)
            ends.append(int((offsets + counts).max()) if offsets.size else 0)
            if page.is_tiled:
                tiled.append(_bind(index, page, offsets, counts))
    parsed = ParsedTiff(ends, tiled)
    return parsed if identity is None else remember(_PARSED, identity, parsed, PAGES_REMEMBERED)


def level_pages(path: str, stat: os.stat_result, levels: tuple) -> list[LevelPage]:
    """The page of each of the file's levels (``map_levels`` of its ``parsed_tiff``), shared by a process's readers
    with each level's ``fast_jpeg`` verdict once a reader has checked it."""
    return map_levels(parsed_tiff(path, stat).tiled, levels)
