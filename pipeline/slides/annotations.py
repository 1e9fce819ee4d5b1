"""QuPath annotations in: one GeoJSON per slide (``<dir>/<slide_id>.geojson``), level-0 pixel coordinates.

Read as QuPath 0.2-0.6 export them: a FeatureCollection, a bare list of features, or one feature; the class is
``properties.classification.name`` (0.4+) or a ``classification`` string (older scripts); Polygon and MultiPolygon,
holes included. shapely does the geometry. A tile belongs to an annotation when its centre lies inside it (holes
excluded); where annotations overlap, the smallest one names the tile (a tumour outline inside a tissue outline).
Coordinates may overshoot the slide by 1% of its size (drawn past the edge); further out the file is rejected.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import AnnotationError, AnnotationGeometryError, AnnotationOutsideSlideError
from ..core.qc_codes import QC_CODES
from ..core.threads import map_threads
from .open import slide_fingerprint

SUFFIX = ".geojson"
OVERSHOOT = 0.01  # share of the slide's size annotations may reach beyond its edge
UNCLASSIFIED = "Unclassified"


@dataclass(frozen=True)
class Annotation:
    name: str          # the class
    geometry: object   # shapely Polygon or MultiPolygon, level-0 px


def annotation_file(annotations_dir: str | Path | None, slide_id: str) -> Path | None:
    """``<dir>/<slide_id>.geojson`` when it exists, else None."""
    if not annotations_dir:
        return None
    path = Path(annotations_dir) / f"{slide_id}{SUFFIX}"
    return path if path.is_file() else None


def annotation_digest(annotations_dir: str | Path | None, slide_id: str) -> str | None:
    """SHA-256 (16 hex) of the slide's annotation file, None without one: part of the slide's fingerprint."""
    path = annotation_file(annotations_dir, slide_id)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path else None


ANNOTATIONS_MARK = "+annotations:"  # a described slide's fingerprint: its file's, then its annotation file's digest
UNREADABLE = "unreadable:"  # ... or this and the error, for a slide that could not be read


def described_fingerprint(path: str | Path, annotations_dir: str | Path | None, slide_id: str) -> str:
    """What a slide's store is current for: the slide file's fingerprint and, when it has one, its annotation file's
    digest (an edited annotation file makes the store stale); ``unreadable:<error>`` for a slide that cannot be read
    (it fails with its typed error when it is planned)."""
    try:
        fingerprint = slide_fingerprint(path)
        digest = annotation_digest(annotations_dir, slide_id)
    except OSError as err:
        return f"{UNREADABLE}{type(err).__name__}"
    return fingerprint + (f"{ANNOTATIONS_MARK}{digest}" if digest else "")


def described_fingerprints(slides: dict[str, str | Path], annotations_dir: str | Path | None) -> dict[str, str]:
    """``described_fingerprint`` of each slide (slide id -> path), made on two threads: hashing and reading release
    the GIL, and a run's workers wait for the fingerprints of a directory of slides (~2 ms a slide)."""
    items = list(slides.items())
    return dict(zip(slides, map_threads(lambda item: described_fingerprint(item[1], annotations_dir, item[0]), items)))


def file_fingerprint(described: str | None) -> str | None:
    """The slide file's own fingerprint within a ``described_fingerprint`` (None for none or an unreadable slide):
    sent to the worker that reads the slide, which then does not hash the file again (~1.5 ms a slide)."""
    if not described or described.startswith(UNREADABLE):
        return None
    return described.split(ANNOTATIONS_MARK, 1)[0]


def unmatched_annotation_files(annotations_dir: str | Path | None, slide_ids) -> list[str]:
    """Annotation files of the folder whose name matches no slide id (a typo, or a slide missing from the run)."""
    if not annotations_dir or not Path(annotations_dir).is_dir():
        return []
    ids = set(slide_ids)
    return sorted(str(p) for p in Path(annotations_dir).glob(f"*{SUFFIX}") if p.name[:-len(SUFFIX)] not in ids)


def _features(data, path: Path | None) -> list[dict]:
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        return list(data.get("features") or [])
    if isinstance(data, dict) and data.get("type") == "Feature":
        return [data]
    raise AnnotationError("not a GeoJSON FeatureCollection, feature or list of features", path=path)


def class_name(properties: dict | None) -> str:
    """The QuPath class of a feature: ``classification.name`` (0.4+), a ``classification`` string, or
    ``Unclassified``."""
    value = (properties or {}).get("classification")
    if isinstance(value, dict):
        value = value.get("name")
    return str(value) if value else UNCLASSIFIED


