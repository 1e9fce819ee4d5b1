"""The feature-map contract: what the reduce stage writes into each slide store and every later stage reads.

Array ``FEATURE_MAP`` (rows, cols, K) float32 in a slide store: tissue cells in ``VALUE_RANGE`` ([0, 1]), background
cells ``FEATURE_MAP_FILL`` (-1.0); NaN (never written) counts as background too. Tissue cells QC left out for an
artefact or an ``Exclude`` annotation (``FILLED_QC_CODES``) carry their nearest described cell's values
(``fill_excluded_cells``, rule ``EXCLUDED_FILL``): a hole with the background value inside tissue reads as glass, and
a network learns such holes as evidence. The CAM of those cells is left out (``tissue_mask`` = described cells).
The network sees three channels (``select_channels``: the channel adapter, ``train.adapter``) and pools one of the
InceptionV3 blocks ``BLOCK_NAMES`` (``train.head_block``), the blocks Grad-CAM can explain.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import MissingInputError, ModelError
from .qc_codes import QC_CODES
from .store import has_array, read_array, store_path

FEATURE_MAP = "feature_map"
FEATURE_MAP_FILL = -1.0  # background cells of every feature map
VALUE_RANGE = (0.0, 1.0)  # tissue cells, on every slide (the reducer scales with cohort percentiles and clips)
BLOCK_NAMES = tuple(f"mixed{i}" for i in range(11))  # InceptionV3's blocks, input to output
# QC reasons whose tissue cells are filled from their neighbours; cells outside ``annotations.include`` regions stay
# background (the user restricted the slide to its regions of interest).
FILLED_QC_CODES = tuple(QC_CODES[name] for name in ("pen", "blur", "debris", "annotation_exclude"))
EXCLUDED_FILL = "nearest-described/v1"  # recorded in the map's attrs; a map made under another rule is stale


def map_identity(map_attrs: dict | None) -> str:
    """What names one slide's feature map for the stages after it (a model's hash, a CAM's): the reducer, the fill
    rule and the store (fingerprint, describe settings) it was made from."""
    attrs = map_attrs or {}
    return "|".join(str(attrs.get(key)) for key in ("reducer_hash", "excluded_fill", "store_fingerprint",
                                                    "store_config_hash"))


def fill_excluded_cells(fmap: np.ndarray, qc_code: np.ndarray | None) -> tuple[np.ndarray, int]:
    """(map with the ``FILLED_QC_CODES`` cells given their nearest described cell's values, cells filled).

    Described cells are the map's finite, non-background ones; nearest by Euclidean distance on the tile grid
    (``scipy.ndimage.distance_transform_edt``'s indices). A map with no described cell is returned as it is.
    """
    if qc_code is None:
        return fmap, 0
    described = np.isfinite(fmap).all(axis=2) & (fmap[..., 0] != FEATURE_MAP_FILL)
    holes = np.isin(np.asarray(qc_code), FILLED_QC_CODES) & ~described
    if not holes.any() or not described.any():
        return fmap, 0
    from scipy import ndimage

    _, (near_r, near_c) = ndimage.distance_transform_edt(~described, return_indices=True)
    out = fmap.copy()
    out[holes] = fmap[near_r[holes], near_c[holes]]
    return out, int(holes.sum())


def select_channels(fmap: np.ndarray, adapter: str, component: int = 0) -> np.ndarray:
    """(rows, cols, K) map -> (rows, cols, 3) in the map's own values (tissue [0, 1], background FEATURE_MAP_FILL).

    ``adapter``: ``replicate`` copies component ``component`` into three channels, ``components`` takes the first
    three components (needs K >= 3).
    """
    fmap = np.asarray(fmap, dtype=np.float32)
    if fmap.ndim == 2:
        fmap = fmap[:, :, None]
    if fmap.ndim != 3:
        raise ModelError(f"a feature map must be (rows, cols, K), got shape {fmap.shape}")
    k = fmap.shape[2]
    # NaN (never written) and anything below 0 is background by the contract.
    background = ~np.isfinite(fmap).all(axis=2) | (np.nan_to_num(fmap, nan=FEATURE_MAP_FILL) < 0).all(axis=2)
    if adapter == "replicate":
        if component >= k:
            raise ModelError(f"train.component {component} does not exist: the maps have {k} component(s)",
                             fix="Set train.component to 0.." + str(k - 1) + ".")
        out = np.repeat(fmap[:, :, component:component + 1], 3, axis=2)
    elif adapter == "components":
        if k < 3:
            raise ModelError(f"train.adapter 'components' needs 3 map components, the maps have {k}",
                             fix="Set reduce.components: 3 and rerun reduce, or use train.adapter: replicate.")
        out = fmap[:, :, :3].copy()
    else:
        raise ModelError(f"unknown train.adapter {adapter!r}")
    out = np.clip(np.nan_to_num(out, nan=0.0), 0.0, 1.0)
    out[background] = FEATURE_MAP_FILL
    return out


def has_feature_map(store: str | Path) -> bool:
    return has_array(store, FEATURE_MAP)


def feature_map_stores(out_dir: str | Path, slide_ids: Sequence[str]) -> list[Path]:
    """The store of each slide (in order); a slide without a ``feature_map`` is a ``MissingInputError``."""
    paths = []
    for slide_id in slide_ids:
        path = store_path(out_dir, slide_id)
        if not has_feature_map(path):
            raise MissingInputError(f"slide '{slide_id}' has no feature map", path=path,
                                    fix="Run `wsi-pipeline reduce --out OUT` first.")
        paths.append(path)
    return paths


def read_feature_maps(out_dir: str | Path, slide_ids: Sequence[str]) -> list[np.ndarray]:
    """``feature_map`` of each slide (in order); a slide without one is a ``MissingInputError``."""
    return [read_array(path, FEATURE_MAP) for path in feature_map_stores(out_dir, slide_ids)]
