"""DICOM whole-slide images (VL Whole Slide Microscopy series) read through wsidicom.

A DICOM slide is a series of instances, one per pyramid level (plus thumbnail, label, overview), usually a folder of
``.dcm`` files; a slide path is either that folder or one of its files (then its folder's instances are the series,
as OpenSlide does it). wsidicom decodes the frames itself (JPEG, JPEG 2000, JPEG-LS, RLE, uncompressed...), so it
reads series OpenSlide cannot open (e.g. RLE or JPEG-LS transfer syntaxes) and, without OpenSlide's compositing, reads
the ones it can open faster. ``DicomReader`` is a ``TileReader`` like the others: OpenSlide's region semantics, RGB
uint8, white outside the image.

A file that neither OpenSlide nor wsidicom opens is explained from its header (pydicom): a VL whole-slide instance
without the ImageType attribute, for instance, is a valid DICOM file whose role in the pyramid no reader can tell
(OpenSlide: "Couldn't get image flavor", wsidicom: no levels): ``unsupported_format`` naming the missing attribute,
not ``corrupt_slide``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..core.errors import CorruptSlideError, TileReadError, UnsupportedFormatError
from .readers import BACKGROUND, TileReader

DICOM_SUFFIX = ".dcm"
VL_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
# Attributes a VL whole-slide instance needs before any reader can place it in a pyramid.
REQUIRED_WSI_ATTRIBUTES = {
    "ImageType": "(0008,0008)", "TotalPixelMatrixColumns": "(0048,0006)", "TotalPixelMatrixRows": "(0048,0007)",
    "Columns": "(0028,0011)", "Rows": "(0028,0010)",
}


def is_dicom(path: str | Path) -> bool:
    """A ``.dcm`` file, a folder holding ``.dcm`` files, or a file with the DICOM preamble ('DICM' at byte 128)."""
    path = Path(path)
    if path.is_dir():
        return any(p.suffix.lower() == DICOM_SUFFIX for p in path.iterdir())
    if path.suffix.lower() == DICOM_SUFFIX:
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def series_files(path: str | Path) -> list[Path]:
    """The instances of the series at ``path``: a folder's ``.dcm`` files, or those of a file's folder."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == DICOM_SUFFIX)
    if path.is_file() and path not in files:
        files.insert(0, path)
    return files


def open_wsidicom(path: str | Path):
    """The series as a ``wsidicom.WsiDicom``; its own error when wsidicom cannot open it."""
    from wsidicom import WsiDicom

    return WsiDicom.open(series_files(path))


def dicom_metadata(slide) -> dict:
    """Level sizes, downsamples (OpenSlide's definition: mean of the width and height ratios) and mpp of a series."""
    dims = tuple((int(level.size.width), int(level.size.height)) for level in slide.levels)
    w0, h0 = dims[0]
    downsamples = tuple((w0 / w + h0 / h) / 2 for w, h in dims)
    mpp = slide.mpp
    mpp_value = (float(mpp.width) + float(mpp.height)) / 2 if mpp is not None else None
    return {"level_dimensions": dims, "level_downsamples": downsamples,
            "mpp": mpp_value if mpp_value and math.isfinite(mpp_value) and mpp_value > 0 else None}


