"""Evaluation plots: ROC curves, the confusion matrix and the training curves, written atomically as PNGs."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.outputs import atomic_output_path
from ..model.labels import LabelMapping
from .metrics import auc_or_none


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
        auc = auc_or_none(positives, proba[:, i])
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
