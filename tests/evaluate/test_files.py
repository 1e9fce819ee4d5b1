"""The evaluation files: predictions table in the user's labels, metrics.json, predictions.csv and the plots."""

import csv
import json

import numpy as np
import pytest

from pipeline.evaluate.files import predictions_table, write_evaluation
from pipeline.model.labels import LabelMapping
from tests.evaluate.test_metrics import onehot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_predictions_table_uses_user_labels():
    mapping = LabelMapping("integer", (3, 4))
    text = predictions_table(["x", "y"], np.array([[0.9, 0.1], [0.2, 0.8]]), mapping, y_true=np.array([0, 0]))
    rows = list(csv.DictReader(text.splitlines()))
    assert rows[0] == {"slide_id": "x", "true_label": "3", "predicted_label": "3", "prob_3": "0.900000",
                       "prob_4": "0.100000"}
    assert rows[1]["predicted_label"] == "4"


def test_write_evaluation_files(tmp_path):
    mapping = LabelMapping("integer", (1, 2, 3))
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 30)
    proba = onehot(np.where(rng.random(30) < 0.8, y, (y + 1) % 3), 3)
    folds = [1 + i % 3 for i in range(30)]
    history = [{"fold": 1, "loss": [1.0, 0.8, 0.7], "val_loss": [1.1, 0.9, 0.95], "accuracy": [0.4, 0.6, 0.7],
                "val_accuracy": [0.3, 0.5, 0.5], "phase": ["head", "head", "finetune"]}]
    m = write_evaluation(tmp_path, [f"s{i}" for i in range(30)], y, proba, mapping, folds=folds, histories=history)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["accuracy"] == pytest.approx(m["accuracy"]) and len(saved["folds"]) == 3
    assert sum(f["n_slides"] for f in saved["folds"]) == 30
    rows = list(csv.DictReader((tmp_path / "predictions.csv").read_text().splitlines()))
    assert len(rows) == 30 and {r["fold"] for r in rows} == {"1", "2", "3"}
    assert {r["true_label"] for r in rows} <= {"1", "2", "3"}
    for name in ("roc.png", "confusion_matrix.png", "training_curves.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == PNG_MAGIC
    assert saved["files"]["training_curves"] == "plots/training_curves.png"


def test_rewritten_metrics_keep_the_cam_annotation_metrics_of_the_same_model(tmp_path):
    mapping = LabelMapping("integer", (0, 1))
    y = np.array([0, 1, 0, 1])
    agreement = {"per_slide": {"s1": {"pointing_hit": True}}, "overall": {"slides": 1, "pointing_game": 1.0}}
    (tmp_path / "cam").mkdir()
    (tmp_path / "cam" / "annotation_metrics.json").write_text(json.dumps({**agreement, "model": "m1"}))
    args = (tmp_path, ["s0", "s1", "s2", "s3"], y, onehot(y, 2), mapping)
    kept = write_evaluation(*args, model="m1")  # e.g. `evaluate` rerun after `cam`
    assert kept["cam_annotations"]["overall"] == agreement["overall"]
    assert json.loads((tmp_path / "metrics.json").read_text())["cam_annotations"]["per_slide"] == agreement["per_slide"]
    assert "cam_annotations" not in write_evaluation(*args, model="m2")  # CAMs of another (older) model: dropped
    assert "cam_annotations" not in write_evaluation(*args)
