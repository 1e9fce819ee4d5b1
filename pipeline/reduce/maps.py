"""Writing feature maps: each slide's tissue cells through the reducer, into the store's ``feature_map`` array (the
contract in ``pipeline.core.maps``), and its picture ``OUT/maps/<slide_id>.png``.

Array attrs: ``method``, ``components``, ``reducer_hash`` (content hash of the reducer), ``fill_value``,
``config_hash`` (hash of the reduce settings the reducer was fitted with), ``value_range``, ``excluded_fill`` (the
rule QC-excluded tissue cells were filled by) and ``filled_cells``, plus
``store_fingerprint`` / ``store_config_hash`` of the store it was computed from (``map_is_current``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..core.artefacts import MAPS_DIR
from ..core.errors import ReducerMismatchError
from ..core.maps import EXCLUDED_FILL, FEATURE_MAP, FEATURE_MAP_FILL, VALUE_RANGE, fill_excluded_cells, map_identity
from ..core.store import array_attrs, has_array, read_array, read_attrs, write_array
from .reducers import Reducer, cached_reducer, load_reducer
from .sampling import iter_descriptor_bands, require_store


def compute_feature_map(store: str | Path, reducer: Reducer) -> tuple[np.ndarray, int]:
    """((rows, cols, K) float32, cells filled): described cells through the reducer, QC-excluded tissue cells filled
    from their nearest described cell (``core.maps.fill_excluded_cells``), everything else ``FEATURE_MAP_FILL``.

    Descriptors are read band by band (whole Zarr chunk rows). A tissue cell with non-finite descriptors (which
    the describe stage does not produce) is treated as background.
    """
    mask = read_array(store, "tissue_mask").astype(bool)
    out = np.full(mask.shape + (reducer.components,), FEATURE_MAP_FILL, dtype=np.float32)
    for r0, r1, band in iter_descriptor_bands(store, mask.any(axis=1)):
        if band.shape[:2] != mask[r0:r1].shape:
            raise ReducerMismatchError(f"descriptors {band.shape[:2]} and tissue mask {mask[r0:r1].shape} differ",
                                       path=store, fix="Describe the slide again (the store is inconsistent).")
        m = mask[r0:r1]
        values = band[m]
        ok = np.isfinite(values).all(axis=1)
        cells = np.full((len(values), reducer.components), FEATURE_MAP_FILL, dtype=np.float32)
        if ok.any():
            cells[ok] = reducer.transform(values[ok])
        out[r0:r1][m] = cells
    qc_code = read_array(store, "qc_code") if has_array(store, "qc_code") else None
    return fill_excluded_cells(out, qc_code)


def feature_map_attrs(reducer: Reducer, store_attrs: dict, filled_cells: int = 0) -> dict:
    return {"method": reducer.method, "components": reducer.components, "reducer_hash": reducer.hash,
            "fill_value": FEATURE_MAP_FILL, "excluded_fill": EXCLUDED_FILL, "filled_cells": filled_cells,
            "config_hash": reducer.config_hash, "value_range": list(VALUE_RANGE),
            "store_fingerprint": store_attrs.get("fingerprint"), "store_config_hash": store_attrs.get("config_hash")}


def map_is_current(store: str | Path, reducer_hash: str) -> bool:
    """True when the store's feature map is the one this reducer, the current fill rule and the store's current
    descriptors make (``core.maps.map_identity``)."""
    attrs = array_attrs(store, FEATURE_MAP)
    store_attrs = read_attrs(store) or {}
    wanted = {"reducer_hash": reducer_hash, "excluded_fill": EXCLUDED_FILL,
              "store_fingerprint": store_attrs.get("fingerprint"), "store_config_hash": store_attrs.get("config_hash")}
    return bool(attrs) and map_identity(attrs) == map_identity(wanted)


def map_slide(store_path: str | Path, reducer: Reducer | str | Path) -> np.ndarray:
    """Map one slide store with a reducer (object or saved directory); writes ``feature_map`` atomically.

    Returns the (rows, cols, K) float32 map. Raises ``MissingInputError`` for an incomplete store and
    ``ReducerMismatchError`` when its descriptors are not the ones the reducer was fitted on.
    """
    return write_feature_map(store_path, reducer)[0]


def write_feature_map(store_path: str | Path, reducer: Reducer | str | Path) -> tuple[np.ndarray, int]:
    """``map_slide``, returning (map, cells filled from their neighbours)."""
    if not isinstance(reducer, Reducer):
        reducer = load_reducer(reducer)
    store = Path(store_path)
    attrs = require_store(store)
    reducer.check_descriptor(attrs.get("descriptor"), path=store)
    fmap, filled = compute_feature_map(store, reducer)
    rows, cols, k = fmap.shape
    write_array(store, FEATURE_MAP, fmap, chunks=(max(1, min(rows, 512)), max(1, min(cols, 512)), k),
                attrs=feature_map_attrs(reducer, attrs, filled), fill_value=FEATURE_MAP_FILL)
    return fmap, filled


def map_picture_path(out_dir: str | Path, slide_id: str) -> Path:
    return Path(out_dir) / MAPS_DIR / f"{slide_id}.png"


def map_store_task(store: str, reducer_dir: str, reducer_hash: str, picture: str | None) -> dict:
    """Worker task: map one slide with the saved reducer and write its picture."""
    from ..core.pictures import save_feature_map_png

    t0 = time.monotonic()
    reducer = cached_reducer(reducer_dir, reducer_hash)
    fmap, filled = write_feature_map(store, reducer)
    if picture:
        save_feature_map_png(picture, fmap, FEATURE_MAP_FILL)
    tissue = int((fmap[..., 0] != FEATURE_MAP_FILL).sum()) - filled  # described tiles
    return {"tissue_cells": tissue, "shape": list(fmap.shape), "seconds": round(time.monotonic() - t0, 3)}
