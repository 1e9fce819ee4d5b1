"""`wsi-pipeline run` end to end on a generated cohort: every stage's outputs, then a rerun that redoes nothing."""

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openslide
import pytest

from pipeline.core.store import read_array, read_attrs
from pipeline.slides.tiling import TileGrid
from sample_data.synthetic import cohort_plan, make_cohort

from .conftest import stored_cam_hits

pytestmark = pytest.mark.slow  # the whole CLI on a 40-slide cohort, training included

BIN = Path(sys.executable).parent
CONFIG = """
tiling: {mpp: 0.5, tile_px: 64, chunk_tiles: 8}
train:                   # no weights: the default scratch recipe
  adapter: components
  val_fraction: 0.2
  test_fraction: 0.4
cluster: {workers: 2, dashboard: false}
# the synthetic slides' colours (lesion, basophilic patches) are taken for ink by the pen detector (README, limitations)
qc: [blur, debris]
"""
COHORT = {"n_per_class": 20, "width_px": 3000, "height_px": 2250}  # 40 slides, 23 x 17 tiles each


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    cohort = make_cohort(root / "cohort", **COHORT)
    (cohort / "notes.txt").write_text("not a slide")
    config = root / "config.yaml"
    config.write_text(CONFIG)
    out = root / "out"
    cmd = [str(BIN / "wsi-pipeline"), "run", "--slides", str(cohort), "--labels", str(cohort / "labels.csv"),
           "--out", str(out), "--config", str(config)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    return {"cohort": cohort, "out": out, "cmd": cmd, "first": first}


def test_every_stage_wrote_its_outputs(finished_run):
    out = finished_run["out"]
    stdout = finished_run["first"].stdout
    assert "describe: slides 40, done 40" in stdout and f"report: {out / 'report.html'}" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(rec["status"] == "done" for rec in manifest["slides"].values())
    assert all(rec["stages"]["reduce"]["status"] == "done" and rec["stages"]["cam"]["status"] == "done"
               for rec in manifest["slides"].values())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_slides"] == 16 and metrics["roc_auc"] >= 0.9
    assert metrics["baseline"]["roc_auc"] is not None and not metrics["network_vs_baseline"]["network_below_baseline"]
    with open(out / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 16 and {r["true_label"] for r in rows} <= {"0", "1"}
    for name in ("report.html", "mosaic.png", "plots/roc.png", "plots/confusion_matrix.png", "maps/explained_variance.png",
                 "model/model.keras", "model/reducer/reducer.json"):
        assert (out / name).exists(), name


def test_cam_outputs_cover_the_slide(finished_run):
    out, cohort = finished_run["out"], finished_run["cohort"]
    for slide in sorted(cohort.glob("*.svs"))[:3]:
        slide_id = slide.stem
        store = out / "slides" / f"{slide_id}.zarr"
        cam = read_array(store, "cam")
        grid = TileGrid.from_dict(read_attrs(store)["tile_grid"])
        tissue = read_array(store, "tissue_mask")
        assert cam.shape == grid.shape
        assert np.isnan(cam[~tissue]).all() and np.nanmax(cam) == pytest.approx(1.0)
        with openslide.OpenSlide(str(out / "cam" / f"{slide_id}.tiff")) as heat, openslide.OpenSlide(str(slide)) as wsi:
            assert heat.dimensions == wsi.dimensions
        geo = json.loads((out / "cam" / f"{slide_id}.geojson").read_text())
        for feature in geo["features"]:
            ring = np.array(feature["geometry"]["coordinates"][0])
            assert (ring >= 0).all() and (ring[:, 0] <= grid.slide_width_px).all()
            assert (ring[:, 1] <= grid.slide_height_px).all()
        assert (out / "cam" / f"{slide_id}.png").stat().st_size > 10_000


def test_cam_maximum_falls_in_the_planted_lesion(finished_run):
    """Generated slides, planted lesions, the trained model: on at least 80% of the positive test slides the
    maximum of the stored CAM lies on a tile whose centre is inside the lesion (ground truth: ``cohort_plan``)."""
    truth = {slide_id: tissue for slide_id, _, tissue in cohort_plan(**COHORT)}
    # a lesion, far from all of the tissue
    hits = stored_cam_hits(finished_run["out"], lambda slide_id, grid: truth[slide_id].lesion_at_tiles(grid), 0.5)
    assert len(hits) >= 5 and sum(hits) >= 0.8 * len(hits), hits


def test_rerun_redoes_nothing(finished_run):
    started = time.monotonic()
    again = subprocess.run(finished_run["cmd"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "describe: slides 40, done 0, skipped 40" in again.stdout
    assert "reduce: slides 40, done 0, skipped 40" in again.stdout
    assert "skipped True" in again.stdout.split("train:")[1].splitlines()[0]
    assert "cam: slides 40, done 0, skipped 40" in again.stdout
    assert time.monotonic() - started < 120
