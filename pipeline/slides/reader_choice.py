"""Which reader a slide is read with (``reader.kind``): ``auto`` takes the direct TIFF reader when the slide
qualifies and its probe tiles decode to OpenSlide's pixels, wsidicom for DICOM series (always for series OpenSlide
cannot open; for the others when its probe tiles match OpenSlide's), else OpenSlide (see ``pipeline.slides.readers``
and ``pipeline.slides.dicom``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

import numpy as np

from ..core.errors import DirectReadUnsupportedError, TileReadError
from .dicom import DicomReader
from .open import SlideInfo, remember
from .pixels import best_level_for_downsample, reduce_box
from .readers import DIRECT_VENDORS, OpenSlideReader, TiffTileReader, TileReader

READER_KINDS = ("auto", "openslide", "tiff", "dicom")


@dataclass(frozen=True)
class ReaderChoice:
    """The reader a slide's tasks use (plain data: it travels to workers with the tasks)."""

    kind: str                                   # "openslide" or "tiff"
    requested: str                              # "auto", "openslide" or "tiff"
    reason: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    jpeg_scale: int = 1                         # DCT-domain scale tiles are decoded at (1 = full size)
    decode_reason: str = ""

    @property
    def fallback(self) -> bool:
        return self.requested == "auto"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "requested": self.requested, "reason": self.reason,
                "level_dimensions": [list(d) for d in self.level_dimensions],
                "level_downsamples": list(self.level_downsamples), "jpeg_scale": self.jpeg_scale,
                "decode_reason": self.decode_reason}

    @property
    def decode(self) -> str:
        """Which decode path ran, as recorded in the store: full-size decode + area average, or DCT-scaled."""
        return f"jpeg_dct_1/{self.jpeg_scale}" if self.jpeg_scale > 1 else "full"

    @classmethod
    def from_dict(cls, data: dict) -> "ReaderChoice":
        return cls(kind=data["kind"], requested=data["requested"], reason=data.get("reason", ""),
                   level_dimensions=tuple(tuple(int(v) for v in d) for d in data["level_dimensions"]),
                   level_downsamples=tuple(float(d) for d in data["level_downsamples"]),
                   jpeg_scale=int(data.get("jpeg_scale", 1)), decode_reason=data.get("decode_reason", ""))


def direct_read_problem(info: SlideInfo) -> str | None:
    """Why this slide cannot use the direct TIFF reader (None when it can)."""
    direct, problem = open_direct(info)
    if direct is not None:
        direct.close()
    return problem


def open_direct(info: SlideInfo) -> tuple[TiffTileReader | None, str | None]:
    """(the slide's direct TIFF reader, open: close it, None), or (None, why the slide cannot use one)."""
    if info.backend != "openslide":
        return None, f"read through the {info.backend} fallback, not a tiled TIFF"
    if info.vendor not in DIRECT_VENDORS:
        return None, f"OpenSlide vendor '{info.vendor}' is not one of {sorted(DIRECT_VENDORS)}"
    try:
        return TiffTileReader(info.path, info.level_dimensions, info.level_downsamples), None
    except DirectReadUnsupportedError as err:
        return None, err.detail


PROBE_PX = 96  # edge of each probe region: enough to see a wrong colour space or table, cheap for OpenSlide


def _probe_regions(reader: TiffTileReader, levels: Iterable[int] | None = None) -> list[tuple[int, int, int, int, int]]:
    """(level, x_l0, y_l0, w, h) regions compared between readers before ``auto`` trusts the direct one: a piece of
    a native tile in the middle of level 0 and the top-left corner of every other level (exact at any downsample);
    ``levels``: only those (the levels the slide is read at), None = all."""
    regions = []
    for level in sorted(set(range(reader.level_count) if levels is None else levels)):
        if level == 0:
            x, y, _, _, width, height = reader.centre_tile(0)
            regions.append((0, x, y, min(PROBE_PX, width - x), min(PROBE_PX, height - y)))
        else:
            w, h = reader.level_dimensions[level]
            regions.append((level, 0, 0, min(w, PROBE_PX), min(h, PROBE_PX)))
    return regions


