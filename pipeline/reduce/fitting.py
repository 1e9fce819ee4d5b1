"""Fitting a reducer on the cohort's sample: PCA (exact, or ``IncrementalPCA`` in batches when the sample is above
``reduce.incremental_above_mb``) or a dense autoencoder trained with early stopping on a held-out part.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.config import PipelineConfig, ReduceConfig
from ..core.errors import ReducerError
from .reducers import SPECTRUM_COMPONENTS, TRANSFORM_BATCH_ROWS, AutoencoderReducer, PCAReducer, Reducer
from .sampling import cohort_stain, collect_sample, fit_inputs

log = logging.getLogger("pipeline")


IPCA_BATCH_BYTES = 64 * 2**20  # IncrementalPCA batch size, as standardised float64 rows
_STD_FLOOR = 1e-12  # a feature with a smaller standard deviation is constant: it keeps scale 1


def _standardisation(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(axis=0, dtype=np.float64)
    var = np.zeros(x.shape[1])
    for i in range(0, len(x), TRANSFORM_BATCH_ROWS):  # two-pass variance, in batches: no float64 copy of x
        var += ((x[i:i + TRANSFORM_BATCH_ROWS] - mean) ** 2).sum(axis=0)
    std = np.sqrt(var / max(1, len(x)))
    return mean, np.where(std > _STD_FLOOR, std, 1.0)


def _fix_signs(components: np.ndarray) -> np.ndarray:
    """Flip each component so that its largest-magnitude loading is positive (refits keep their colours)."""
    pivot = components[np.arange(len(components)), np.abs(components).argmax(axis=1)]
    return components * np.where(pivot < 0, -1.0, 1.0)[:, None]


def _percentiles(raw: np.ndarray, percentiles: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    low, high = np.percentile(raw, list(percentiles), axis=0)
    return np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)


def _default_descriptor(dims: int) -> dict:
    return {"name": "array", "dims": int(dims), "feature_names": [f"f{i}" for i in range(dims)]}


def fit_pca_on_sample(sample: np.ndarray, reduce: ReduceConfig, descriptor: dict | None = None,
                      fit_info: dict | None = None) -> PCAReducer:
    """PCA reducer from an in-memory (n, D) sample (rows with non-finite values must already be dropped)."""
    from sklearn.decomposition import PCA, IncrementalPCA

    x = np.asarray(sample, dtype=np.float32)
    n, dims = x.shape
    k = reduce.components
    if n < k + 1 or dims < k:
        raise ReducerError(f"{n} sampled tissue tiles of {dims} descriptors cannot fit {k} components",
                           fix="Describe more slides (or more tissue), or lower reduce.components.")
    mean, scale = _standardisation(x)
    m = int(min(SPECTRUM_COMPONENTS, dims, n))  # components kept for the explained-variance plot (>= k)
    incremental = x.nbytes > reduce.incremental_above_mb * 2**20
    info = dict(fit_info or {})
    if incremental:
        # Batches of IPCA_BATCH_BYTES after standardising; every batch needs at least m rows.
        batch = max(m, int(IPCA_BATCH_BYTES / (8 * dims)))
        pca = IncrementalPCA(n_components=m)
        starts = list(range(0, n, batch))
        if len(starts) > 1 and n - starts[-1] < m:
            starts.pop()  # merge a too-short last batch into the one before
        for j, s in enumerate(starts):
            e = starts[j + 1] if j + 1 < len(starts) else n
            pca.partial_fit((x[s:e] - mean) / scale)
        info["solver"] = f"IncrementalPCA(batch={batch})"
    else:
        solver = "covariance_eigh" if n >= dims else "full"
        pca = PCA(n_components=m, svd_solver=solver)
        pca.fit((x - mean) / scale)
        info["solver"] = f"PCA({solver})"
    components = _fix_signs(np.asarray(pca.components_[:k], dtype=np.float64))
    reducer = PCAReducer(components_matrix=components, pca_mean=np.asarray(pca.mean_, dtype=np.float64),
                         explained_variance_ratio=np.asarray(pca.explained_variance_ratio_, dtype=np.float64),
                         descriptor=descriptor or _default_descriptor(dims), mean=mean, scale=scale,
                         low=np.zeros(k), high=np.ones(k), scale_percentiles=reduce.scale_percentiles, fit_info=info)
    reducer.set_range(*_percentiles(reducer.project(x), reduce.scale_percentiles))
    return reducer


def build_autoencoder(dims: int, components: int, hidden_units: int, seed: int = 0):
    """Dense autoencoder D -> hidden (tanh) -> K (linear ``bottleneck``) -> hidden (tanh) -> D (linear)."""
    import keras
    from keras import layers

    init = keras.initializers.GlorotUniform
    inputs = keras.Input(shape=(dims,), name="descriptors", dtype="float32")
    h = layers.Dense(hidden_units, activation="tanh", kernel_initializer=init(seed), dtype="float32",
                     name="encoder_hidden")(inputs)
    code = layers.Dense(components, kernel_initializer=init(seed + 1), dtype="float32", name="bottleneck")(h)
    h = layers.Dense(hidden_units, activation="tanh", kernel_initializer=init(seed + 2), dtype="float32",
                     name="decoder_hidden")(code)
    outputs = layers.Dense(dims, kernel_initializer=init(seed + 3), dtype="float32", name="reconstruction")(h)
    return keras.Model(inputs, outputs, name="descriptor_autoencoder")


def _mean_loss(model, z: np.ndarray, batch_rows: int = 8192) -> float:
    total = 0.0
    for i in range(0, len(z), batch_rows):
        part = z[i:i + batch_rows]
        total += float(np.asarray(model.test_on_batch(part, part))) * len(part)
    return total / max(1, len(z))


def train_autoencoder(model, train: np.ndarray, val: np.ndarray, reduce: ReduceConfig,
                      rng: np.random.Generator) -> tuple[int, float]:
    """Mini-batch training with early stopping on the held-out rows; the best weights are kept.

    A plain loop over ``train_on_batch`` rather than ``fit``: shuffling comes from ``rng`` (reproducible without
    touching global seeds), and it avoids ``fit``'s per-epoch set-up, which dominates for a model this small.
    Returns (epochs run, best held-out loss).
    """
    batch = min(reduce.ae_batch_size, len(train))
    best_loss, best_weights, wait, epoch = _mean_loss(model, val), model.get_weights(), 0, 0
    for epoch in range(1, reduce.ae_epochs + 1):
        order = rng.permutation(len(train))
        for start in range(0, len(train), batch):
            rows = train[order[start:start + batch]]
            model.train_on_batch(rows, rows)
        loss = _mean_loss(model, val)
        if loss < best_loss * (1 - 1e-4):
            best_loss, best_weights, wait = loss, model.get_weights(), 0
        else:
            wait += 1
            if wait >= reduce.ae_patience:
                break
    model.set_weights(best_weights)
    return epoch, float(best_loss)


def fit_autoencoder_on_sample(sample: np.ndarray, reduce: ReduceConfig, descriptor: dict | None = None,
                              fit_info: dict | None = None) -> AutoencoderReducer:
    """Autoencoder reducer from an in-memory (n, D) sample: Adam on the MSE, early stopping on a held-out part."""
    import keras

    x = np.asarray(sample, dtype=np.float32)
    n, dims = x.shape
    k = reduce.components
    if n < 4:
        raise ReducerError(f"{n} sampled tissue tiles are too few to train an autoencoder",
                           fix="Describe more slides or tissue, or use reduce.method: pca.")
    mean, scale = _standardisation(x)
    z = ((x - mean) / scale).astype(np.float32)
    rng = np.random.default_rng([reduce.seed, 0xAE])
    order = rng.permutation(n)
    n_val = int(np.clip(round(n * reduce.ae_validation_fraction), 1, n - 2))
    val, train = z[order[:n_val]], z[order[n_val:]]
    model = build_autoencoder(dims, k, reduce.ae_hidden_units, reduce.seed)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=reduce.ae_learning_rate), loss="mse",
                  jit_compile=False)  # XLA does not pay off on CPU for a model this small
    epochs_run, best_loss = train_autoencoder(model, train, val, reduce, rng)
    info = dict(fit_info or {})
    info["training"] = {"epochs_run": epochs_run, "best_val_loss": round(best_loss, 6), "train_rows": int(len(train)),
                        "val_rows": int(n_val)}
    reducer = AutoencoderReducer(model=model, descriptor=descriptor or _default_descriptor(dims), mean=mean,
                                 scale=scale, low=np.zeros(k), high=np.ones(k),
                                 scale_percentiles=reduce.scale_percentiles, fit_info=info)
    reducer.set_range(*_percentiles(reducer.project(x), reduce.scale_percentiles))
    return reducer


def fit_on_sample(sample: np.ndarray, reduce: ReduceConfig, descriptor: dict | None = None,
                  fit_info: dict | None = None) -> Reducer:
    """The reducer of ``reduce.method`` fitted on an in-memory (n, D) sample."""
    fit = fit_pca_on_sample if reduce.method == "pca" else fit_autoencoder_on_sample
    return fit(sample, reduce, descriptor, fit_info)


def fit_reducer(stores: Sequence[str | Path], config: PipelineConfig | None = None, runner=None) -> Reducer:
    """Fit the reducer of ``config.reduce`` on a bounded, seeded sample of tissue tiles from every store."""
    config = config or PipelineConfig()
    t0 = time.monotonic()
    sample, descriptor, info = collect_sample(stores, config, runner)
    info = {**fit_inputs(stores, config), **info}
    reducer = fit_on_sample(sample, config.reduce, descriptor, info)
    reducer.fit_info["seconds"] = round(time.monotonic() - t0, 3)
    reducer.fit_info["reduce_config"] = config.reduce.model_dump(mode="json")
    reducer.fit_info["stain"] = cohort_stain(stores)  # the target travels with the reducer (plain JSON)
    log.info("reduce: fitted %s (%d components) on %d tiles from %d slides in %.1f s", reducer.method,
             reducer.components, len(sample), len(info["sample_tiles"]), time.monotonic() - t0)
    return reducer
