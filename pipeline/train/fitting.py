"""Training one model on one split: the recipe's phases (``head`` then ``finetune``, or one ``scratch`` phase), early
stopping and best checkpoints on the validation loss, balanced class weights as sample weights; fine-tuning is kept
only if it beats the head phase's best validation loss.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..core.config import TrainConfig
from .splits import Split, class_weights

log = logging.getLogger("pipeline")


SCRATCH_BATCHNORM_MOMENTUM = 0.9  # Keras' 0.99 lags a few hundred steps behind weights trained from scratch


@dataclass
class FoldResult:
    model: Any
    history: dict
    test_proba: np.ndarray
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _epoch_logger(phase: str, fold: int | None):
    import keras

    class EpochLog(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted((logs or {}).items()) if isinstance(v, float))
            log.info("train%s %s epoch %d: %s", f" fold {fold}" if fold else "", phase, epoch + 1, shown)

    return EpochLog()


def fit_model(maps: Sequence[np.ndarray], y: np.ndarray, split: Split, num_classes: int, cfg: TrainConfig,
              checkpoint_dir: Path, verbose: int = 0) -> FoldResult:
    """Build and train one model on ``split.train`` (validated on ``split.val``); predict ``split.test``."""
    import keras

    from ..model.batches import MapBatches, predict_proba
    from ..model.network import (adapt_head_norm, batchnorm_momentum, batchnorm_trains, build_model,
                                 calibrate_batchnorm, compile_model, resolve_weights, set_phase)

    t0 = time.monotonic()
    seed = cfg.seed + (split.fold or 0)
    keras.utils.set_random_seed(seed)
    model = build_model(num_classes, cfg)
    weights = class_weights(y[split.train], num_classes) if cfg.class_weights else np.ones(num_classes, np.float32)
    pick = lambda idx: [maps[i] for i in idx]  # noqa: E731
    train_data = MapBatches(pick(split.train), cfg, y[split.train], weights[y[split.train]], augment=cfg.augment,
                            shuffle=True, seed=seed)
    val_data = (MapBatches(pick(split.val), cfg, y[split.val], weights[y[split.val]], seed=seed)
                if len(split.val) else None)
    plain_train = MapBatches(pick(split.train), cfg, seed=seed)
    # Scratch always starts from calibrated BatchNorm statistics: with Keras' defaults (mean 0, variance 1) a random
    # base's pooled features are ~1e-5 apart, head_norm would scale them up by as much, and once BatchNorm trains the
    # logits explode (training losses of 1e5 seen).
    if cfg.recipe == "scratch" or (cfg.calibrate_batchnorm and resolve_weights(cfg.weights) is None):
        calibrate_batchnorm(model, plain_train)
    adapt_head_norm(model, plain_train)
    monitor = "val_loss" if val_data is not None else "loss"
    history: dict[str, list] = {"phase": []}
    notes: list[str] = []
    best_head: tuple[float, list] | None = None
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    for phase, epochs, lr in recipe_phases(cfg):
        set_phase(model, phase, cfg.unfreeze_from, batchnorm_trains(cfg))
        # scratch: one cosine cycle over all its epochs, the best validation epoch kept (no early stop)
        scratch = phase == "scratch"
        compile_model(model, lr, decay_steps=epochs * len(train_data) if scratch else None)
        ckpt = checkpoint_dir / f"{'fold%d-' % split.fold if split.fold else ''}{phase}.weights.h5"
        warmup = min(cfg.min_epochs, epochs - 1)
        callbacks = [
            keras.callbacks.EarlyStopping(monitor=monitor, patience=epochs if scratch else cfg.patience,
                                          restore_best_weights=True, start_from_epoch=warmup),
            keras.callbacks.ModelCheckpoint(str(ckpt), monitor=monitor, save_best_only=True, save_weights_only=True),
            _epoch_logger(phase, split.fold),
        ]
        # scratch: BatchNorm learns, with fast-moving statistics so validation (inference mode) follows the weights,
        # then exact statistics of the chosen weights on the training maps ("precise BN")
        with batchnorm_momentum(model, SCRATCH_BATCHNORM_MOMENTUM) if scratch else contextlib.nullcontext():
            fitted = model.fit(train_data, validation_data=val_data, epochs=epochs, callbacks=callbacks,
                               verbose=verbose)
        if scratch:
            calibrate_batchnorm(model, plain_train)
        for key, values in fitted.history.items():
            history.setdefault(key, []).extend(float(v) for v in values)
        history["phase"].extend([phase] * len(fitted.history[monitor]))
        best = float(np.min(fitted.history[monitor][warmup:]))  # the epoch EarlyStopping restored
        if phase == "head":
            best_head = (best, model.get_weights())
        elif best_head is not None and best >= best_head[0]:
            # Fine-tuning must earn its place on the validation loss; otherwise the head-phase model is kept.
            model.set_weights(best_head[1])
            where = f"fold {split.fold}: " if split.fold else ""
            notes.append(f"{where}fine-tuning did not improve {monitor} ({best:.4f} >= {best_head[0]:.4f}): "
                         "kept the head-phase weights")
    set_phase(model, "head", cfg.unfreeze_from)  # saved frozen: a reloaded model is ready for inference/Grad-CAM
    # A fresh, unused optimizer: the saved file then carries no optimizer state (half the size after fine-tuning).
    compile_model(model, cfg.head_learning_rate)
    test_proba = predict_proba(model, pick(split.test), cfg)
    history["fold"] = split.fold
    history["monitor"] = monitor
    return FoldResult(model, history, test_proba, notes, round(time.monotonic() - t0, 2))


def recipe_phases(cfg: TrainConfig) -> list[tuple[str, int, float]]:
    """(phase, epochs, learning rate) of the recipe: ``scratch`` is one end-to-end phase; ``finetune`` the head on
    the frozen base, then the top blocks at a low learning rate (phases with no epochs are left out)."""
    if cfg.recipe == "scratch":
        return [("scratch", cfg.epochs, cfg.learning_rate)]
    phases = [("head", cfg.head_epochs, cfg.head_learning_rate),
              ("finetune", cfg.finetune_epochs, cfg.finetune_learning_rate)]
    return [phase for phase in phases if phase[1] > 0]
