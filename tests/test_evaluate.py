import csv
import json

import numpy as np
import pytest

from pipeline.evaluate.metrics import compute_metrics, summarise_folds
from pipeline.evaluate.files import predictions_table, write_evaluation
from pipeline.model.labels import LabelMapping

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def onehot(idx, k, p=0.7):
    """Probabilities with ``p`` on the given class and the rest spread evenly."""
    out = np.full((len(idx), k), (1 - p) / (k - 1))
    out[np.arange(len(idx)), idx] = p
    return out


def test_binary_metrics_by_hand():
    mapping = LabelMapping("integer", (0, 1))
    y = np.array([0, 0, 0, 1, 1, 1])
    score = np.array([0.1, 0.4, 0.6, 0.35, 0.8, 0.9])  # class-1 probability
    proba = np.stack([1 - score, score], axis=1)
    m = compute_metrics(y, proba, mapping)
    # predictions: 0 0 1 | 0 1 1  -> 4 of 6 right; each class: precision 2/3, recall 2/3
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision_macro"] == pytest.approx(2 / 3) and m["recall_macro"] == pytest.approx(2 / 3)
    # ROC AUC = fraction of (positive, negative) pairs ranked right: 7 of 9 (0.35 < 0.4 and 0.35 < 0.6)
    assert m["roc_auc"] == pytest.approx(7 / 9)
    assert m["confusion_matrix"]["matrix"] == [[2, 1], [1, 2]]
    assert m["mae"] == pytest.approx(2 / 6)


def test_ordinal_metrics_in_user_units():
    mapping = LabelMapping("integer", (1, 2, 3, 4, 5))
    y_idx = np.array([0, 1, 2, 3, 4])  # grades 1..5
    pred = np.array([0, 1, 2, 3, 2])  # grade 5 predicted as grade 3
    m = compute_metrics(y_idx, onehot(pred, 5), mapping)
    assert m["mae"] == pytest.approx(2 / 5)  # |5 - 3| over five slides, in grade units
    assert m["confusion_matrix"]["labels"] == [1, 2, 3, 4, 5]
    perfect = compute_metrics(y_idx, onehot(y_idx, 5), mapping)
    assert perfect["quadratic_weighted_kappa"] == pytest.approx(1.0) and perfect["mae"] == 0
    assert 0 < m["quadratic_weighted_kappa"] < 1


def test_multiclass_ovr_auc_skips_absent_class():
    mapping = LabelMapping("string", ("a", "b", "c"))
    y = np.array([0, 0, 1, 1])  # no "c" among the evaluated slides
    m = compute_metrics(y, onehot(y, 3), mapping)
    assert m["roc_auc_per_class"]["c"] is None and m["roc_auc_per_class"]["a"] == 1.0
    assert m["roc_auc"] == 1.0  # macro over the defined classes
    assert any("class c" in note for note in m["notes"])
    assert "mae" not in m  # string labels are not ordinal


def test_fold_summary():
    s = summarise_folds([{"accuracy": 0.5, "roc_auc": None}, {"accuracy": 1.0, "roc_auc": 0.8}])
    assert s["mean"]["accuracy"] == pytest.approx(0.75) and s["std"]["accuracy"] == pytest.approx(0.25)
    assert s["mean"]["roc_auc"] == pytest.approx(0.8)


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