def choose_reader(info: SlideInfo, requested: str, read_level: int | None = None, shrink: float = 1.0,
                  scaled_decode: bool = False, thumbnail_downsample: float | None = None) -> ReaderChoice:
    """The reader for one slide: ``openslide``, ``tiff`` (the slide must qualify), or ``auto``.

    ``auto`` uses the direct reader when the slide qualifies, the tiles are read from a level the direct reader
    decodes itself (``read_level`` has a whole-number downsample) and its probe regions decode to exactly OpenSlide's
    pixels; else OpenSlide. ``reason`` says why. Runs where the slide is prepared (a worker).
    ``scaled_decode``: with the direct reader, JPEG tiles of ``read_level`` that the tile grid shrinks by ``shrink``
    (>= 2) are decoded at 1/2, 1/4 or 1/8 in the DCT domain when a probe tile stays within ``SCALED_PROBE_TOLERANCE``
    of the area average (``jpeg_scale``, ``decode_reason``).
    ``thumbnail_downsample``: with ``read_level``, the slide is read at those two levels only (its tiles, its
    thumbnail: ``read_thumbnail``'s level), and only they are probed (each probe region costs ~1 ms of decoding);
    None = every level is probed.
    """
    levels = None
    if read_level is not None and thumbnail_downsample is not None:
        levels = {read_level, best_level_for_downsample(info.level_downsamples, max(float(thumbnail_downsample), 1.0))}
    choice = _choose_kind(info, requested, read_level, levels)
    if choice.kind != "tiff" or not scaled_decode or read_level is None:
        return choice
    scale, why = _scaled_decode_check(info, read_level, shrink)
    return replace(choice, jpeg_scale=scale, decode_reason=why)


# Mean absolute difference (grey levels) allowed between a probe tile decoded at 1/scale and the area average of its
# full decode; measured 0.1-1.3 on real and generated H&E (tests/slides/test_jpeg.py). A wrong colour space or a
# broken scaled decoder gives tens.
SCALED_PROBE_TOLERANCE = 3.0


def _scaled_decode_check(info: SlideInfo, level: int, shrink: float) -> tuple[int, str]:
    """(scale, reason): the DCT-domain scale tiles of ``level`` can be decoded at, checked on a probe tile."""
    try:
        with TiffTileReader(info.path, info.level_dimensions, info.level_downsamples, max_jpeg_scale=8) as direct:
            scale = direct.scale_for(level, shrink)
            if scale == 1:
                return 1, (f"full decode: level {level} is not JPEG, its tiles do not divide, or the tiles are "
                           f"shrunk {shrink:.4g}x (< 2)")
            x, y, tile_w, tile_h, width, height = direct.centre_tile(level)
            w, h = min(tile_w, width - x) // scale, min(tile_h, height - y) // scale
            x, y = x // scale, y // scale
            scaled = direct.read_level_scaled(level, x, y, w, h, scale)
            full = direct.read_level(level, x * scale, y * scale, w * scale, h * scale)
    except (DirectReadUnsupportedError, TileReadError) as err:
        return 1, f"full decode: the scaled probe failed ({err.detail})"
    diff = float(np.abs(scaled.astype(np.int16) - reduce_box(full, 0, 0, scale, w, h)).mean())
    if diff > SCALED_PROBE_TOLERANCE:
        return 1, f"full decode: the 1/{scale} probe tile differs from the area average by {diff:.2f} grey levels"
    return scale, f"JPEG tiles decoded at 1/{scale} (probe tile {diff:.2f} grey levels from the area average)"


# The probe's verdicts, per process, by how the probed tiles are coded (``_probe_coding``): slides from one scanner
# share their JPEG tables, headers and tile layout, and give the probe (an OpenSlide handle and its regions decoded by
# both readers: ~2.7 ms of a small slide's ~90 ms) the same answer; libjpeg-turbo's output depends on those codes, not
# on the file. Read failures are the file's own and are not remembered.
_PROBED: dict[tuple, tuple[str, str]] = {}
PROBED_REMEMBERED = 64
REMEMBERED_NOTE = " (a slide whose probed tiles are coded the same way was probed in this process)"


def _probe_coding(info: SlideInfo, direct: TiffTileReader, regions: list[tuple[int, int, int, int, int]]
                  ) -> tuple | None:
    """The vendor and each probe region's level, size and tile coding (``TiffTileReader.tile_coding``); None when a
    tile is not JPEG or its headers cannot be read (the slide is then probed)."""
    codings = []
    for level, x, y, w, h in regions:
        ds = direct.level_downsamples[level]
        coding = direct.tile_coding(level, int(x / ds), int(y / ds))
        if coding is None:
            return None
        codings.append((level, w, h, coding))
    return (info.vendor, tuple(codings))


