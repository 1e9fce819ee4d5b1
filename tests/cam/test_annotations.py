"""CAM against annotations: pointing game and top-decile IoU, per slide and overall, into metrics.json."""

from __future__ import annotations

import json

import numpy as np

from pipeline.cam.annotations import annotation_agreement, cam_annotation_scores, write_annotation_agreement
from pipeline.core.store import write_array
from tests.conftest import planted_map, write_map_store


def _cam_with_peak(rows, cols, centre, radius):
    r, c = np.mgrid[0:rows, 0:cols]
    cam = np.exp(-((r - centre[0]) ** 2 + (c - centre[1]) ** 2) / (2 * radius ** 2)).astype(np.float32)
    cam[:, 0] = np.nan  # off tissue
    return cam


def test_pointing_game_and_top_decile_iou():
    cam = _cam_with_peak(20, 20, (10, 10), 2.0)
    target = np.zeros((20, 20), bool)
    target[8:13, 8:13] = True
    scores = cam_annotation_scores(cam, target)
    top = np.isfinite(cam) & (cam >= np.nanpercentile(cam, 90))
    assert scores["pointing_hit"] is True
    assert scores["annotated_tiles"] == 25 and scores["top_tiles"] == int(top.sum())
    assert np.isclose(scores["iou_top_decile"], (top & target).sum() / (top | target).sum(), atol=1e-4)
    elsewhere = np.zeros((20, 20), bool)
    elsewhere[0:4, 15:19] = True
    miss = cam_annotation_scores(cam, elsewhere)
    assert miss["pointing_hit"] is False and miss["iou_top_decile"] == 0.0
    assert cam_annotation_scores(cam, np.zeros((20, 20), bool)) is None


def test_agreement_per_slide_and_overall_into_metrics(tmp_path):
    rng = np.random.default_rng(0)
    stores = []
    for i, (peak, label) in enumerate((((5, 5), "1"), ((12, 12), "1"), ((5, 5), "0"))):
        store = write_map_store(tmp_path, f"s{i}", planted_map(rng, True, 16, 16))
        write_array(store, "cam", _cam_with_peak(16, 16, peak, 1.5), attrs={"class_label": label})
        labels = np.zeros((16, 16), np.uint16)
        labels[3:8, 3:8] = 2  # Tumor around (5, 5)
        labels[12:15, 1:4] = 1  # Exclude
        write_array(store, "tile_annotation", labels, attrs={"classes": ["Exclude", "Tumor"]})
        stores.append(store)
    result = annotation_agreement(stores, {"1": "Tumor"})
    assert set(result["per_slide"]) == {"s0", "s1"}  # s2's CAM explains label 0: no "0" annotations
    assert result["per_slide"]["s0"]["pointing_hit"] and not result["per_slide"]["s1"]["pointing_hit"]
    assert result["overall"]["slides"] == 2 and result["overall"]["pointing_game"] == 0.5
    (tmp_path / "metrics.json").write_text(json.dumps({"network": {"accuracy": 1.0}}))
    write_annotation_agreement(tmp_path, stores, {"1": "Tumor"}, "model-a")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["network"] == {"accuracy": 1.0}
    assert metrics["cam_annotations"]["overall"] == result["overall"]
    assert json.loads((tmp_path / "cam" / "annotation_metrics.json").read_text()) == {**result, "model": "model-a"}
    assert write_annotation_agreement(tmp_path, stores, {}, "model-a") is None  # no label named like an annotation class
