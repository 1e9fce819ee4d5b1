"""Opening slides and reading their metadata and pixels.

OpenSlide reads every whole-slide format it knows; plain images (PNG, JPEG, flat TIFF) go through OpenSlide's own
PIL-backed ``ImageSlide`` fallback, so the rest of the pipeline sees one interface. Every function opens its own
handle: handles are never pickled or sent between processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import openslide
from PIL import Image

from .core.jit import njit
from .core.errors import CorruptSlideError, MissingMppError, TileReadError, UnsupportedFormatError

Image.MAX_IMAGE_PIXELS = None  # flat images are read through ImageSlide; size is checked by the caller

# Extensions looked at when a directory is given. Everything else in the directory is listed as ignored.
SLIDE_EXTENSIONS = frozenset({
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm", ".czi",
    ".png", ".jpg", ".jpeg",
})
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg"})

MPP_SOURCES = ("override", "slide_metadata", "tiff_resolution", "image_dpi", "none")


def sanitize_slide_id(name: str) -> str:
    """A slide id that is safe as a file name on every OS: ASCII letters, digits, '.', '_', '-'.

    Accents are folded (``Präparat`` -> ``Praparat``); other characters become ``_``; leading dots are removed so an id
    never hides a file or walks up a directory.
    """
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", folded).strip("._")
    return cleaned[:200] or "slide"


def slide_id_from_path(path: str | Path) -> str:
    path = Path(path)
    name = path.name
    # Drop only the final extension (CMU-1.ome.tiff -> CMU-1.ome) so ids stay predictable.
    stem = name[: -len(path.suffix)] if path.suffix else name
    return sanitize_slide_id(stem)


def find_slides(inputs: list[str | Path]) -> tuple[list[Path], list[dict]]:
    """Expand files and directories into slide paths (sorted, de-duplicated) and a list of ignored files.

    Directories are scanned one level deep (MRXS companion folders are skipped). Multi-file DICOM slides are kept
    as one slide per folder: OpenSlide finds the other instances itself.
    """
    slides: list[Path] = []
    ignored: list[dict] = []
    seen: set[Path] = set()
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            dicom_dirs_done: set[Path] = set()
            for child in sorted(item.iterdir()):
                if child.name.startswith(".") or child.is_dir():
                    continue
                suffix = child.suffix.lower()
                if suffix not in SLIDE_EXTENSIONS:
                    ignored.append({"path": str(child), "reason": f"extension '{child.suffix}' is not a slide format"})
                    continue
                if suffix == ".dcm":
                    if child.parent in dicom_dirs_done:
                        ignored.append({"path": str(child), "reason": "another DICOM instance of the same folder is read as the slide"})
                        continue
                    dicom_dirs_done.add(child.parent)
                if child.resolve() not in seen:
                    seen.add(child.resolve())
                    slides.append(child)
        elif item.exists() or item.is_symlink():
            if item.resolve() not in seen:
                seen.add(item.resolve())
                slides.append(item)
        else:
            # A missing path is the user's typo: keep it so it is reported as a failed slide, not silently dropped.
            slides.append(item)
    return slides, ignored


def slide_fingerprint(path: str | Path, block: int = 1 << 20) -> str:
    """Content fingerprint: size plus hashes of the first and last MiB (fast on multi-GB files, changes on edits)."""
    path = Path(path)
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(str(size).encode())
    with open(path, "rb") as fh:
        digest.update(fh.read(block))
        if size > block:
            fh.seek(max(size - block, block))
            digest.update(fh.read(block))
    return digest.hexdigest()[:24]


@dataclass(frozen=True)
class SlideInfo:
    path: str
    slide_id: str
    backend: str                       # "openslide" or "image" (PIL fallback)
    vendor: str | None
    width_px: int                      # level 0
    height_px: int
    level_count: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None                  # level-0 microns per pixel actually used
    mpp_source: str                    # one of MPP_SOURCES
    slide_mpp: float | None            # what the file itself says (None if nothing)
    objective_power: float | None
    fingerprint: str
    associated_images: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return asdict(self)

    def require_mpp(self) -> float:
        if self.mpp is None:
            raise MissingMppError("the slide records no microns-per-pixel resolution", path=self.path)
        return self.mpp


def _open_handle(path: Path):
    if not path.exists():
        raise UnsupportedFormatError("file does not exist", path=path, fix="Check the path for typos.")
    if path.is_file() and path.stat().st_size == 0:
        raise CorruptSlideError("file is empty (0 bytes)", path=path)
    if path.is_file() and _has_tiff_header(path):
        check_tiff_complete(path)
    try:
        return openslide.OpenSlide(str(path)), "openslide"
    except openslide.OpenSlideUnsupportedFormatError:
        pass
    except openslide.OpenSlideError as err:
        msg = str(err)
        if "Unsupported" in msg:
            raise UnsupportedFormatError(f"OpenSlide cannot read it ({msg})", path=path) from None
        raise CorruptSlideError(f"OpenSlide failed to open it ({msg})", path=path) from None
    except Exception as err:  # noqa: BLE001 - OpenSlide raises plain errors for some broken files
        raise CorruptSlideError(f"OpenSlide failed to open it ({type(err).__name__}: {err})", path=path) from None
    # Fallback: a plain image PIL can read (PNG, JPEG, flat TIFF).
    try:
        with Image.open(path) as probe:
            probe.verify()
        return openslide.ImageSlide(str(path)), "image"
    except Exception:  # noqa: BLE001 - PIL raises many types for non-images
        if _has_tiff_header(path):
            raise CorruptSlideError("the file starts like a TIFF/SVS but neither OpenSlide nor PIL can read it "
                                    "(truncated or damaged)", path=path) from None
        raise UnsupportedFormatError("neither OpenSlide nor the image fallback recognise this file", path=path) from None


def check_tiff_complete(path: Path) -> None:
    """Raise CorruptSlideError when a TIFF's image data runs past the end of the file (a truncated copy).

    OpenSlide opens many truncated TIFFs happily (the directory at the start is intact) and fails only later, tile
    by tile, or reports a misleading missing mpp; the offsets in the TIFF directories tell at once.
    """
    import tifffile

    size = path.stat().st_size
    try:
        with tifffile.TiffFile(path) as tif:
            for index, page in enumerate(tif.pages):
                offsets = np.asarray(page.dataoffsets, dtype=np.int64)
                counts = np.asarray(page.databytecounts, dtype=np.int64)
                end = int((offsets + counts).max()) if offsets.size else 0
                if end > size:
                    raise CorruptSlideError(
                        f"truncated: image data of TIFF page {index} ends at byte {end} but the file has {size} bytes",
                        path=path)
    except CorruptSlideError:
        raise
    except Exception as err:  # noqa: BLE001 - tifffile raises many types on broken directories
        raise CorruptSlideError(f"the TIFF structure is damaged ({type(err).__name__}: {err})", path=path) from None


def _has_tiff_header(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


@contextlib.contextmanager
def open_slide(path: str | Path) -> Iterator[openslide.AbstractSlide]:
    """Open a slide (OpenSlide, else the plain-image fallback) as a context manager; errors are typed."""
    handle, _ = _open_handle(Path(path))
    try:
        yield handle
    finally:
        handle.close()


def _float_or_none(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out > 0 else None


def _mpp_from_properties(props, vendor: str | None) -> tuple[float | None, str]:
    mpp_x = _float_or_none(props.get(openslide.PROPERTY_NAME_MPP_X))
    mpp_y = _float_or_none(props.get(openslide.PROPERTY_NAME_MPP_Y))
    mpp = mpp_x or mpp_y
    if mpp_x and mpp_y:
        mpp = (mpp_x + mpp_y) / 2
    if mpp is None:
        return None, "none"
    # OpenSlide derives mpp for generic TIFFs from the resolution tags; say so, since tags are often bogus (72 dpi).
    if vendor == "generic-tiff" and "tiff.ResolutionUnit" in props:
        return mpp, "tiff_resolution"
    return mpp, "slide_metadata"


def _mpp_from_image(path: Path) -> tuple[float | None, str]:
    try:
        with Image.open(path) as im:
            dpi = im.info.get("dpi")
    except Exception:  # noqa: BLE001
        return None, "none"
    if dpi and _float_or_none(dpi[0]):
        return 25400.0 / float(dpi[0]), "image_dpi"
    return None, "none"


def read_slide_info(path: str | Path, mpp_override: float | None = None) -> SlideInfo:
    """Metadata of one slide; ``mpp_source`` says where the resolution came from."""
    path = Path(path)
    handle, backend = _open_handle(path)
    try:
        props = handle.properties
        vendor = props.get(openslide.PROPERTY_NAME_VENDOR)
        if backend == "openslide":
            slide_mpp, source = _mpp_from_properties(props, vendor)
        else:
            slide_mpp, source = _mpp_from_image(path)
        mpp = slide_mpp
        if mpp_override is not None:
            mpp, source = float(mpp_override), "override"
        width, height = handle.dimensions
        return SlideInfo(
            path=str(path),
            slide_id=slide_id_from_path(path),
            backend=backend,
            vendor=vendor if backend == "openslide" else "image",
            width_px=int(width),
            height_px=int(height),
            level_count=int(handle.level_count),
            level_dimensions=tuple((int(w), int(h)) for w, h in handle.level_dimensions),
            level_downsamples=tuple(float(d) for d in handle.level_downsamples),
            mpp=mpp,
            mpp_source=source,
            slide_mpp=slide_mpp,
            objective_power=_float_or_none(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)),
            fingerprint=slide_fingerprint(path),
            associated_images=tuple(sorted(handle.associated_images.keys())),
        )
    finally:
        handle.close()


def best_level_for_downsample(level_downsamples: tuple[float, ...] | list[float], downsample: float) -> int:
    """Coarsest level that is still at least as fine as ``downsample`` (never upsample from a coarser level)."""
    best = 0
    for level, ds in enumerate(level_downsamples):
        if ds <= downsample * (1 + 1e-3):
            best = level if ds >= level_downsamples[best] else best
    return best


def rgba_to_rgb(rgba: np.ndarray, background: int = 255) -> np.ndarray:
    """Composite OpenSlide's RGBA (transparent outside the scanned area) over a white background."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.float32) / 255.0
    out = rgb.astype(np.float32) * a + background * (1.0 - a)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def read_level_region(handle, level: int, x_l0: int, y_l0: int, w_lvl: int, h_lvl: int, path: str = "") -> np.ndarray:
    """RGB uint8 of a region at ``level`` whose top-left is given in level-0 pixels; read errors become TileReadError."""
    try:
        region = handle.read_region((int(x_l0), int(y_l0)), level, (int(w_lvl), int(h_lvl)))
    except openslide.OpenSlideError as err:
        raise TileReadError(f"reading level {level} at ({x_l0}, {y_l0}) failed: {err}", path=path) from None
    except Exception as err:  # noqa: BLE001 - PIL decode errors from the image fallback
        raise TileReadError(f"reading level {level} at ({x_l0}, {y_l0}) failed: {type(err).__name__}: {err}", path=path) from None
    return rgba_to_rgb(np.asarray(region))


