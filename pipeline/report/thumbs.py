"""Small pictures the report links to: ``OUT/report_files/<slide_id>.<kind>.<ext>``, made once per slide.

Kinds: ``slide`` (the store's thumbnail, tiles QC excluded tinted by reason), ``map`` (``OUT/maps/<id>.png``), ``cam`` (``OUT/cam/<id>.png``, the CAM
over the slide with its colour bar). A picture is remade only when its source is newer than it, so a rerun of the
report over an unchanged cohort reads no slide data at all. Made by a thread pool (Pillow and the Zarr codecs release
the GIL while they decode, resize and encode).
"""

from __future__ import annotations

import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.artefacts import CAM_DIR, MAPS_DIR
from ..core.outputs import atomic_write_bytes
from ..core.qc_codes import QC_COLOURS
from ..core.store import has_array, read_array, read_attrs, store_path

REPORT_FILES_DIR = "report_files"
THUMB_PX = {"slide": 200, "map": 160, "cam": 320}
log = logging.getLogger("pipeline")
KINDS = tuple(THUMB_PX)


def thumb_name(slide_id: str, kind: str) -> str:
    """The picture's path relative to ``OUT/`` (what the page links to)."""
    return f"{REPORT_FILES_DIR}/{slide_id}.{kind}.{'png' if kind == 'map' else 'jpg'}"


def source_of(out_dir: Path, slide_id: str, kind: str) -> Path:
    """The file a picture is made from (for the store thumbnail: its array metadata, rewritten with the array)."""
    if kind == "slide":
        return store_path(out_dir, slide_id) / "thumbnail" / "zarr.json"
    return out_dir / (MAPS_DIR if kind == "map" else CAM_DIR) / f"{slide_id}.png"


def shrink(image: Image.Image, max_px: int, kind: str) -> bytes:
    """The image fitted into ``max_px`` (feature maps keep their cells sharp: nearest neighbour), encoded."""
    image = image.convert("RGB")
    resample = Image.Resampling.NEAREST if kind == "map" else Image.Resampling.LANCZOS
    image.thumbnail((max_px, max_px), resample=resample)
    buf = io.BytesIO()
    if kind == "map":
        image.save(buf, format="PNG", optimize=True)
    else:
        image.save(buf, format="JPEG", quality=82, optimize=True)
    return buf.getvalue()


def qc_overlay(store: Path) -> np.ndarray:
    """The store's thumbnail with the tiles QC excluded tinted in their reason's colour (``core.qc_codes``)."""
    thumb = np.asarray(read_array(store, "thumbnail")).copy()
    if not has_array(store, "qc_code"):
        return thumb
    codes = read_array(store, "qc_code")
    attrs = read_attrs(store) or {}
    grid, ds = attrs.get("tile_grid") or {}, float(attrs.get("mask_downsample") or 1)
    step, size = grid.get("stride_l0_px", 0) / ds, grid.get("tile_l0_px", 0) / ds
    for r, c in zip(*np.nonzero(codes)):
        y0, x0 = int(r * step), int(c * step)
        y1, x1 = max(int(r * step + size), y0 + 1), max(int(c * step + size), x0 + 1)
        colour = np.array(QC_COLOURS.get(int(codes[r, c]), (0, 0, 0)), np.float32)
        thumb[y0:y1, x0:x1] = (0.45 * thumb[y0:y1, x0:x1] + 0.55 * colour).astype(np.uint8)
    return thumb


def make_thumb(out_dir: Path, slide_id: str, kind: str) -> str | None:
    """The picture of one slide and kind, made when missing or older than its source; its relative path, or None
    when the slide has no source for it."""
    source = source_of(out_dir, slide_id, kind)
    if not source.exists():
        return None
    name = thumb_name(slide_id, kind)
    target = out_dir / name
    if target.exists() and target.stat().st_mtime >= source.stat().st_mtime:
        return name
    if kind == "slide":
        image = Image.fromarray(qc_overlay(store_path(out_dir, slide_id)))
    else:
        image = Image.open(source)
    atomic_write_bytes(target, shrink(image, THUMB_PX[kind], kind))
    return name


def _make_or_skip(out_dir: Path, slide_id: str, kind: str) -> str | None:
    """``make_thumb``, with a damaged source logged and left out (one bad picture does not stop the report)."""
    try:
        return make_thumb(out_dir, slide_id, kind)
    except Exception as err:  # noqa: BLE001 - PIL and zarr raise many types for damaged files
        log.warning("report: no %s picture of %s (%s: %s)", kind, slide_id, type(err).__name__, err)
        return None


def make_thumbs(out_dir: str | Path, slide_ids: list[str], workers: int | None = None) -> dict[str, dict[str, str]]:
    """Every slide's pictures, {slide_id: {kind: relative path}} (kinds without a source left out)."""
    out_dir = Path(out_dir)
    jobs = [(sid, kind) for sid in slide_ids for kind in KINDS]
    workers = workers or min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        names = list(pool.map(lambda job: _make_or_skip(out_dir, *job), jobs))
    found: dict[str, dict[str, str]] = {sid: {} for sid in slide_ids}
    for (sid, kind), name in zip(jobs, names):
        if name:
            found[sid][kind] = name
    return found