def _choose_kind(info: SlideInfo, requested: str, read_level: int | None, levels: set[int] | None = None
                 ) -> ReaderChoice:
    if requested not in READER_KINDS:
        raise ValueError(f"unknown reader {requested!r}; expected one of {READER_KINDS}")

    def choice(kind: str, reason: str) -> ReaderChoice:
        return ReaderChoice(kind, requested, reason, info.level_dimensions, info.level_downsamples)

    if info.backend == "dicom":  # OpenSlide could not open the series: wsidicom is the only reader
        if requested == "tiff":
            raise DirectReadUnsupportedError("the direct TIFF reader cannot read a DICOM series", path=info.path)
        return choice("dicom", "a DICOM series OpenSlide cannot open (e.g. its transfer syntax): read by wsidicom")
    if requested == "dicom" or (requested == "auto" and info.vendor == "dicom"):
        return _dicom_choice(info, requested, choice)
    if requested == "openslide":
        return choice("openslide", "requested")
    direct, problem = open_direct(info)  # the one opened to check is the one probed
    if problem is not None:
        if requested == "tiff":
            raise DirectReadUnsupportedError(f"the direct TIFF reader cannot read it: {problem}", path=info.path)
        return choice("openslide", problem)
    with direct:
        if requested == "tiff":
            return choice("tiff", "requested")
        if read_level is not None and not float(info.level_downsamples[read_level]).is_integer():
            return choice("openslide", f"tiles are read from level {read_level}, whose downsample "
                                       f"{info.level_downsamples[read_level]:.6g} is fractional: OpenSlide "
                                       "interpolates sub-pixel positions there, which only OpenSlide reproduces")
        regions = _probe_regions(direct, levels)
        coding = _probe_coding(info, direct, regions)
        if coding in _PROBED:
            kind, reason = _PROBED[coding]
            return choice(kind, reason + REMEMBERED_NOTE)
        try:
            verdict = _probe(direct, info, regions)
        except (DirectReadUnsupportedError, TileReadError) as err:
            return choice("openslide", f"direct probe failed: {err.detail}")
    if coding is not None:
        remember(_PROBED, coding, verdict, PROBED_REMEMBERED)
    return choice(*verdict)


def _probe(direct: TiffTileReader, info: SlideInfo, regions: list[tuple[int, int, int, int, int]]) -> tuple[str, str]:
    """(kind, reason): ``tiff`` when every region decodes directly to OpenSlide's pixels."""
    with OpenSlideReader(info.path) as reference:
        for region in regions:
            if not np.array_equal(direct.read_region(*region), reference.read_region(*region)):
                return "openslide", (f"direct decode differs from OpenSlide at level {region[0]} "
                                     f"({region[1]}, {region[2]})")
    return "tiff", "qualified: tiled TIFF pages, probe tiles identical to OpenSlide"


def _dicom_choice(info: SlideInfo, requested: str, choice) -> ReaderChoice:
    """wsidicom for a DICOM series OpenSlide opens too, when its probe regions give OpenSlide's pixels."""
    if info.vendor != "dicom":
        raise DirectReadUnsupportedError(f"wsidicom reads DICOM series only (OpenSlide vendor '{info.vendor}')",
                                         path=info.path)
    if requested == "dicom":
        return choice("dicom", "requested")
    try:
        with DicomReader(info.path, info.level_dimensions) as dicom, OpenSlideReader(info.path) as reference:
            w, h = info.level_dimensions[0]
            regions = [(0, w // 2 // 256 * 256, h // 2 // 256 * 256, min(w, 256), min(h, 256))]
            regions += [(level, 0, 0, min(lw, 256), min(lh, 256)) for level, (lw, lh) in enumerate(info.level_dimensions)]
            for region in regions:
                if not np.array_equal(dicom.read_region(*region), reference.read_region(*region)):
                    return choice("openslide", f"wsidicom's pixels differ from OpenSlide's at level {region[0]}")
    except TileReadError as err:
        return choice("openslide", f"wsidicom probe failed: {err.detail}")
    return choice("dicom", "DICOM series: wsidicom decodes its frames, probe tiles identical to OpenSlide")


def open_reader(path: str | Path, choice: ReaderChoice | dict | None = None, decode_threads: bool = False) -> TileReader:
    """Open the chosen reader for one task (use as a context manager); ``None`` = OpenSlide. ``decode_threads``: the
    direct reader decodes large regions (a thumbnail's level) on two threads."""
    if isinstance(choice, dict):
        choice = ReaderChoice.from_dict(choice)
    if choice is None or choice.kind == "openslide":
        return OpenSlideReader(path)
    if choice.kind == "dicom":
        return DicomReader(path, choice.level_dimensions)
    return TiffTileReader(path, choice.level_dimensions, choice.level_downsamples, fallback=choice.fallback,
                          max_jpeg_scale=choice.jpeg_scale, decode_threads=decode_threads)
