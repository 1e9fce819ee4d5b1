"""The fit sample: a seeded, bounded draw of tissue tiles' descriptors from every slide store.

``reduce.sample_tiles_per_slide`` tiles per slide, fewer when the whole sample would exceed ``reduce.max_sample_mb``,
so a huge slide cannot dominate the fit; a slide's draw depends only on the seed and its id. ``fit_inputs`` is what a
fit depends on (every store's content key and the reduce settings), so a saved reducer is reused while it holds.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import zarr

from ..core.config import PipelineConfig, ReduceConfig
from ..core.errors import MissingInputError, ReducerError, error_record
from ..core.parallel import LocalRunner, Task, run_bounded
from ..core.store import read_array, read_attrs, slide_id_of, slides_dir
from .reducers import descriptor_signature

log = logging.getLogger("pipeline")


MIN_SAMPLE_PER_SLIDE = 10


def reduce_settings_hash(reduce: ReduceConfig) -> str:
    """Hash of the reduce settings (the describe settings are covered by the stores' own hashes)."""
    blob = json.dumps(reduce.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def store_key(attrs: dict) -> list[str]:
    """What identifies a store's content: slide fingerprint and describe settings hash."""
    return [str(attrs.get("fingerprint")), str(attrs.get("config_hash"))]


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def iter_descriptor_bands(store: str | Path, rows_needed: np.ndarray | None = None
                          ) -> Iterator[tuple[int, int, np.ndarray]]:
    """(r0, r1, descriptors[r0:r1]) for bands of whole Zarr chunk rows, so memory stays at one band.

    ``rows_needed``: (rows,) bool; bands without a needed row are not read.
    """
    arr = zarr.open_array(str(Path(store) / "descriptors"), mode="r")
    rows = arr.shape[0]
    step = max(1, int(arr.chunks[0]))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        if rows_needed is not None and not rows_needed[r0:r1].any():
            continue
        yield r0, r1, np.asarray(arr[r0:r1], dtype=np.float32)


def require_store(store: Path) -> dict:
    attrs = read_attrs(store)
    if not attrs or not attrs.get("complete"):
        raise MissingInputError("no complete slide store here", path=store,
                                fix="Run `wsi-pipeline describe` for this slide first.")
    return attrs


def sample_store(store: str, n_tiles: int, seed: int) -> dict:
    """Worker task: a seeded draw of up to ``n_tiles`` tissue tiles' descriptors from one store.

    The draw depends on (seed, slide id) only, so adding slides to the cohort leaves the other slides' draws alone.
    Returns {slide_id, key, descriptor, sample (n, D) float32, tissue_tiles}.
    """
    path = Path(store)
    attrs = require_store(path)
    slide_id = slide_id_of(path)
    mask = read_array(path, "tissue_mask").astype(bool)
    cells = np.flatnonzero(mask)
    rng = np.random.default_rng([seed, _stable_int(slide_id)])
    take = np.sort(rng.choice(cells.size, size=min(n_tiles, cells.size), replace=False)) if cells.size else cells
    chosen = np.zeros(mask.size, dtype=bool)
    chosen[cells[take]] = True
    chosen = chosen.reshape(mask.shape)
    parts = [band[chosen[r0:r1]] for r0, r1, band in iter_descriptor_bands(path, chosen.any(axis=1))]
    dims = int((attrs.get("descriptor") or {}).get("dims", 0))
    sample = np.concatenate(parts, axis=0) if parts else np.zeros((0, dims), np.float32)
    sample = sample[np.isfinite(sample).all(axis=1)]
    return {"slide_id": slide_id, "key": store_key(attrs), "descriptor": descriptor_signature(attrs),
            "sample": sample.astype(np.float32), "tissue_tiles": int(cells.size)}


def fit_inputs(stores: Sequence[str | Path], config: PipelineConfig) -> dict:
    """What a fit depends on: every store's (fingerprint, describe hash) and the reduce settings."""
    stores_info = {}
    for store in stores:
        attrs = read_attrs(store) or {}
        stores_info[slide_id_of(store)] = store_key(attrs)
    return {"stores": dict(sorted(stores_info.items())), "config_hash": reduce_settings_hash(config.reduce)}


def cohort_stain(stores: Sequence[str | Path]) -> dict | None:
    """The stain settings (method, target, ...) most of the stores were described with; None when they were not
    normalised. Saved with the reducer, so new slides mapped with it are normalised to the same target."""
    votes = Counter(json.dumps(((read_attrs(s) or {}).get("config") or {}).get("stain"), sort_keys=True)
                    for s in stores)
    stain = json.loads(votes.most_common(1)[0][0]) if votes else None
    return stain if stain and stain.get("method", "none") != "none" else None


def tiles_per_slide(config: PipelineConfig, n_slides: int, dims: int) -> int:
    """Per-slide sample size: ``sample_tiles_per_slide``, lowered so the whole sample fits ``max_sample_mb``."""
    budget = int(config.reduce.max_sample_mb * 2**20 / (4 * max(1, dims) * max(1, n_slides)))
    return max(MIN_SAMPLE_PER_SLIDE, min(config.reduce.sample_tiles_per_slide, budget))


def collect_sample(stores: Sequence[str | Path], config: PipelineConfig, runner=None
                   ) -> tuple[np.ndarray, dict, dict]:
    """The cohort fit sample: (n, D) float32, the descriptor signature used, and fit information.

    Slides whose descriptors differ from the majority's (other descriptor settings) are left out of the fit and
    listed in ``info["excluded"]``; they fail later when mapped, with a ``ReducerMismatchError``.
    """
    stores = [Path(s) for s in stores]
    if not stores:
        raise ReducerError("no slide stores to fit a reducer on", fix="Run `wsi-pipeline describe` first.")
    signatures = {s: descriptor_signature(read_attrs(s)) for s in stores}
    dims = max((sig["dims"] for sig in signatures.values() if sig), default=1)
    n_tiles = tiles_per_slide(config, len(stores), dims)
    runner = runner or LocalRunner()
    tasks = iter([Task(sample_store, (str(store), n_tiles, config.reduce.seed), slide_id_of(store))
                  for store in stores])
    results: dict[str, dict] = {}
    excluded: dict[str, str] = {}
    for done in run_bounded(runner, lambda: next(tasks, None), len(stores)):
        if done.error is not None:
            excluded[done.tag] = error_record(done.error)["message"]
            log.warning("reduce: slide %s left out of the fit: %s", done.tag, excluded[done.tag])
        else:
            results[done.tag] = done.result
    votes = Counter(json.dumps(r["descriptor"], sort_keys=True) for r in results.values() if r["descriptor"])
    if not votes:
        raise ReducerError("no slide store could be sampled for the fit", path=slides_dir(stores[0].parent.parent),
                           fix="Check the stores (wsi-pipeline describe) and the log for each slide's error.")
    chosen = votes.most_common(1)[0][0]
    parts, sample_tiles = [], {}
    for slide_id in sorted(results):
        r = results[slide_id]
        if json.dumps(r["descriptor"], sort_keys=True) != chosen:
            excluded[slide_id] = "descriptor settings differ from the rest of the cohort"
            continue
        parts.append(r["sample"])
        sample_tiles[slide_id] = int(len(r["sample"]))
    sample = np.concatenate(parts, axis=0) if parts else np.zeros((0, dims), np.float32)
    info = {"tiles_per_slide": n_tiles, "sample_tiles": sample_tiles, "sample_rows": int(len(sample)),
            "excluded": dict(sorted(excluded.items())), "seed": config.reduce.seed}
    return sample, json.loads(chosen), info
