"""QC and annotations of one slide in the describe stage: planned on the thumbnail (thumbnail detectors and the
slide's annotation file), scored in the block tasks (tile detectors), decided when the slide is finalised.

Store arrays (``pipeline/core/store.py``): ``qc_code`` (rows, cols) uint8, the reason a tissue tile was left out
(``pipeline/core/qc_codes.py``; attrs: the code table); ``tile_annotation`` (rows, cols) uint16, the annotation class
covering each tile (0 none, i = ``annotation_classes[i - 1]``, a store attribute); ``qc_scores`` (rows, cols, k)
float32, the tile detectors' scores (attrs: their names). ``tissue_mask`` holds the tiles described: tissue that QC
kept.
"""

from __future__ import annotations

import numpy as np

from ...core.qc_codes import QC_CODES, qc_counts
from ...core.store import read_array, write_array, write_tile_block
from ..annotations import annotation_file, annotation_qc, read_annotations, tile_annotation
from ..tissue import tissue_tiles
from . import decide_tile_qc, thumbnail_qc, tile_detector_names, tile_scores

SCORES = "qc_scores"


def plan_slide_qc(thumbnail: np.ndarray, tissue_px: np.ndarray, mask_downsample: float, grid, tissue_tiles: np.ndarray,
                  config, slide_id: str, flagged: dict[str, np.ndarray] | None = None) -> dict:
    """{"qc_code", "tile_annotation", "annotation_classes", "annotation_file"} of a slide's tissue tiles.

    An annotation's exclusion wins over a detector's (it is the pathologist's call). Raises the annotation file's
    typed error (``AnnotationError`` and subclasses). ``flagged``: thumbnail detectors' pixels already computed.
    """
    codes = thumbnail_qc(thumbnail, tissue_px, mask_downsample, grid, tissue_tiles, config.qc, flagged)
    labels, classes = np.zeros(grid.shape, np.uint16), []
    path = annotation_file(config.annotations.dir, slide_id)
    if path is not None:
        annotations = read_annotations(path, grid.slide_width_px, grid.slide_height_px)
        labels, classes = tile_annotation(annotations, grid)
        by_annotation = annotation_qc(annotations, grid, config.annotations.exclude, config.annotations.include)
        codes = np.where(by_annotation != 0, by_annotation, codes).astype(np.uint8)
    codes[~tissue_tiles] = 0
    return {"qc_code": codes, "tile_annotation": labels, "annotation_classes": classes,
            "annotation_file": str(path) if path else None}


def slide_qc_arrays(qc: dict, config, chunk_tiles: int, scores: np.ndarray | None = None) -> dict[str, dict]:
    """The QC arrays of a new store as ``create_partial_store`` keywords: ``qc_code``, ``tile_annotation`` (each one
    chunk, as the other whole-grid arrays: read whole, and written without zarr's chunk guess) and, with tile
    detectors, ``qc_scores``: empty (NaN) for the block tasks to fill, or ``scores`` (rows, cols, k) when they are
    known (a store written whole)."""
    arrays = {"qc_code": {"data": qc["qc_code"], "chunks": qc["qc_code"].shape, "attributes": {"codes": QC_CODES}},
              "tile_annotation": {"data": qc["tile_annotation"], "chunks": qc["tile_annotation"].shape,
                                  "attributes": {"classes": qc["annotation_classes"], "file": qc["annotation_file"]}}}
    names = tile_detector_names(config.qc)
    if names:
        rows, cols = qc["qc_code"].shape
        shape = {"shape": (rows, cols, len(names)), "dtype": np.float32} if scores is None else {"data": scores}
        arrays[SCORES] = {**shape, "fill_value": np.nan, "chunks": (chunk_tiles, chunk_tiles, len(names)),
                          "attributes": {"detectors": names}}
    return arrays


def block_scores(tiles: np.ndarray, config) -> np.ndarray:
    """(n, k) tile-detector scores of a batch (k = 0 without tile detectors)."""
    return tile_scores(tiles, tile_detector_names(config.qc))


def write_block_scores(store, block: tuple[int, int, int, int], scores: np.ndarray) -> None:
    """One block's (r1 - r0, c1 - c0, k) scores into its own ``qc_scores`` chunk (nothing when k = 0)."""
    if scores.shape[-1]:
        write_tile_block(store, SCORES, block, scores)


def decide_slide_qc(config, planned: dict, scores: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(qc codes, tiles kept, tiles the tile detectors exclude now) of a slide whose blocks are described: the tile
    detectors decided over the slide's ``scores`` (rows, cols, k); ``planned``: its plan (``qc_code``,
    ``tissue_tiles``)."""
    names = tile_detector_names(config.qc)
    codes = planned["qc_code"]
    kept = planned["tissue_tiles"].astype(bool)
    flagged = np.zeros(kept.shape, bool)
    if names:
        new = decide_tile_qc(scores, names, kept, config.qc)
        flagged = new != 0
    if flagged.any():
        codes = np.where(flagged, new, codes).astype(np.uint8)
        kept &= ~flagged
    return codes, kept, flagged


def slide_qc_counts(config, planned: dict, codes: np.ndarray) -> dict[str, int]:
    """{reason: tissue tiles excluded} of a slide (``qc_counts`` over its tissue tiles)."""
    return qc_counts(codes, tissue_tiles(planned["tissue_fraction"], config.tissue.fraction_min))


def finalise_slide_qc(store, config, chunk_tiles: int, planned: dict, scores: np.ndarray | None = None
                      ) -> tuple[dict[str, int], int]:
    """``decide_slide_qc`` on a slide's partial store: the tiles excluded lose their descriptors (NaN) and leave
    ``tissue_mask``. ``planned``: the slide's plan, whose ``qc_code``, ``tissue_tiles`` (``tissue_mask``) and
    ``tissue_fraction`` the store holds (not read back); ``scores``: its ``qc_scores`` as the blocks wrote them (None:
    read from the store). Returns ({reason: tiles excluded}, tiles excluded now)."""
    if tile_detector_names(config.qc) and scores is None:  # qc_scores is made with the partial store then
        scores = read_array(store, SCORES)
    codes, kept, flagged = decide_slide_qc(config, planned, scores)
    if flagged.any():
        _clear_descriptors(store, flagged, chunk_tiles)
        write_array(store, "qc_code", codes, attrs={"codes": QC_CODES})
        write_array(store, "tissue_mask", kept)
    return slide_qc_counts(config, planned, codes), int(flagged.sum())


def _clear_descriptors(store, flagged: np.ndarray, chunk_tiles: int) -> None:
    """NaN descriptors of the flagged tiles, one whole chunk at a time (read, modify, write)."""
    import zarr

    arr = zarr.open_array(str(store) + "/descriptors", mode="r+")
    rows, cols = flagged.shape
    for r0 in range(0, rows, chunk_tiles):
        for c0 in range(0, cols, chunk_tiles):
            sub = flagged[r0:r0 + chunk_tiles, c0:c0 + chunk_tiles]
            if sub.any():
                values = arr[r0:r0 + sub.shape[0], c0:c0 + sub.shape[1]]
                values[sub] = np.nan
                arr[r0:r0 + sub.shape[0], c0:c0 + sub.shape[1]] = values
