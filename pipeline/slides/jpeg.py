"""JPEG tiles decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (libjpeg-turbo's scaled IDCT, through simplejpeg).

When the target resolution is at least twice as coarse as the level read (0.5 µm/px from a 0.25 µm/px level 0, the
common 40x case), decoding a native tile at full size and then area-averaging it throws away three quarters of the
work. libjpeg-turbo can run a smaller inverse DCT per 8x8 block instead and hand back the tile already at 1/2, 1/4 or
1/8 of its size. The pixels are close to an area average of the full decode but not equal (the scaled IDCT is a
low-pass in the frequency domain, not a box filter); ``tests/slides/test_jpeg.py`` quantifies it.

Why simplejpeg: measured per 256-px Aperio-style tile on one core, full decode 0.31 ms (imagecodecs 0.37 ms), 1/2
scale 0.19-0.23 ms; Pillow's ``draft()`` reaches the same libjpeg call but costs 0.41 ms at 1/2 through its Python
layers; PyTurboJPEG needs a system libturbojpeg, which a pip install does not bring. simplejpeg ships libjpeg-turbo
in its wheel.

TIFF tiles are abbreviated JPEG streams (the tables live in the TIFF's JPEGTables tag) and carry no colour-space
marker: libjpeg guesses YCbCr for any 3-component stream, which is wrong for Aperio's RGB JPEG (photometric 2). So the
stream handed to libjpeg is rebuilt: SOI, an Adobe APP14 segment whose transform flag states the colour space (0 =
RGB, 1 = YCbCr), the tables, then the tile's own segments.
"""

from __future__ import annotations

import numpy as np

try:
    import simplejpeg
except ImportError:  # pragma: no cover - a dependency; without it every tile is decoded at full size
    simplejpeg = None

SCALES = (8, 4, 2)  # the power-of-two scales libjpeg offers below 1 (M/8 with M = 1, 2, 4)

SOI = b"\xff\xd8"
EOI = b"\xff\xd9"


def available() -> bool:
    return simplejpeg is not None


def adobe_segment(rgb: bool) -> bytes:
    """APP14 'Adobe' segment: transform 0 = the three components are RGB, 1 = YCbCr."""
    return b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00" + (b"\x00" if rgb else b"\x01")


def stream_prefix(jpegtables: bytes | None, rgb: bool) -> bytes:
    """What goes before a tile's own segments: SOI, the colour-space marker, the shared tables (without SOI/EOI)."""
    tables = b""
    if jpegtables:
        tables = jpegtables[2:] if jpegtables.startswith(SOI) else jpegtables
        tables = tables[:-2] if tables.endswith(EOI) else tables
    return SOI + adobe_segment(rgb) + tables


def full_stream(prefix: bytes, tile: bytes) -> bytes:
    """A decodable JPEG from ``stream_prefix`` and one TIFF tile's bytes (which start with their own SOI)."""
    return prefix + (tile[2:] if tile.startswith(SOI) else tile)


SOS = 0xDA
STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # markers without a length (TEM, RSTn)


def headers(tile: bytes, limit: int = 4096) -> bytes | None:
    """A JPEG tile's bytes before its entropy-coded data: SOI and every segment up to and including the scan header
    (frame header, sampling factors, any tables or restart interval of its own); None when they are not found within
    ``limit`` bytes. With the stream prefix, they are all that a decoder's settings act on."""
    if not tile.startswith(SOI):
        return None
    at = 2
    while at + 4 <= min(len(tile), limit):
        if tile[at] != 0xFF:
            return None
        marker = tile[at + 1]
        if marker in STANDALONE:
            at += 2
            continue
        at += 2 + int.from_bytes(tile[at + 2:at + 4], "big")
        if marker == SOS:
            return tile[:at] if at <= len(tile) else None
    return None


def scale_for(factor: float, tile_w: int, tile_h: int, max_scale: int = 8) -> int:
    """The largest scale in ``SCALES`` (<= ``max_scale``) that is no coarser than ``factor`` (level pixels per target
    pixel) and divides the native tile size, so scaled tiles butt exactly; 1 when none does."""
    for scale in SCALES:
        if scale <= max_scale and scale <= factor * (1 + 1e-9) and tile_w % scale == 0 and tile_h % scale == 0:
            return scale
    return 1


def decode_scaled(stream: bytes, tile_w: int, tile_h: int, scale: int) -> np.ndarray:
    """An RGB uint8 (tile_h / scale, tile_w / scale, 3) array: the JPEG tile decoded by libjpeg at 1/``scale``."""
    out_w, out_h = tile_w // scale, tile_h // scale
    image = simplejpeg.decode_jpeg(stream, colorspace="RGB", min_width=out_w, min_height=out_h)
    if image.shape[:2] != (out_h, out_w):
        raise ValueError(f"scaled decode gave {image.shape[1]}x{image.shape[0]} px, expected {out_w}x{out_h} "
                         f"(a {tile_w}x{tile_h} tile at 1/{scale})")
    return image
