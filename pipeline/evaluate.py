"""Apply a trained model: test metrics and plots (``evaluate``), and predictions for new slides (``predict``).

Metrics (scikit-learn) are computed on the held-out test slides, or out-of-fold over all folds in k-fold
cross-validation (pooled, plus each fold and their mean and standard deviation):

* accuracy, balanced accuracy, macro precision / recall / F1 and the same per class;
* ROC AUC: binary (positive = the second class), or one-vs-rest per class and their macro mean; a class without
  positive or negative test slides has no AUC (``null``) and is named in ``notes``;
* the confusion matrix in the user's labels;
* for integer labels (ordinal, e.g. grades): mean absolute error in label units and quadratic weighted kappa.

Files: ``OUT/metrics.json``, ``OUT/predictions.csv`` (slide_id, fold, true_label, predicted_label in the user's
labels, ``prob_<label>`` per class), ``OUT/plots/roc.png``, ``OUT/plots/confusion_matrix.png`` and
``OUT/plots/training_curves.png``.

``predict_slides`` runs new slides end to end: describe (with the tiling/tissue/descriptor settings the model's
training slides were described with), map with the reducer saved next to the model, predict; it writes
``OUT/predict/predictions.csv``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .core.config import PipelineConfig, TrainConfig
from .core.errors import MissingInputError, ModelError, PipelineError, error_record
from .labels import LabelMapping, read_labels, check_slides
from .core.outputs import Manifest, atomic_output_path, atomic_write_json, atomic_write_text, output_lock
from .core.store import store_ids, store_path
from .core.artefacts import (BASELINE_JSON, METRICS_JSON, MODEL_DIR, PLOTS_DIR, PREDICT_DIR, PREDICTIONS_CSV,
                             REDUCER_DIR, read_model_info)
from .core.maps import read_feature_maps

log = logging.getLogger("pipeline")



# --- metrics (pure) ------------------------------------------------------------------------------------------------


def _auc_or_none(y_binary: np.ndarray, score: np.ndarray) -> float | None:
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
        auc = _auc_or_none((y_true == i).astype(int), proba[:, i])
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


# --- files ---------------------------------------------------------------------------------------------------------


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


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> None:
    with atomic_output_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")


def plot_roc(y_true: np.ndarray, proba: np.ndarray, mapping: LabelMapping, path: Path, title: str = "") -> Path | None:
    """Binary: one ROC curve; more classes: one-vs-rest curve per class. None when no curve is defined."""
    from sklearn.metrics import roc_curve

    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 5))
    classes = [1] if mapping.num_classes == 2 else range(mapping.num_classes)
    drawn = 0
    for i in classes:
        positives = (np.asarray(y_true) == i).astype(int)
        if positives.min() == positives.max():
            continue
        fpr, tpr, _ = roc_curve(positives, proba[:, i])
        auc = _auc_or_none(positives, proba[:, i])
        label = f"{mapping.names()[i]} vs rest" if mapping.num_classes > 2 else f"positive = {mapping.names()[i]}"
        ax.plot(fpr, tpr, label=f"{label} (AUC {auc:.3f})")
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title or "ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    _save_figure(fig, path)
    plt.close(fig)
    return path


def plot_confusion(matrix: Sequence[Sequence[int]], mapping: LabelMapping, path: Path, title: str = "") -> Path:
    plt = _figure()
    matrix = np.asarray(matrix)
    k = mapping.num_classes
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * k, 1.0 + 0.7 * k))
    ax.imshow(matrix, cmap="Blues")
    for r in range(k):
        for c in range(k):
            colour = "white" if matrix[r, c] > matrix.max() / 2 else "black"
            ax.text(c, r, str(matrix[r, c]), ha="center", va="center", color=colour)
    ax.set_xticks(range(k), mapping.names())
    ax.set_yticks(range(k), mapping.names())
    ax.set(xlabel="predicted label", ylabel="true label", title=title or "confusion matrix")
    _save_figure(fig, path)
    plt.close(fig)
    return path


def plot_history(histories: Sequence[dict], path: Path) -> Path | None:
    """Loss and accuracy per epoch (training solid, validation dashed), phases separated, one colour per fold."""
    histories = [h for h in histories if h and h.get("loss")]
    if not histories:
        return None
    plt = _figure()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for f, hist in enumerate(histories):
        colour = f"C{f % 10}"
        epochs = np.arange(1, len(hist["loss"]) + 1)
        tag = f"fold {hist['fold']} " if hist.get("fold") else ""
        for ax, key in zip(axes, ("loss", "accuracy")):
            if hist.get(key):
                ax.plot(epochs, hist[key], color=colour, label=f"{tag}train")
            if hist.get(f"val_{key}"):
                ax.plot(epochs, hist[f"val_{key}"], "--", color=colour, label=f"{tag}validation")
        phases = hist.get("phase", [])
        for e in range(1, len(phases)):
            if phases[e] != phases[e - 1]:
                for ax in axes:
                    ax.axvline(e + 0.5, color=colour, linewidth=0.6, alpha=0.6)
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.set(xlabel="epoch (vertical line: fine-tuning starts)", ylabel=key)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    _save_figure(fig, path)
    plt.close(fig)
    return path


def write_evaluation(out_dir: str | Path, slide_ids: Sequence[str], y_true: np.ndarray, proba: np.ndarray,
                     mapping: LabelMapping, *, folds: Sequence[int] | None = None,
                     histories: Sequence[dict] = (), split: str = "test", extra_notes: Sequence[str] = (),
                     baseline: np.ndarray | None = None) -> dict:
    """Metrics, predictions CSV and plots for these predictions; returns the metrics dict.

    ``baseline``: the map-statistics baseline's probabilities for the same slides; its metrics and the comparison
    with the network go into ``metrics["baseline"]`` and ``metrics["network_vs_baseline"]``.
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
        _add_baseline(metrics, y_true, baseline, mapping)
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
    atomic_write_json(out_dir / METRICS_JSON, metrics)
    return metrics


