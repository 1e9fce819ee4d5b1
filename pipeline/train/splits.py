"""Train/validation/test splits and class weights.

Splits are stratified by class with a seed, and grouped by patient when ``patient_id`` is given (all slides of a
patient land in one set, so no patient is seen in training and test); a ``split`` column in the labels file is used
as given. ``fold_splits`` gives k-fold cross-validation with the same rules.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ..core.errors import LabelsError
from ..model.labels import LabelTable

log = logging.getLogger("pipeline")


@dataclass
class Split:
    """Row indices into a LabelTable for each set (``fold`` is 1-based in k-fold, None otherwise)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    fold: int | None = None
    notes: list[str] = field(default_factory=list)

    def ids(self, table: LabelTable) -> dict[str, list[str]]:
        return {name: [table.slide_ids[i] for i in getattr(self, name)] for name in ("train", "val", "test")}


def _min_per_class(y: np.ndarray, need: int, table: LabelTable, why: str) -> None:
    values, counts = np.unique(y, return_counts=True)
    small = [(table.mapping.values[v], int(c)) for v, c in zip(values, counts) if c < need]
    if small:
        desc = ", ".join(f"{label!r}: {count}" for label, count in small)
        raise LabelsError(f"too few slides per class for {why} (needs {need} per class; {desc})", path=table.path,
                          fix="Add slides, lower train.val_fraction / train.test_fraction, use fewer folds, "
                              "or give a split column.")


def _holdout(index: np.ndarray, y: np.ndarray, groups: np.ndarray | None, fraction: float, seed: int,
             table: LabelTable, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Split ``index`` into (rest, held out ~fraction), stratified by y, grouped when groups is given."""
    try:
        return _holdout_unchecked(index, y, groups, fraction, seed)
    except ValueError as err:  # scikit-learn's "The least populated class ..." and friends
        raise LabelsError(f"cannot split off the {what} set: {err}", path=table.path,
                          fix="Add slides, lower train.val_fraction / train.test_fraction, or give a split column.") from None


def _holdout_unchecked(index: np.ndarray, y: np.ndarray, groups: np.ndarray | None, fraction: float,
                       seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import StratifiedGroupKFold, train_test_split

    if fraction <= 0 or len(index) == 0:
        return index, index[:0]
    if groups is None:
        n_classes = len(np.unique(y))
        n_hold = max(n_classes, int(round(fraction * len(index))))
        rest, held = train_test_split(index, test_size=n_hold, stratify=y, random_state=seed, shuffle=True)
        return np.sort(rest), np.sort(held)
    n_groups = len(np.unique(groups))
    n_splits = int(min(max(2, round(1.0 / fraction)), n_groups))
    if n_splits < 2:
        return index, index[:0]
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    rest, held = next(cv.split(index, y, groups))
    return np.sort(index[rest]), np.sort(index[held])


def _check_train_classes(table: LabelTable, split: Split) -> None:
    y = table.y
    absent = sorted(set(range(table.mapping.num_classes)) - set(y[split.train].tolist()))
    if absent:
        raise LabelsError(
            f"after grouping by patient, class(es) {table.mapping.to_label(absent)} have no training slide"
            + (f" in fold {split.fold}" if split.fold else ""), path=table.path,
            fix="Add patients of those classes, or use fewer folds / smaller val and test fractions.")
    for name in ("val", "test"):
        idx = getattr(split, name)
        if len(idx):
            missing = sorted(set(range(table.mapping.num_classes)) - set(y[idx].tolist()))
            if missing:
                split.notes.append(f"{name} set has no slide of class(es) {table.mapping.to_label(missing)}")


def holdout_split(table: LabelTable, val_fraction: float, test_fraction: float, seed: int = 0) -> Split:
    """Train/validation/test sets: the file's split column when it has one, else stratified (grouped) at random."""
    index = np.arange(len(table))
    y = table.y
    grouped = table.patient_ids is not None
    groups = table.groups if grouped else None
    if table.splits is not None:
        splits = np.asarray(table.splits)
        train, val, test = index[splits == "train"], index[splits == "val"], index[splits == "test"]
        if len(val) == 0 and val_fraction > 0:
            train, val = _holdout(train, y[train], None if groups is None else groups[train], val_fraction, seed,
                                  table, "validation")
        split = Split(train, val, test)
        split.notes.append("sets from the file's split column")
    else:
        need = 1 + (val_fraction > 0) + (test_fraction > 0)
        _min_per_class(y, need, table, "a stratified train/validation/test split")
        rest, test = _holdout(index, y, groups, test_fraction, seed, table, "test")
        # the validation fraction is of the whole cohort, so take it relative to what is left
        val_of_rest = val_fraction / max(1e-9, 1.0 - test_fraction)
        train, val = _holdout(rest, y[rest], None if groups is None else groups[rest], min(val_of_rest, 0.9), seed + 1,
                              table, "validation")
        split = Split(train, val, test)
    _check_train_classes(table, split)
    return split


def fold_splits(table: LabelTable, folds: int, val_fraction: float, seed: int = 0) -> list[Split]:
    """K-fold cross-validation: each fold is the test set once; validation comes out of the other folds."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if folds < 2:
        raise LabelsError(f"k-fold needs at least 2 folds, got {folds}", path=table.path)
    y = table.y
    index = np.arange(len(table))
    grouped = table.patient_ids is not None
    if table.splits is not None:
        log.warning("labels file %s has a split column: it is ignored for %d-fold cross-validation", table.path, folds)
    _min_per_class(y, folds, table, f"{folds}-fold cross-validation")
    if grouped:
        n_groups = len(np.unique(table.groups))
        if n_groups < folds:
            raise LabelsError(f"{folds} folds need at least {folds} patients, the file has {n_groups}", path=table.path,
                              fix="Use fewer folds.")
        cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        parts = cv.split(index, y, table.groups)
    else:
        parts = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(index, y)
    out = []
    for k, (rest, test) in enumerate(parts, start=1):
        groups = table.groups[rest] if grouped else None
        val_of_rest = val_fraction * folds / (folds - 1)
        train, val = _holdout(rest, y[rest], groups, min(val_of_rest, 0.9), seed + k, table, f"fold {k} validation")
        split = Split(np.sort(train), np.sort(val), np.sort(test), fold=k)
        _check_train_classes(table, split)
        out.append(split)
    return out


def class_weights(y: np.ndarray, num_classes: int) -> np.ndarray:
    """Balanced weights n / (K * count_k): each class contributes equally to the loss (classes absent get 0)."""
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    weights = np.zeros(num_classes, dtype=np.float64)
    present = counts > 0
    weights[present] = len(y) / (present.sum() * counts[present])
    return weights.astype(np.float32)
