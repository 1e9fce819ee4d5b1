"""Artifact QC: one detector per module of this package, composed in the order ``qc.detectors`` lists them.

A module defines ``DETECTOR = Detector(...)`` named after its code in ``pipeline/core/qc_codes.py``; adding a
detector is adding a file (and its code). ``thumbnail`` detectors flag pixels of the tissue-mask thumbnail when a
slide is planned (a tile is excluded when ``tile_fraction`` of it is flagged); ``tile`` detectors score every tile in
the describe block tasks and decide when the slide is finalised, over all its tiles (slide-relative thresholds).
A tile keeps the code of the first detector that excludes it.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np

from ...core.qc_codes import QC_CODES
from ..tissue import tile_tissue_fraction


@dataclass(frozen=True)
class Detector:
    name: str                                   # = its key in QC_CODES and in qc.detectors
    where: Literal["thumbnail", "tile"]
    pixels: Callable[[np.ndarray, np.ndarray, Any], np.ndarray] | None = None  # (thumbnail, tissue_px, qc) -> bool
    tile_fraction: Callable[[Any], float] | None = None                     # qc -> share of a tile to exclude it
    score: Callable[[np.ndarray], np.ndarray] | None = None                  # tiles (n, h, w, 3) -> (n,) float32
    decide: Callable[[np.ndarray, Any], np.ndarray] | None = None            # (slide's scores, qc) -> bool

    @property
    def code(self) -> int:
        return QC_CODES[self.name]


@functools.lru_cache(maxsize=1)
def registry() -> dict[str, Detector]:
    """Every detector module of this package, by name (looked up once per process: listing the package's files cost
    ~0.3 ms, and each slide asked several times)."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        detector = getattr(importlib.import_module(f"{__name__}.{info.name}"), "DETECTOR", None)
        if isinstance(detector, Detector):
            found[detector.name] = detector
    return found


def active_detectors(names) -> list[Detector]:
    """The detectors named (in that order); an unknown name is a KeyError naming the known ones."""
    known = registry()
    missing = [n for n in names if n not in known]
    if missing:
        raise KeyError(f"no QC detector {missing}; known: {sorted(known)}")
    return [known[n] for n in names]


def thumbnail_qc(thumbnail: np.ndarray, tissue_px: np.ndarray, mask_downsample: float, grid, tissue_tiles: np.ndarray,
                 qc, flagged: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """(rows, cols) uint8 QC codes of the thumbnail detectors for the tissue tiles (0 = kept). ``flagged``: pixels
    a detector already flagged on this thumbnail and tissue mask, by name (not computed again)."""
    codes = np.zeros(tissue_tiles.shape, np.uint8)
    for detector in active_detectors(qc.detectors):
        if detector.where != "thumbnail" or not tissue_tiles.any():
            continue
        flagged_px = (flagged or {}).get(detector.name)
        flagged_px = detector.pixels(thumbnail, tissue_px, qc) if flagged_px is None else flagged_px
        fraction = tile_tissue_fraction(flagged_px, mask_downsample, grid)
        flag = tissue_tiles & (codes == 0) & (fraction >= detector.tile_fraction(qc))
        codes[flag] = detector.code
    return codes


def tile_detector_names(qc) -> list[str]:
    """Names of the active tile-level detectors: the last axis of the store's ``qc_scores``."""
    return [d.name for d in active_detectors(qc.detectors) if d.where == "tile"]


def tile_scores(tiles: np.ndarray, names: list[str]) -> np.ndarray:
    """(n, len(names)) float32 scores of a batch of tiles by the named tile detectors."""
    known = registry()
    out = np.empty((len(tiles), len(names)), np.float32)
    for i, name in enumerate(names):
        out[:, i] = known[name].score(tiles)
    return out


def decide_tile_qc(scores: np.ndarray, names: list[str], kept: np.ndarray, qc) -> np.ndarray:
    """(rows, cols) uint8 codes the tile detectors give the ``kept`` tiles, from their (rows, cols, k) scores."""
    known = registry()
    codes = np.zeros(kept.shape, np.uint8)
    for i, name in enumerate(names):
        candidates = kept & (codes == 0)
        flags = known[name].decide(scores[..., i][candidates], qc)
        sub = codes[candidates]
        sub[flags] = known[name].code
        codes[candidates] = sub
    return codes
