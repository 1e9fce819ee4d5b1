"""The evaluation files of a set of predictions: ``OUT/metrics.json``, ``OUT/predictions.csv`` (slide_id, fold,
true_label, predicted_label in the user's labels, ``prob_<label>`` per class) and ``OUT/plots/`` (``roc.png``,
``confusion_matrix.png``, ``training_curves.png``). Written by ``train`` (its test slides) and ``evaluate``.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.artefacts import ANNOTATION_METRICS_JSON, CAM_DIR, METRICS_JSON, PLOTS_DIR, PREDICTIONS_CSV
from ..core.outputs import atomic_write_json, atomic_write_text
from ..model.labels import LabelMapping
from .metrics import add_baseline, compute_metrics, summarise_folds
from .plots import plot_confusion, plot_history, plot_roc


def predictions_table(slide_ids: Sequence[str], proba: np.ndarray, mapping: LabelMapping,
                      y_true: np.ndarray | None = None, extra: dict[str, Sequence] | None = None) -> str:
    """CSV text: slide_id, [extra columns], [true_label], predicted_label, prob_<label> per class."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    extra = extra or {}
    header = ["slide_id", *extra, *(["true_label"] if y_true is not None else []), "predicted_label",
              *[f"prob_{name}" for name in mapping.names()]]
    writer.writerow(header)
    predicted = mapping.to_label(np.asarray(proba).argmax(axis=1)) if len(proba) else []
    for i, slide_id in enumerate(slide_ids):
        row = [slide_id, *[extra[c][i] for c in extra]]
        if y_true is not None:
            row.append(mapping.values[int(y_true[i])])
        row.append(predicted[i])
        row.extend(f"{float(v):.6f}" for v in proba[i])
        writer.writerow(row)
    return buf.getvalue()


def write_evaluation(out_dir: str | Path, slide_ids: Sequence[str], y_true: np.ndarray, proba: np.ndarray,
                     mapping: LabelMapping, *, folds: Sequence[int] | None = None,
                     histories: Sequence[dict] = (), split: str = "test", extra_notes: Sequence[str] = (),
                     baseline: np.ndarray | None = None, model: str | None = None) -> dict:
    """Metrics, predictions CSV and plots for these predictions; returns the metrics dict.

    ``baseline``: the map-statistics baseline's probabilities for the same slides; its metrics and the comparison
    with the network go into ``metrics["baseline"]`` and ``metrics["network_vs_baseline"]``.
    ``model``: the model's identity (``model_identity``): the CAM-annotation metrics ``cam`` wrote for this model
    stay in ``metrics.json`` (under ``cam_annotations``) when the metrics are rewritten.
    """
    out_dir = Path(out_dir)
    y_true = np.asarray(y_true, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float32).reshape(len(slide_ids), mapping.num_classes)
    metrics = compute_metrics(y_true, proba, mapping)
    metrics = {"split": split, "label_kind": mapping.kind, **metrics}
    if folds is not None:
        folds_arr = np.asarray(folds)
        per_fold = []
        for k in sorted(set(folds_arr.tolist())):
            sel = folds_arr == k
            per_fold.append({"fold": int(k), **compute_metrics(y_true[sel], proba[sel], mapping)})
        metrics["evaluation"] = "out-of-fold predictions pooled over all folds"
        metrics["folds"] = per_fold
        metrics["fold_summary"] = summarise_folds(per_fold)
    metrics["notes"] = list(extra_notes) + metrics.get("notes", [])
    if baseline is not None:
        add_baseline(metrics, y_true, baseline, mapping)
    extra = {"fold": list(folds)} if folds is not None else None
    atomic_write_text(out_dir / PREDICTIONS_CSV, predictions_table(slide_ids, proba, mapping, y_true, extra))
    plots = out_dir / PLOTS_DIR
    files = {"metrics": METRICS_JSON, "predictions": PREDICTIONS_CSV}
    if len(y_true):
        if plot_roc(y_true, proba, mapping, plots / "roc.png", title=f"ROC ({split}, n={len(y_true)})"):
            files["roc"] = f"{PLOTS_DIR}/roc.png"
        plot_confusion(metrics["confusion_matrix"]["matrix"], mapping, plots / "confusion_matrix.png",
                       title=f"confusion matrix ({split}, n={len(y_true)})")
        files["confusion_matrix"] = f"{PLOTS_DIR}/confusion_matrix.png"
    if plot_history(histories, plots / "training_curves.png"):
        files["training_curves"] = f"{PLOTS_DIR}/training_curves.png"
    metrics["files"] = files
    cam_annotations = cam_annotation_metrics(out_dir, model)
    if cam_annotations is not None:
        metrics["cam_annotations"] = cam_annotations
    atomic_write_json(out_dir / METRICS_JSON, metrics)
    return metrics


def cam_annotation_metrics(out_dir: Path, model: str | None) -> dict | None:
    """``OUT/cam/annotation_metrics.json`` when ``cam`` wrote it for this ``model`` (None otherwise)."""
    path = out_dir / CAM_DIR / ANNOTATION_METRICS_JSON
    if model is None or not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return saved if isinstance(saved, dict) and saved.get("model") == model else None