def resample(image: np.ndarray, out_w: int, out_h: int, box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Resize (a sub-box of) an RGB image. Area averaging (BOX) when shrinking, bilinear when enlarging."""
    return resample_boxes(image, out_w, out_h, [box])[0]


def reduce_box(image: np.ndarray, x0: int, y0: int, factor: int, out_w: int, out_h: int,
               out: np.ndarray | None = None) -> np.ndarray:
    """The box (x0, y0, out_w * factor, out_h * factor) of an (h, w, 3) uint8 image shrunk ``factor`` times by
    area averaging, with exactly PIL's ``Image.reduce`` arithmetic (its fixed-point rounding), into ``out``."""
    n = factor * factor
    multiplier = int(np.float32(4294967296.0) / np.float32(256 * n))  # Pillow's division_UINT32(n, 8)
    if out is None:
        out = np.empty((out_h, out_w, 3), dtype=np.uint8)
    if _reduce_box_kernel is None:
        box = image[y0:y0 + out_h * factor, x0:x0 + out_w * factor].astype(np.uint64)
        sums = box.reshape(out_h, factor, out_w, factor, 3).sum(axis=(1, 3))
        out[...] = ((sums + n // 2) * multiplier) >> 24
    elif factor == 2 and image.flags.c_contiguous and out.flags.c_contiguous:
        _reduce_2x2_kernel(image, x0, y0, out)  # the common 0.25 -> 0.5 µm/px case: (sum + 2) >> 2, as PIL
    else:
        _reduce_box_kernel(image, x0, y0, factor, multiplier, out)
    return out


@njit
def _reduce_box_kernel(image, x0, y0, factor, multiplier, out):
    out_h, out_w, _ = out.shape
    amend = (factor * factor) // 2
    for oy in range(out_h):
        ys = y0 + oy * factor
        for ox in range(out_w):
            xs = x0 + ox * factor
            s0 = s1 = s2 = amend
            for y in range(ys, ys + factor):
                for x in range(xs, xs + factor):
                    s0 += image[y, x, 0]
                    s1 += image[y, x, 1]
                    s2 += image[y, x, 2]
            out[oy, ox, 0] = (s0 * multiplier) >> 24
            out[oy, ox, 1] = (s1 * multiplier) >> 24
            out[oy, ox, 2] = (s2 * multiplier) >> 24


@njit
def _reduce_2x2_kernel(image, x0, y0, out):
    # Rows as flat RGB byte vectors. Two passes per output row: a vertical pair sum over the whole row span (unit
    # stride, vectorises), then the horizontal pairs. ((a + b + 1) + (c + d + 1)) >> 2 == (a + b + c + d + 2) >> 2,
    # PIL's rounding; 4x faster than one pass over 2x2 windows.
    out_h, out_w, _ = out.shape
    rows = image.reshape(image.shape[0], image.shape[1] * 3)
    flat = out.reshape(out_h, out_w * 3)
    n = 6 * out_w
    pair = np.empty(n, np.uint16)
    one = np.uint16(1)
    for oy in range(out_h):
        a = rows[y0 + 2 * oy, 3 * x0:3 * x0 + n]
        b = rows[y0 + 2 * oy + 1, 3 * x0:3 * x0 + n]
        for j in range(n):
            pair[j] = np.uint16(a[j]) + np.uint16(b[j]) + one
        o = flat[oy]
        for ox in range(out_w):
            p = 6 * ox
            q = 3 * ox
            o[q] = (pair[p] + pair[p + 3]) >> 2
            o[q + 1] = (pair[p + 1] + pair[p + 4]) >> 2
            o[q + 2] = (pair[p + 2] + pair[p + 5]) >> 2


def resample_boxes(image: np.ndarray, out_w: int, out_h: int,
                   boxes: list[tuple[float, float, float, float] | None],
                   dest: np.ndarray | None = None) -> list[np.ndarray]:
    """``resample`` of several boxes of one image, converting the image to PIL once (not once per box).

    Identical to calling ``resample`` per box. ``dest`` (len(boxes), out_h, out_w, 3): every result is written into
    it (whole-factor shrinks straight, without a temporary) and the returned arrays are its rows.
    """
    src_h, src_w = image.shape[:2]
    pil = None
    out = []
    for i, box in enumerate(boxes):
        target = None if dest is None else dest[i]
        if box is None:
            box = (0.0, 0.0, float(src_w), float(src_h))
        bw, bh = box[2] - box[0], box[3] - box[1]
        factor = bw / out_w
        if out_w == bw and out_h == bh and all(float(v).is_integer() for v in box):
            x0, y0 = int(box[0]), int(box[1])
            tile = image[y0:y0 + out_h, x0:x0 + out_w]
        elif factor == bh / out_h and factor >= 2 and factor.is_integer() and all(float(v).is_integer() for v in box):
            # Whole-factor shrink of a pixel-aligned box (e.g. 0.25 -> 0.5 µm/px): PIL's reduce(), the same area
            # average as resize(BOX) up to 1 grey level of rounding, 3x faster; compiled: another 3-5x, no copies.
            out.append(reduce_box(image, int(box[0]), int(box[1]), int(factor), out_w, out_h, out=target))
            continue
        else:
            if pil is None:
                pil = Image.fromarray(image)
            shrinking = bw >= out_w and bh >= out_h
            method = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
            tile = np.asarray(pil.resize((out_w, out_h), method, box=box))
        if target is not None:
            target[...] = tile
            tile = target
        out.append(tile)
    return out


def _read_region(handle, level: int, x_l0: int, y_l0: int, w_lvl: int, h_lvl: int, path: str) -> np.ndarray:
    """OpenSlide-semantics region from an OpenSlide handle or a ``pipeline.readers.TileReader``."""
    if hasattr(handle, "read_level"):  # a TileReader (direct TIFF reader or wrapped OpenSlide): same pixels
        return handle.read_region(level, x_l0, y_l0, w_lvl, h_lvl)
    return read_level_region(handle, level, x_l0, y_l0, w_lvl, h_lvl, path)


def read_thumbnail(handle, downsample: float, path: str = "", max_strip_px: int = 1 << 24) -> np.ndarray:
    """The whole slide at ``downsample`` (relative to level 0), read in strips so memory stays bounded.

    ``handle``: an OpenSlide handle or a ``pipeline.readers.TileReader`` (whose ``read_region`` returns OpenSlide's
    pixels), so the thumbnail, and the tissue mask made from it, does not depend on the reader.
    """
    width, height = handle.dimensions
    downsample = max(float(downsample), 1.0)
    out_w = max(1, int(round(width / downsample)))
    out_h = max(1, int(round(height / downsample)))
    level = best_level_for_downsample(list(handle.level_downsamples), downsample)
    lvl_ds = float(handle.level_downsamples[level])
    lvl_w, lvl_h = handle.level_dimensions[level]
    out = np.empty((out_h, out_w, 3), dtype=np.uint8)
    # Strip height in output rows so that one strip at the read level holds at most max_strip_px pixels.
    scale = downsample / lvl_ds  # level pixels per output pixel
    rows_per_strip = max(1, int(max_strip_px / max(lvl_w, 1) / scale))
    for oy in range(0, out_h, rows_per_strip):
        oh = min(rows_per_strip, out_h - oy)
        y_lvl0 = oy * scale
        y_lvl1 = min((oy + oh) * scale, lvl_h)
        iy0 = int(math.floor(y_lvl0))
        iy1 = max(iy0 + 1, int(math.ceil(y_lvl1)))
        strip = _read_region(handle, level, 0, int(round(iy0 * lvl_ds)), lvl_w, iy1 - iy0, path)
        box = (0.0, y_lvl0 - iy0, float(min(out_w * scale, lvl_w)), y_lvl1 - iy0)
        out[oy:oy + oh] = resample(strip, out_w, oh, box=box)
    return out
