"""A small run to view: one generated slide with a planted lesion and a CAM that is hot exactly on the lesion's
tiles, one slide whose file has moved since the run, one slide that failed. Stores are written directly (no
describe, no model), so the fixture costs the slide's writing and little more."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.cam.heatmaps import write_hot_regions_geojson
from pipeline.core.outputs import atomic_write_json
from pipeline.core.qc_codes import QC_CODES
from pipeline.core.store import create_partial_store, finalize_store, write_array
from pipeline.slides.tiling import TileGrid

WIDTH_PX, HEIGHT_PX, TILE_L0_PX = 1536, 1152, 128


def lesion_grid() -> TileGrid:
    return TileGrid(WIDTH_PX, HEIGHT_PX, 0.25, 0.5, 64, 64, HEIGHT_PX // TILE_L0_PX, WIDTH_PX // TILE_L0_PX,
                    float(TILE_L0_PX), float(TILE_L0_PX), 0, 1.0)


def write_store(out: Path, slide_id: str, slide_path: Path, grid: TileGrid, tissue: np.ndarray, cam: np.ndarray,
                qc_code: np.ndarray, annotation_file: Path | None = None) -> None:
    attrs = {"stage": "describe", "slide_id": slide_id, "slide_path": str(slide_path), "fingerprint": slide_id,
             "mpp": 0.25, "mpp_source": "slide_metadata", "tile_grid": grid.to_dict(), "mask_downsample": 16.0,
             "config_hash": "view-test"}
    create_partial_store(out, slide_id, attrs, grid.shape, 1, 16, tissue.astype(np.float32), tissue,
                         np.zeros((HEIGHT_PX // 16, WIDTH_PX // 16, 3), np.uint8))
    store = finalize_store(out, slide_id, {"tiles": int(tissue.sum())})
    fmap = np.where(tissue[..., None], np.linspace(0, 1, tissue.size * 3).reshape(*tissue.shape, 3), -1.0)
    write_array(store, "feature_map", fmap.astype(np.float32), attrs={"components": 3})
    write_array(store, "cam", cam.astype(np.float32), attrs={"class_label": "1", "probabilities": [0.1, 0.9]})
    write_array(store, "qc_code", qc_code.astype(np.uint8), attrs={"codes": QC_CODES})  # as describe writes them
    write_array(store, "tile_annotation", np.zeros(grid.shape, np.uint16),
                attrs={"classes": ["Tumor"], "file": str(annotation_file) if annotation_file else None})


@pytest.fixture(scope="session")
def view_run(tmp_path_factory) -> dict:
    from sample_data.synthetic import SyntheticTissue, write_slide

    root = tmp_path_factory.mktemp("view_run")
    out = root / "out"
    tissue_model = SyntheticTissue(WIDTH_PX, HEIGHT_PX, seed=2, lesion=True, tissue_fraction=0.6)
    slide = write_slide(root / "lesion.svs", tissue_model)
    grid = lesion_grid()
    rows, cols = np.meshgrid(np.arange(grid.rows), np.arange(grid.cols), indexing="ij")
    centre = lambda idx: idx * grid.stride_l0_px + grid.tile_l0_px / 2  # noqa: E731
    tissue = tissue_model.tissue_at(centre(cols), centre(rows))
    lesion = tissue_model.lesion_at_tiles(grid)
    assert lesion.sum() >= 2 and (tissue & ~lesion).sum() >= 4
    cam = np.where(tissue, np.where(lesion, 1.0, 0.0), np.nan)
    qc = np.zeros(grid.shape, np.uint8)
    edge = np.argwhere(tissue & ~lesion)[0]
    qc[tuple(edge)] = QC_CODES["pen"]  # one tissue tile excluded as a pen mark
    annotation = root / "annotations" / "lesion.geojson"  # a QuPath export the run read
    annotation.parent.mkdir()
    annotation.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[100, 100], [400, 100], [400, 300],
                                                                             [100, 100]]]},
        "properties": {"classification": {"name": "Tumor", "color": [0, 200, 0]}}}]}))
    write_store(out, "lesion", slide, grid, tissue, cam, qc, annotation)
    write_store(out, "moved", root / "gone" / "moved.svs", grid, tissue, cam, qc)
    write_hot_regions_geojson(out / "cam" / "lesion.geojson", cam, grid, 0.5, "lesion")
    records = {
        "lesion": {"status": "done", "error": None, "path": str(slide), "mpp": 0.25, "tiles": int(tissue.sum()),
                   "stages": {"train": {"status": "done", "label": 1, "split": "test"}, "cam": {"status": "done"}}},
        "moved": {"status": "done", "error": None, "path": str(root / "gone" / "moved.svs"), "mpp": 0.25,
                  "tiles": int(tissue.sum()), "stages": {"train": {"status": "done", "label": 0, "split": "test"}}},
        "broken": {"status": "failed", "path": str(root / "broken.svs"), "tiles": 0,
                   "error": {"code": "corrupt_slide", "message": "broken.svs: truncated. Fix: re-copy the slide."}},
    }
    atomic_write_json(out / "manifest.json", {"slides": records, "ignored": [], "runs": []})
    with open(out / "predictions.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerows([["slide_id", "true_label", "predicted_label", "prob_0", "prob_1"],
                          ["lesion", 1, 1, 0.1, 0.9], ["moved", 0, 1, 0.3, 0.7]])
    return {"out": out, "grid": grid, "tissue": tissue, "lesion": lesion, "qc_tile": tuple(int(v) for v in edge),
            "slide": slide}
