"""Opening slides and reading their metadata and pixels.

OpenSlide reads every whole-slide format it knows; plain images (PNG, JPEG, flat TIFF) go through OpenSlide's own
PIL-backed ``ImageSlide`` fallback, so the rest of the pipeline sees one interface. Every function opens its own
handle: handles are never pickled or sent between processes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import re
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import openslide
from PIL import Image

from ..core.errors import CorruptSlideError, MissingMppError, UnsupportedFormatError

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
    as one slide per folder: a sub-folder of ``.dcm`` instances is one slide (named after the folder), and of the
    ``.dcm`` files directly in the directory the first stands for the series (the readers find the other instances).
    """
    slides: list[Path] = []
    ignored: list[dict] = []
    seen: set[Path] = set()
    for item in inputs:
        item = Path(item)
        if item.is_dir() and _is_dicom_series_folder(item):
            if item.resolve() not in seen:  # a folder of DICOM instances given as such: one slide
                seen.add(item.resolve())
                slides.append(item)
        elif item.is_dir():
            dicom_dirs_done: set[Path] = set()
            for child in sorted(item.iterdir()):
                if child.name.startswith("."):
                    continue
                if child.is_dir():
                    # a folder of DICOM instances is one slide (its series); other folders (MRXS data) are skipped
                    if any(p.suffix.lower() == ".dcm" for p in child.iterdir()) and child.resolve() not in seen:
                        seen.add(child.resolve())
                        slides.append(child)
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


def _is_dicom_series_folder(folder: Path) -> bool:
    """Every slide-format file of the folder is a DICOM instance (and there is one): the folder is one slide."""
    files = [p.suffix.lower() for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
             and p.suffix.lower() in SLIDE_EXTENSIONS]
    return bool(files) and all(suffix == ".dcm" for suffix in files)


def slide_fingerprint(path: str | Path, block: int = 1 << 20) -> str:
    """Content fingerprint: size plus hashes of the first and last MiB (fast on multi-GB files, changes on edits).

    Remembered per process by the file's identity and stat (inode, size, modification and change times): a run asks
    for a slide's fingerprint several times (stain pass, staleness check, metadata). As in git's index, a file changed
    in the last ``RECENT_S`` is hashed every time (file times are coarser than the edits a stat could miss)."""
    path = Path(path)
    if path.is_dir():  # a DICOM series: every instance counts
        digest = hashlib.sha256()
        for child in sorted(p for p in path.iterdir() if p.is_file()):
            digest.update(f"{child.name}:{slide_fingerprint(child, block)}".encode())
        return digest.hexdigest()[:24]
    stat = path.stat()
    identity = file_identity(path, stat)
    if identity is None:
        return _hash_file(str(path), block, stat.st_size)
    return _remembered_hash(block, *identity)


RECENT_S = 2.0