def parse_annotations(text: bytes | str, width_px: float, height_px: float, path: str | Path = "") -> list[Annotation]:
    """The Polygon/MultiPolygon annotations of a GeoJSON document, checked against the slide's level-0 size."""
    import shapely
    import shapely.geometry

    path = Path(path) if path else None
    try:
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AnnotationError(f"not valid JSON ({err})", path=path) from None
    out = []
    tol_x, tol_y = OVERSHOOT * width_px, OVERSHOOT * height_px
    for i, feature in enumerate(_features(data, path)):
        if not isinstance(feature, dict) or not isinstance(feature.get("geometry"), dict):
            raise AnnotationGeometryError(f"feature {i} has no geometry object", path=path)
        name = class_name(feature.get("properties"))
        kind = feature["geometry"].get("type")
        if kind not in ("Polygon", "MultiPolygon"):
            raise AnnotationGeometryError(f"feature {i} ({name}) has geometry type {kind!r}; only Polygon and "
                                          "MultiPolygon are read", path=path)
        try:
            geometry = shapely.geometry.shape(feature["geometry"])
        except Exception as err:  # noqa: BLE001 - shapely raises several types for malformed coordinates
            raise AnnotationGeometryError(f"feature {i} ({name}) has malformed coordinates ({err})",
                                          path=path) from None
        if geometry.is_empty:
            continue
        x0, y0, x1, y1 = geometry.bounds
        if x0 < -tol_x or y0 < -tol_y or x1 > width_px + tol_x or y1 > height_px + tol_y:
            raise AnnotationOutsideSlideError(
                f"feature {i} ({name}) spans x {x0:.0f}..{x1:.0f}, y {y0:.0f}..{y1:.0f}, beyond the slide's "
                f"{width_px:.0f} x {height_px:.0f} level-0 pixels", path=path)
        if not geometry.is_valid:
            geometry = shapely.make_valid(geometry)
        out.append(Annotation(name, geometry))
    return out


def read_annotations(path: str | Path, width_px: float, height_px: float) -> list[Annotation]:
    """``parse_annotations`` of a file."""
    return parse_annotations(Path(path).read_bytes(), width_px, height_px, path)


def tile_centres(grid) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) level-0 centres of every tile of a ``TileGrid``, each (rows, cols)."""
    rows, cols = np.meshgrid(np.arange(grid.rows), np.arange(grid.cols), indexing="ij")
    half = grid.tile_l0_px / 2
    return cols * grid.stride_l0_px + half, rows * grid.stride_l0_px + half


def _inside(geometry, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    import shapely

    x0, y0, x1, y1 = geometry.bounds
    box = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
    out = np.zeros(x.shape, bool)
    if box.any():
        shapely.prepare(geometry)
        out[box] = shapely.contains_xy(geometry, x[box], y[box])
    return out


def inside_classes(annotations: list[Annotation], names, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bool, shaped like ``x``: the level-0 points (x, y) inside an annotation of one of the classes ``names``."""
    names = set(names)
    out = np.zeros(np.shape(x), bool)
    for a in annotations:
        if a.name in names:
            out |= _inside(a.geometry, x, y)
    return out


def tile_annotation(annotations: list[Annotation], grid) -> tuple[np.ndarray, list[str]]:
    """(rows, cols) uint16 index of the class covering each tile centre (0 = none; i = classes[i - 1]), classes."""
    classes = sorted({a.name for a in annotations})
    index = {name: i + 1 for i, name in enumerate(classes)}
    x, y = tile_centres(grid)
    out = np.zeros(x.shape, np.uint16)
    for a in sorted(annotations, key=lambda a: -a.geometry.area):  # smaller ones last: they win
        out[_inside(a.geometry, x, y)] = index[a.name]
    return out, classes


def annotation_qc(annotations: list[Annotation], grid, exclude, include) -> np.ndarray:
    """(rows, cols) uint8 QC codes: ``annotation_exclude`` inside an excluded class; ``annotation_outside`` outside
    every included-class annotation when the slide has one (0 elsewhere)."""
    x, y = tile_centres(grid)
    codes = np.zeros(x.shape, np.uint8)
    if any(a.name in set(include) for a in annotations):
        codes[~inside_classes(annotations, include, x, y)] = QC_CODES["annotation_outside"]
    codes[inside_classes(annotations, exclude, x, y)] = QC_CODES["annotation_exclude"]
    return codes