def _add_baseline(metrics: dict, y_true: np.ndarray, proba: np.ndarray, mapping: LabelMapping) -> None:
    from .baseline import comparison

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


# --- the saved model -----------------------------------------------------------------------------------------------


class TrainedModel:
    """The model(s) of a model directory: one, or one per fold (their probabilities are averaged)."""

    def __init__(self, model_dir: str | Path):
        from .model import load_model

        self.dir = Path(model_dir)
        self.info = read_model_info(self.dir)
        self.mapping = LabelMapping.from_dict(self.info["labels"])
        self.train_config = TrainConfig.model_validate(self.info["config"]["train"])
        self.models = [load_model(self.dir / name) for name in self.info["models"]]
        baseline_file = self.dir / BASELINE_JSON
        self.baselines = (json.loads(baseline_file.read_text(encoding="utf-8"))["models"]
                          if baseline_file.is_file() else [])

    def baseline_predict(self, maps: Sequence[np.ndarray], model_index: int | None = None) -> np.ndarray | None:
        """The map-statistics baseline's probabilities (None for a model directory without one)."""
        from .baseline import baseline_proba, statistics_matrix

        if not self.baselines:
            return None
        chosen = self.baselines if model_index is None else [self.baselines[model_index]]
        features = statistics_matrix(maps)
        return np.mean([baseline_proba(params, features) for params in chosen], axis=0)

    def predict(self, maps: Sequence[np.ndarray], model_index: int | None = None) -> np.ndarray:
        from .model import predict_proba

        chosen = self.models if model_index is None else [self.models[model_index]]
        return np.mean([predict_proba(m, maps, self.train_config) for m in chosen], axis=0)


def evaluate(out_dir: str | Path, model_dir: str | Path | None = None, labels_csv: str | Path | None = None) -> dict:
    """Recompute test metrics and plots with a saved model.

    Without ``labels_csv``: the test slides recorded at training (out-of-fold for k-fold). With it: every slide of
    that file, from the maps in ``out_dir`` (e.g. an external cohort described and reduced with the same settings).
    """
    out_dir = Path(out_dir)
    model_dir = Path(model_dir) if model_dir else out_dir / MODEL_DIR
    trained = TrainedModel(model_dir)
    info, mapping = trained.info, trained.mapping
    with output_lock(out_dir, command="evaluate"):
        if labels_csv is None:
            ids, y, proba, folds, base = [], [], [], [], []
            truth = info["truth"]
            for index, split in enumerate(info["splits"]):
                test_ids = split["test"]
                if not test_ids:
                    continue
                maps = read_feature_maps(out_dir, test_ids)
                proba.append(trained.predict(maps, model_index=index))
                base.append(trained.baseline_predict(maps, model_index=index))
                ids.extend(test_ids)
                y.extend(mapping.to_index([_as_label(truth[s], mapping) for s in test_ids]))
                folds.extend([split.get("fold")] * len(test_ids))
            if not ids:
                raise ModelError("the model was trained without test slides: nothing to evaluate", path=model_dir,
                                 fix="Pass --labels with labelled slides whose maps are in OUT.")
            proba_arr = np.concatenate(proba)
            base_arr = None if any(b is None for b in base) else np.concatenate(base)
            fold_col = folds if info.get("folds") else None
            split_name = "test"
        else:
            table = read_labels(labels_csv, mapping.kind)
            check_slides(table, store_ids(out_dir))
            ids = table.slide_ids
            y = mapping.to_index(table.labels)
            maps = read_feature_maps(out_dir, ids)
            proba_arr, base_arr = trained.predict(maps), trained.baseline_predict(maps)
            fold_col, split_name = None, f"labels file {Path(labels_csv).name}"
        metrics = write_evaluation(out_dir, ids, np.asarray(y), proba_arr, mapping, folds=fold_col,
                                   histories=info.get("history", []), split=split_name, baseline=base_arr)
    log.info("evaluate: %d slides, accuracy %.3f, ROC AUC %s", len(ids), metrics.get("accuracy", float("nan")),
             metrics.get("roc_auc"))
    return metrics


def _as_label(value, mapping: LabelMapping):
    return int(value) if mapping.kind == "integer" else str(value)