def file_identity(path: str | Path, stat: os.stat_result) -> tuple | None:
    """(path, device, inode, size, modification and change times): what a per-process memory of a file's checks is
    keyed by; None for a file changed in the last ``RECENT_S`` (as in git's index: file times are coarser than the
    edits a stat could miss), whose checks must be made again."""
    if time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) < RECENT_S * 1e9:
        return None
    return (str(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


FILES_REMEMBERED = 4096  # files a per-process memory of file checks holds before it starts again


def remember(memory: dict, identity: tuple, value, limit: int = FILES_REMEMBERED):
    """``memory[identity]``, set to ``value`` when absent (``dict.setdefault``), in a per-process memory of file checks
    keyed by ``file_identity`` that is emptied when it reaches ``limit`` entries."""
    if identity not in memory and len(memory) >= limit:
        memory.clear()
    return memory.setdefault(identity, value)


@functools.lru_cache(maxsize=FILES_REMEMBERED)
def _remembered_hash(block: int, path: str, device: int, inode: int, size: int, *times: int) -> str:
    return _hash_file(path, block, size)


def _hash_file(path: str, block: int, size: int) -> str:
    digest = hashlib.sha256()
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


def open_handle(path: Path):
    """(handle, backend) of a slide: OpenSlide, else the plain-image fallback (``image``); errors are typed."""
    if not path.exists():
        raise UnsupportedFormatError("file does not exist", path=path, fix="Check the path for typos.")
    if path.is_dir():  # a folder of DICOM instances: OpenSlide opens the series from any one of them
        instances = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".dcm")
        if not instances:
            raise UnsupportedFormatError("a folder without DICOM (.dcm) instances", path=path)
        path = instances[0]
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
    from .tiff_pages import parsed_tiff  # the direct reader's parse of the file (that module imports this one)

    stat = path.stat()
    identity = file_identity(path, stat)
    if identity is not None and identity in _COMPLETE_TIFFS:  # checked in this process (each slide is opened often)
        return
    size = stat.st_size
    try:
        ends = parsed_tiff(path, stat).data_ends
    except Exception as err:  # noqa: BLE001 - tifffile raises many types on broken directories
        raise CorruptSlideError(f"the TIFF structure is damaged ({type(err).__name__}: {err})", path=path) from None
    for index, end in enumerate(ends):
        if end > size:
            raise CorruptSlideError(
                f"truncated: image data of TIFF page {index} ends at byte {end} but the file has {size} bytes",
                path=path)
    if identity is not None:
        remember(_COMPLETE_TIFFS, identity, True)


_COMPLETE_TIFFS: dict[tuple, bool] = {}  # file identities of TIFFs found complete


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
    handle, _ = open_handle(Path(path))
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


def _dicom_slide_info(path: Path, mpp_override: float | None, opened_error: Exception,
                      fingerprint: str | None = None) -> SlideInfo:
    """``SlideInfo`` of a DICOM series OpenSlide cannot open, from wsidicom (backend ``dicom``)."""
    from .dicom import dicom_metadata, explain_unreadable, open_wsidicom

    try:
        slide = open_wsidicom(path)
    except Exception as err:  # noqa: BLE001 - wsidicom's and pydicom's own types
        raise explain_unreadable(path, getattr(opened_error, "detail", str(opened_error)),
                                 f"{type(err).__name__}: {err}") from None
    try:
        meta = dicom_metadata(slide)
        associated = tuple(name for name, images in (("label", slide.labels), ("macro", slide.overviews)) if images)
    finally:
        slide.close()
    mpp, source = (meta["mpp"], "slide_metadata") if meta["mpp"] else (None, "none")
    slide_mpp = mpp
    if mpp_override is not None:
        mpp, source = float(mpp_override), "override"
    dims = meta["level_dimensions"]
    return SlideInfo(path=str(path), slide_id=slide_id_from_path(path), backend="dicom", vendor="dicom",
                     width_px=dims[0][0], height_px=dims[0][1], level_count=len(dims), level_dimensions=dims,
                     level_downsamples=meta["level_downsamples"], mpp=mpp, mpp_source=source, slide_mpp=slide_mpp,
                     objective_power=None, fingerprint=fingerprint or slide_fingerprint(path),
                     associated_images=associated)


def read_slide_info(path: str | Path, mpp_override: float | None = None, fingerprint: str | None = None) -> SlideInfo:
    """Metadata of one slide; ``mpp_source`` says where the resolution came from. ``fingerprint``: the file's
    ``slide_fingerprint`` when the caller has it (a worker is sent the client's: hashing 2 MiB again costs ~1.5 ms).

    A DICOM series OpenSlide cannot open (a transfer syntax it lacks, e.g. RLE or JPEG-LS) is read through wsidicom
    (``backend`` ``dicom``); one that neither opens gets an error naming what its headers lack.
    """
    path = Path(path)
    try:
        handle, backend = open_handle(path)
    except (UnsupportedFormatError, CorruptSlideError) as err:
        from .dicom import is_dicom

        if path.exists() and is_dicom(path):
            return _dicom_slide_info(path, mpp_override, err, fingerprint)
        raise
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
            fingerprint=fingerprint or slide_fingerprint(path),
            associated_images=tuple(sorted(handle.associated_images.keys())),
        )
    finally:
        handle.close()
