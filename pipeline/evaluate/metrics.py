"""Test metrics of slide-level predictions (scikit-learn), pure functions:

* accuracy, balanced accuracy, macro precision / recall / F1 and the same per class;
* ROC AUC: binary (positive = the second class), or one-vs-rest per class and their macro mean; a class without
  positive or negative test slides has no AUC (``null``) and is named in ``notes``;
* the confusion matrix in the user's labels;
* for integer labels (ordinal, e.g. grades): mean absolute error in label units and quadratic weighted kappa;
* in k-fold cross-validation, each fold and their mean and standard deviation (``summarise_folds``);
* the map-statistics baseline's metrics and its comparison with the network (``add_baseline``).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from ..model.labels import LabelMapping

log = logging.getLogger("pipeline")


def auc_or_none(y_binary: np.ndarray, score: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if y_binary.min() == y_binary.max():
        return None  # needs positives and negatives
    return float(roc_auc_score(y_binary, score))


def compute_metrics(y_true: np.ndarray, proba: np.ndarray, mapping: LabelMapping) -> dict:
    """Metrics of predictions ``proba`` (n, K) against class indices ``y_true`` (n,)."""
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, cohen_kappa_score, confusion_matrix,
                                 mean_absolute_error, precision_recall_fscore_support)

    y_true = np.asarray(y_true, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    k = mapping.num_classes
    names = mapping.names()
    notes: list[str] = []
    out: dict[str, Any] = {"n_slides": int(len(y_true)), "classes": list(mapping.values)}
    if len(y_true) == 0:
        out["notes"] = ["no slides to evaluate"]
        return out
    y_pred = proba.argmax(axis=1)
    labels = list(range(k))
    out["accuracy"] = float(accuracy_score(y_true, y_pred))
    out["balanced_accuracy"] = float(balanced_accuracy_score(y_true, y_pred)) if len(np.unique(y_true)) > 1 else None
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    pm, rm, fm, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    out.update(precision_macro=float(pm), recall_macro=float(rm), f1_macro=float(fm))
    per_class_auc = {}
    for i, name in enumerate(names):
        auc = auc_or_none((y_true == i).astype(int), proba[:, i])
        per_class_auc[name] = auc
        if auc is None:
            notes.append(f"no ROC AUC for class {name}: the evaluated slides are all or none of it")
    if k == 2:
        out["roc_auc"] = per_class_auc[names[1]]
    else:
        defined = [v for v in per_class_auc.values() if v is not None]
        out["roc_auc"] = float(np.mean(defined)) if defined else None  # one-vs-rest, macro over defined classes
    out["roc_auc_per_class"] = per_class_auc
    out["per_class"] = {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                               "support": int(s[i])} for i, name in enumerate(names)}
    out["confusion_matrix"] = {"labels": list(mapping.values),
                               "rows": "true label", "columns": "predicted label",
                               "matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist()}
    if mapping.ordinal:
        true_values = np.asarray(mapping.to_label(y_true), dtype=np.float64)
        pred_values = np.asarray(mapping.to_label(y_pred), dtype=np.float64)
        out["mae"] = float(mean_absolute_error(true_values, pred_values))
        if len(np.unique(np.concatenate([y_true, y_pred]))) > 1:
            out["quadratic_weighted_kappa"] = float(cohen_kappa_score(y_true, y_pred, labels=labels,
                                                                      weights="quadratic"))
        else:
            out["quadratic_weighted_kappa"] = None
            notes.append("no quadratic weighted kappa: truth and predictions are all one class")
        if not mapping.contiguous:
            notes.append("labels have gaps: kappa weights use class ranks, MAE uses the label values")
    out["notes"] = notes
    return out


SUMMARY_KEYS = ("accuracy", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro", "roc_auc", "mae",
                "quadratic_weighted_kappa")


def summarise_folds(fold_metrics: Sequence[dict]) -> dict:
    """Mean and standard deviation over folds of each headline metric (folds where it is undefined are skipped)."""
    mean, std = {}, {}
    for key in SUMMARY_KEYS:
        values = [m[key] for m in fold_metrics if m.get(key) is not None]
        if values:
            mean[key] = float(np.mean(values))
            std[key] = float(np.std(values))
    return {"mean": mean, "std": std}


def add_baseline(metrics: dict, y_true: np.ndarray, proba: np.ndarray, mapping: LabelMapping) -> None:
    from ..model.baseline import comparison

    scores = compute_metrics(y_true, np.asarray(proba).reshape(len(y_true), mapping.num_classes), mapping)
    metrics["baseline"] = {"method": "map statistics + logistic regression",
                           **{k: scores.get(k) for k in SUMMARY_KEYS if k in scores}}
    versus = comparison(metrics, scores)
    metrics["network_vs_baseline"] = versus
    if versus["network_below_baseline"]:
        message = (f"the network ({versus['metric']} {versus['network']:.3f}) scores below the map-statistics "
                   f"baseline ({versus['baseline']:.3f}) on the same slides")
        metrics["notes"].append(message)
        log.warning("evaluate: %s", message)