# --- predict on new slides -----------------------------------------------------------------------------------------


def describe_config_for(info: dict, config: PipelineConfig | None) -> PipelineConfig:
    """The settings to describe new slides with: the training slides' tiling/tissue/descriptor settings (as their
    stores recorded them), with the caller's cluster, reader and mpp override."""
    config = config or PipelineConfig()
    data = config.model_dump(mode="python")
    for section, values in (info.get("describe_config") or {}).items():
        if section in ("tiling", "tissue", "descriptor"):
            data[section] = values
    if config.tiling.mpp_override is not None:  # about the new slides' files, not the model
        data["tiling"] = {**data["tiling"], "mpp_override": config.tiling.mpp_override}
    data["reduce"] = info["config"].get("reduce", data["reduce"])
    data["train"] = info["config"]["train"]
    return PipelineConfig.model_validate(data)


def predict_slides(slides: Sequence[str | Path], model_dir: str | Path, out_dir: str | Path,
                   config: PipelineConfig | None = None, runner=None, progress: bool | None = None,
                   errors: dict | None = None) -> dict:
    """Describe new slides into ``out_dir``, map them with the model's reducer, predict.

    Writes ``OUT/predict/predictions.csv`` and returns {"predictions": [{"slide_id", "predicted_label",
    "probabilities"}], "failed": {slide_id: error record}}. ``errors``, if given, is filled with slide id -> the
    exception that failed it. A failing slide never stops the others.
    """
    from .describe.runner import assign_slide_ids, describe_slides
    from .reduce.reducers import load_reducer
    from .reduce.maps import map_slide
    from .slides.open import find_slides

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    t0 = time.monotonic()
    trained = TrainedModel(model_dir)  # fail on a bad model before describing anything
    reducer_dir = model_dir / REDUCER_DIR
    if not reducer_dir.is_dir():
        raise ModelError(f"no {REDUCER_DIR}/ saved with the model", path=model_dir,
                         fix="Retrain with `wsi-pipeline train` after `reduce` (it copies OUT/reducer/ into the model).")
    reducer = load_reducer(reducer_dir)
    dcfg = describe_config_for(trained.info, config)
    errors = {} if errors is None else errors
    describe_slides(list(slides), out_dir, dcfg, runner=runner, progress=progress, errors=errors)
    paths, _ = find_slides(slides)
    ids, _ = assign_slide_ids(paths)
    failed = {sid: error_record(err) for sid, err in errors.items()}
    rows: list[dict] = []
    with output_lock(out_dir, command="predict"):
        manifest = Manifest(out_dir)
        ok_ids, maps = [], []
        for slide_id in sorted(ids):
            if slide_id in failed:
                continue
            try:
                map_slide(store_path(out_dir, slide_id), reducer)
                maps.extend(read_feature_maps(out_dir, [slide_id]))
                ok_ids.append(slide_id)
            except PipelineError as err:
                errors[slide_id] = err
                failed[slide_id] = error_record(err)
        proba = trained.predict(maps) if maps else np.zeros((0, trained.mapping.num_classes), np.float32)
        predicted = trained.mapping.to_label(proba.argmax(axis=1)) if len(proba) else []
        for i, slide_id in enumerate(ok_ids):
            probs = {name: float(p) for name, p in zip(trained.mapping.names(), proba[i])}
            rows.append({"slide_id": slide_id, "predicted_label": predicted[i], "probabilities": probs})
            manifest.set_stage(slide_id, "predict", {"status": "done", "predicted_label": predicted[i],
                                                     "model": str(model_dir.resolve())})
        for slide_id, record in failed.items():
            manifest.set_stage(slide_id, "predict", {"status": "failed", "error": record})
        manifest.save()
        text = predictions_table(ok_ids, proba, trained.mapping)
        atomic_write_text(out_dir / PREDICT_DIR / PREDICTIONS_CSV, text)
        atomic_write_json(out_dir / PREDICT_DIR / "summary.json", {
            "model": str(model_dir.resolve()), "slides": len(ids), "predicted": len(ok_ids), "failed": failed,
            "seconds": round(time.monotonic() - t0, 2)})
    return {"predictions": rows, "failed": failed}


def predict_slide(path: str | Path, model_dir: str | Path, out: str | Path | None = None,
                  config: PipelineConfig | None = None) -> dict:
    """One slide, in this process: {"slide_id", "predicted_label", "probabilities": {label: p}}.

    ``out`` keeps the slide's store (descriptors, feature map) there; without it a temporary directory is used.
    Raises the slide's typed error when it cannot be described or mapped.
    """
    from .core.parallel import LocalRunner

    tmp = tempfile.mkdtemp(prefix="wsi-predict-") if out is None else None
    errors: dict = {}
    try:
        result = predict_slides([path], model_dir, out or tmp, config, runner=LocalRunner(), progress=False,
                                errors=errors)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if errors:
        raise next(iter(errors.values()))
    if not result["predictions"]:
        raise MissingInputError("no slide found at this path", path=path,
                                fix="Pass a whole-slide image file (SVS, TIFF, NDPI, ...).")
    return result["predictions"][0]
