"""``evaluate``: recompute a saved model's test metrics and plots (out-of-fold for k-fold), or evaluate it on every
slide of another labels file whose maps are in the output directory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..core.artefacts import MODEL_DIR, model_identity
from ..core.errors import ModelError
from ..core.maps import read_feature_maps
from ..core.outputs import output_lock
from ..core.store import store_ids
from ..model.labels import LabelMapping, check_slides, read_labels
from ..model.trained import TrainedModel
from .files import write_evaluation

log = logging.getLogger("pipeline")


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
                                   histories=info.get("history", []), split=split_name, baseline=base_arr,
                                   model=model_identity(info))
    log.info("evaluate: %d slides, accuracy %.3f, ROC AUC %s", len(ids), metrics.get("accuracy", float("nan")),
             metrics.get("roc_auc"))
    return metrics


def _as_label(value, mapping: LabelMapping):
    return int(value) if mapping.kind == "integer" else str(value)
