"""Metrics of slide-level predictions, computed by hand: binary, ordinal in user units, multiclass, folds."""

import numpy as np
import pytest

from pipeline.evaluate.metrics import compute_metrics, summarise_folds
from pipeline.model.labels import LabelMapping


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