def explain_unreadable(path: str | Path, openslide_message: str, wsidicom_message: str) -> Exception:
    """The typed error for a DICOM slide no reader opens, from what its headers lack."""
    import pydicom
    import pydicom.errors

    problems = []
    for file in series_files(path)[:64]:
        try:
            ds = pydicom.dcmread(file, defer_size="1 KB")  # parses every element; large values stay on disk
        except pydicom.errors.InvalidDicomError:
            return UnsupportedFormatError(f"{file.name} is not a DICOM file (no DICM preamble), nor a format "
                                          "OpenSlide reads", path=path)
        except Exception as err:  # noqa: BLE001 - pydicom raises many types for damaged files
            return CorruptSlideError(f"{file.name} is a damaged DICOM file ({type(err).__name__}: {err})",
                                     path=path)
        sop = str(ds.get("SOPClassUID", ""))
        if sop != VL_WSI_SOP_CLASS:
            problems.append(f"{file.name} is not a VL Whole Slide Microscopy image (SOP class {sop or 'missing'})")
            continue
        missing = [f"{name} {tag}" for name, tag in REQUIRED_WSI_ATTRIBUTES.items() if name not in ds]
        if missing:
            problems.append(f"{file.name} lacks {', '.join(missing)}")
    detail = "; ".join(problems) if problems else "no pyramid level found"
    return UnsupportedFormatError(
        f"no reader can open this DICOM series: {detail} (OpenSlide: {openslide_message}; wsidicom: {wsidicom_message})",
        path=path, fix="Re-export the slide as a complete DICOM WSI series (each VL Whole Slide Microscopy instance "
                       "with ImageType, e.g. ORIGINAL\\PRIMARY\\VOLUME\\NONE for pyramid levels), or convert the "
                       "scanner's original file with wsidicomizer.")


class DicomReader(TileReader):
    """Regions of a DICOM WSI series through wsidicom (frames decoded by wsidicom; it caches decoded frames).

    ``level_dimensions`` / ``level_downsamples``: the slide's (``SlideInfo``), checked against the series'.
    """

    kind = "dicom"

    def __init__(self, path: str | Path, level_dimensions=None, level_downsamples=None):
        self.path = str(path)
        try:
            self._slide = open_wsidicom(path)
        except Exception as err:  # noqa: BLE001 - wsidicom raises its own types and pydicom's
            raise TileReadError(f"wsidicom cannot open the series ({type(err).__name__}: {err})", path=path) from None
        meta = dicom_metadata(self._slide)
        self.level_dimensions = meta["level_dimensions"]
        self.level_downsamples = meta["level_downsamples"]
        if level_dimensions is not None and tuple(tuple(d) for d in level_dimensions) != self.level_dimensions:
            self.close()
            raise TileReadError(f"wsidicom sees levels {self.level_dimensions}, not {tuple(level_dimensions)}",
                                path=path)
        self._pyramid_levels = [int(level.level) for level in self._slide.levels]

    def read_region(self, level: int, x_l0: int, y_l0: int, w_lvl: int, h_lvl: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        return self.read_level(level, int(round(x_l0 / ds)), int(round(y_l0 / ds)), w_lvl, h_lvl)

    def read_level(self, level: int, x_lvl: int, y_lvl: int, w_lvl: int, h_lvl: int) -> np.ndarray:
        width, height = self.level_dimensions[level]
        out = np.empty((int(h_lvl), int(w_lvl), 3), dtype=np.uint8)
        x0, y0 = max(int(x_lvl), 0), max(int(y_lvl), 0)
        x1, y1 = min(int(x_lvl) + int(w_lvl), width), min(int(y_lvl) + int(h_lvl), height)
        if (x0, y0, x1, y1) != (x_lvl, y_lvl, x_lvl + w_lvl, y_lvl + h_lvl):
            out.fill(BACKGROUND)
        if x0 >= x1 or y0 >= y1:
            return out
        try:
            region = self._slide.read_region((x0, y0), self._pyramid_levels[level], (x1 - x0, y1 - y0))
        except Exception as err:  # noqa: BLE001 - decoder errors of damaged frames
            raise TileReadError(f"reading level {level} at ({x_lvl}, {y_lvl}) failed: {type(err).__name__}: {err}",
                                path=self.path) from None
        pixels = np.asarray(region)
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[..., None], 3, axis=2)
        elif pixels.shape[2] == 4:  # composite on white, as OpenSlide does
            alpha = pixels[..., 3:4].astype(np.float32) / 255.0
            pixels = np.clip(pixels[..., :3] * alpha + BACKGROUND * (1 - alpha) + 0.5, 0, 255).astype(np.uint8)
        out[y0 - y_lvl:y1 - y_lvl, x0 - x_lvl:x1 - x_lvl] = pixels[..., :3]
        return out

    def close(self) -> None:
        slide, self._slide = getattr(self, "_slide", None), None
        if slide is not None:
            slide.close()
