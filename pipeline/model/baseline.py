"""The map-statistics baseline trained beside the network: does the CNN earn its keep?

Each slide's feature map becomes a short vector: per component, percentiles and a histogram of its tissue cells
(background cells, ``MAP_FILL``, are left out). A logistic regression (standardised inputs, balanced classes, the
regularisation strength chosen by inner cross-validation) is fitted on the same training slides as the network and
scored on the same test slides. It is saved as plain JSON (no pickle) and applied with numpy.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

PERCENTILES = (5.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0)
HISTOGRAM_BINS = 8  # equal bins over the tissue value range [0, 1]
REGULARISATION = (0.01, 0.1, 1.0, 10.0)  # candidate C of the logistic regression
TOLERANCE = 0.02  # the network is flagged when its score is below the baseline's by more than this
BASELINE_FORMAT = 1


def map_statistics(fmap: np.ndarray) -> np.ndarray:
    """(rows, cols, K) feature map -> (K * (len(PERCENTILES) + HISTOGRAM_BINS),) statistics of its tissue cells."""
    fmap = np.asarray(fmap, dtype=np.float32)
    if fmap.ndim == 2:
        fmap = fmap[:, :, None]
    values = fmap.reshape(-1, fmap.shape[-1])
    tissue = np.isfinite(values).all(axis=1) & (values >= 0).all(axis=1)
    values = np.clip(values[tissue], 0.0, 1.0)
    parts = []
    for k in range(fmap.shape[-1]):
        column = values[:, k]
        if column.size == 0:
            parts.append(np.zeros(len(PERCENTILES) + HISTOGRAM_BINS, np.float32))
            continue
        hist, _ = np.histogram(column, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
        parts.append(np.concatenate([np.percentile(column, PERCENTILES), hist / column.size]).astype(np.float32))
    return np.concatenate(parts)


def statistics_matrix(maps: Sequence[np.ndarray]) -> np.ndarray:
    return np.stack([map_statistics(m) for m in maps]) if len(maps) else np.zeros((0, 0), np.float32)


def fit_baseline(features: np.ndarray, y: np.ndarray, num_classes: int, seed: int = 0) -> dict:
    """Fit the logistic regression; returns its parameters as a JSON-ready dict (see ``baseline_proba``)."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.preprocessing import StandardScaler

    features = np.asarray(features, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    scaler = StandardScaler().fit(features)
    z = scaler.transform(features)
    smallest = int(np.bincount(y, minlength=num_classes)[np.unique(y)].min())
    if smallest >= 3:
        with warnings.catch_warnings():  # scikit-learn 1.9 announces new defaults we do not rely on
            warnings.simplefilter("ignore", FutureWarning)
            model = LogisticRegressionCV(Cs=list(REGULARISATION), cv=min(5, smallest), class_weight="balanced",
                                         scoring="neg_log_loss", max_iter=5000, random_state=seed).fit(z, y)
        c = float(np.atleast_1d(model.C_)[0])
    else:  # too few slides of a class for an inner split: the middle candidate
        c = 1.0
        model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000, random_state=seed).fit(z, y)
    coef = np.asarray(model.coef_, dtype=np.float64)
    intercept = np.asarray(model.intercept_, dtype=np.float64)
    if coef.shape[0] == 1:  # binary: one logit for the second class
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept])
    full_coef = np.zeros((num_classes, coef.shape[1]))
    full_intercept = np.full(num_classes, -1e3)  # a class absent from training is never predicted
    for row, cls in enumerate(model.classes_):
        full_coef[int(cls)], full_intercept[int(cls)] = coef[row], intercept[row]
    return {"format": BASELINE_FORMAT, "method": "map statistics + logistic regression",
            "percentiles": list(PERCENTILES), "histogram_bins": HISTOGRAM_BINS, "C": c,
            "mean": scaler.mean_.tolist(), "scale": scaler.scale_.tolist(),
            "coef": full_coef.tolist(), "intercept": full_intercept.tolist()}


def baseline_proba(params: dict, features: np.ndarray) -> np.ndarray:
    """Class probabilities (n, K) of the fitted baseline ``params`` for statistics ``features`` (n, D)."""
    features = np.asarray(features, dtype=np.float64)
    coef = np.asarray(params["coef"])
    if len(features) == 0:
        return np.zeros((0, coef.shape[0]), np.float32)
    z = (features - np.asarray(params["mean"])) / np.asarray(params["scale"])
    logits = z @ coef.T + np.asarray(params["intercept"])
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def comparison(network: dict, baseline: dict, tolerance: float = TOLERANCE) -> dict:
    """Network against baseline on ROC AUC (balanced accuracy where no AUC is defined)."""
    for key in ("roc_auc", "balanced_accuracy", "accuracy"):
        if network.get(key) is not None and baseline.get(key) is not None:
            margin = float(network[key]) - float(baseline[key])
            return {"metric": key, "network": float(network[key]), "baseline": float(baseline[key]),
                    "margin": margin, "tolerance": tolerance, "network_below_baseline": margin < -tolerance}
    return {"metric": None, "network_below_baseline": False}
