"""Stage 3: per-tile descriptors -> a compact K-channel feature map per slide (Neural Image Compression idea).

A *reducer* maps each tile's D-dimensional descriptor to K (1..3) numbers. It is fitted once on the cohort and then
applied to every slide, so every slide's map lives on one scale:

* the fit sample is a seeded, bounded draw of tissue tiles from every slide (``reduce.sample_tiles_per_slide``,
  fewer when the whole sample would exceed ``reduce.max_sample_mb``), so a huge slide cannot dominate it;
* descriptors are standardised (mean 0, variance 1 on the sample; a constant feature keeps scale 1);
* ``pca``: principal components of the standardised sample (exact PCA, or ``IncrementalPCA`` in batches when the
  sample is above ``reduce.incremental_above_mb``); each component's sign is fixed so that its largest loading is
  positive, so refits give the same picture colours;
* ``autoencoder``: a dense Keras autoencoder with a K-unit linear bottleneck, trained on the same sample with early
  stopping on a held-out part; the bottleneck is the map;
* both: the cohort percentiles ``reduce.scale_percentiles`` of each component over the fit sample are mapped to 0 and
  1 and values are clipped, so tissue cells are in [0, 1] on every slide.

Feature-map contract (read by train / CAM): array ``feature_map`` (rows, cols, K) float32 in each slide store, tissue
cells in [0, 1], background cells ``FEATURE_MAP_FILL`` (-1.0); array attrs ``method``, ``components``,
``reducer_hash`` (content hash of the reducer), ``fill_value``, ``config_hash`` (hash of the reduce settings the
reducer was fitted with), plus ``store_fingerprint`` / ``store_config_hash`` of the store it was computed from.

The reducer is saved in ``OUT/reducer/``: ``reducer.json`` (method, descriptor names, fit inputs, hash) and
``reducer.npz`` (plain arrays, loaded with ``allow_pickle=False``); the autoencoder adds ``autoencoder.keras`` (loaded
with ``safe_mode=True``). ``reduce_slides`` is the thin runner: it fits or reuses the reducer, then maps every stale
slide in parallel (one task per slide) and writes ``OUT/maps/<slide_id>.png`` (+ ``explained_variance.png`` for PCA).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import zarr

from .core.config import PipelineConfig, ReduceConfig
from .core.errors import MissingInputError, ReducerError, ReducerMismatchError, SlideError, error_record
from .core.outputs import Manifest, output_lock
from .core.parallel import LocalRunner, runner_for
from .core.progress import Progress
from .core.store import (array_attrs, list_stores, package_versions, read_array, read_attrs, slide_id_of, slides_dir,
                         write_array)
from .core.artefacts import EXPLAINED_VARIANCE_PNG, MAPS_DIR, REDUCER_DIR
from .core.maps import FEATURE_MAP, FEATURE_MAP_FILL, VALUE_RANGE
from .core.outputs import replace_directory
from .core.parallel import Task, in_flight_limit, run_bounded

log = logging.getLogger("pipeline")

REDUCER_JSON = "reducer.json"
REDUCER_ARRAYS = "reducer.npz"
AUTOENCODER_FILE = "autoencoder.keras"
FORMAT_VERSION = 1
SPECTRUM_COMPONENTS = 50  # PCA components whose explained variance is kept for the plot
MIN_SAMPLE_PER_SLIDE = 10
TRANSFORM_BATCH_ROWS = 65536  # descriptors transformed at once (bounds memory on wide CNN descriptors)
IPCA_BATCH_BYTES = 64 * 2**20  # IncrementalPCA batch size, as standardised float64 rows
_STD_FLOOR = 1e-12  # a feature with a smaller standard deviation is constant: it keeps scale 1


# --- small helpers ----------------------------------------------------------------------------------------------------


def reduce_settings_hash(reduce: ReduceConfig) -> str:
    """Hash of the reduce settings (the describe settings are covered by the stores' own hashes)."""
    blob = json.dumps(reduce.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def descriptor_signature(attrs: dict | None) -> dict | None:
    """{name, dims, feature_names} of a store's descriptors, as the describe stage recorded them."""
    desc = (attrs or {}).get("descriptor")
    if not desc:
        return None
    return {"name": desc.get("name"), "dims": int(desc.get("dims", 0)), "feature_names": list(desc.get("feature_names", []))}


def store_key(attrs: dict) -> list[str]:
    """What identifies a store's content: slide fingerprint and describe settings hash."""
    return [str(attrs.get("fingerprint")), str(attrs.get("config_hash"))]


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def iter_descriptor_bands(store: str | Path, rows_needed: np.ndarray | None = None
                          ) -> Iterator[tuple[int, int, np.ndarray]]:
    """(r0, r1, descriptors[r0:r1]) for bands of whole Zarr chunk rows, so memory stays at one band.

    ``rows_needed``: (rows,) bool; bands without a needed row are not read.
    """
    arr = zarr.open_array(str(Path(store) / "descriptors"), mode="r")
    rows = arr.shape[0]
    step = max(1, int(arr.chunks[0]))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        if rows_needed is not None and not rows_needed[r0:r1].any():
            continue
        yield r0, r1, np.asarray(arr[r0:r1], dtype=np.float32)


def _require_store(store: Path) -> dict:
    attrs = read_attrs(store)
    if not attrs or not attrs.get("complete"):
        raise MissingInputError("no complete slide store here", path=store,
                                fix="Run `wsi-pipeline describe` for this slide first.")
    return attrs


def _hash_arrays(digest, arrays: Sequence[np.ndarray]) -> None:
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(a.tobytes())


# --- the reducers -----------------------------------------------------------------------------------------------------


class Reducer:
    """Descriptors (n, D) -> K map values in [0, 1]. Subclasses: ``PCAReducer``, ``AutoencoderReducer``.

    ``mean``/``scale`` standardise the descriptors; ``low``/``high`` are the cohort percentiles of each raw component
    that are mapped to 0 and 1. ``fit_info`` records what the reducer was fitted on (store fingerprints, settings
    hash, sample sizes); it is not part of ``hash``, which covers only what changes the maps.
    """

    method = ""

    def __init__(self, *, descriptor: dict, mean: np.ndarray, scale: np.ndarray, low: np.ndarray, high: np.ndarray,
                 scale_percentiles: Sequence[float], fit_info: dict | None = None):
        self.descriptor = {"name": descriptor.get("name"), "dims": int(descriptor["dims"]),
                           "feature_names": list(descriptor.get("feature_names") or [])}
        self.mean = np.asarray(mean, dtype=np.float64)
        self.scale = np.asarray(scale, dtype=np.float64)
        self.low = np.asarray(low, dtype=np.float64)
        self.high = np.asarray(high, dtype=np.float64)
        self.scale_percentiles = [float(p) for p in scale_percentiles]
        self.fit_info = dict(fit_info or {})
        self._hash: str | None = None

    # -- identity
    @property
    def components(self) -> int:
        return int(self.low.shape[0])

    @property
    def dims(self) -> int:
        return self.descriptor["dims"]

    @property
    def config_hash(self) -> str | None:
        return self.fit_info.get("config_hash")

    @property
    def hash(self) -> str:
        """Content hash: method, descriptor names and every number the transform uses."""
        if self._hash is None:
            digest = hashlib.sha256()
            head = {"format_version": FORMAT_VERSION, "method": self.method, "descriptor": self.descriptor,
                    "scale_percentiles": self.scale_percentiles}
            digest.update(json.dumps(head, sort_keys=True).encode())
            _hash_arrays(digest, [self.mean, self.scale, self.low, self.high, *self._model_arrays()])
            self._hash = digest.hexdigest()[:16]
        return self._hash

    def _model_arrays(self) -> list[np.ndarray]:
        raise NotImplementedError

    # -- maths
    def standardise(self, descriptors: np.ndarray) -> np.ndarray:
        x = np.asarray(descriptors, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dims:
            raise ReducerMismatchError(f"descriptors have shape {x.shape}, the reducer expects (n, {self.dims})")
        return (x - self.mean) / self.scale

    def project(self, descriptors: np.ndarray) -> np.ndarray:
        """Raw (unscaled) components, (n, K) float64."""
        x = np.asarray(descriptors)
        parts = [self._project_standardised(self.standardise(x[i:i + TRANSFORM_BATCH_ROWS]))
                 for i in range(0, max(1, len(x)), TRANSFORM_BATCH_ROWS)]
        return np.concatenate(parts, axis=0) if parts else np.zeros((0, self.components))

    def scale_components(self, raw: np.ndarray) -> np.ndarray:
        """Raw components -> [0, 1] with the cohort percentiles, clipped, float32."""
        span = np.where(self.high > self.low, self.high - self.low, 1.0)
        return np.clip((np.asarray(raw, dtype=np.float64) - self.low) / span, 0.0, 1.0).astype(np.float32)

    def transform(self, descriptors: np.ndarray) -> np.ndarray:
        """(n, D) descriptors -> (n, K) float32 in [0, 1] (cohort-scaled and clipped)."""
        return self.scale_components(self.project(descriptors))

    def reconstruct(self, descriptors: np.ndarray) -> np.ndarray:
        """Descriptors passed through the K components and back, in descriptor units (n, D) float64."""
        z = self.standardise(descriptors)
        return self._reconstruct_standardised(z) * self.scale + self.mean

    def _project_standardised(self, z: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _reconstruct_standardised(self, z: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    # -- checks
    def check_descriptor(self, descriptor: dict | None, path: str | Path | None = None) -> None:
        """Raise ``ReducerMismatchError`` unless a store's descriptors are the ones this reducer was fitted on."""
        sig = descriptor_signature({"descriptor": descriptor}) if descriptor else None
        if sig is None:
            raise ReducerMismatchError("the store records no descriptor names", path=path)
        mine = self.descriptor
        if sig["dims"] != mine["dims"] or sig["name"] != mine["name"] or (
                mine["feature_names"] and sig["feature_names"] != mine["feature_names"]):
            raise ReducerMismatchError(
                f"the slide has {sig['dims']} '{sig['name']}' descriptors, the reducer was fitted on "
                f"{mine['dims']} '{mine['name']}' descriptors" +
                ("" if sig["dims"] != mine["dims"] or sig["name"] != mine["name"] else " with other feature names"),
                path=path)

    def fit_inputs_match(self, inputs: dict) -> bool:
        return (self.fit_info.get("stores") == inputs.get("stores")
                and self.fit_info.get("config_hash") == inputs.get("config_hash"))

    # -- persistence
    def to_json(self) -> dict:
        return {"format_version": FORMAT_VERSION, "method": self.method, "components": self.components,
                "hash": self.hash, "descriptor": self.descriptor, "scale_percentiles": self.scale_percentiles,
                "fill_value": FEATURE_MAP_FILL, "fit": self.fit_info, **self._extra_json(),
                "versions": package_versions()}

    def _extra_json(self) -> dict:
        return {}

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "scale": self.scale, "low": self.low, "high": self.high}

    def _write_extra(self, directory: Path) -> None:
        pass

    def save(self, directory: str | Path) -> Path:
        """Write the reducer into ``directory`` atomically (a complete new folder is renamed into place)."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            with open(tmp / REDUCER_ARRAYS, "wb") as fh:
                np.savez(fh, **{k: np.ascontiguousarray(v) for k, v in self._arrays().items()})
            self._write_extra(tmp)
            (tmp / REDUCER_JSON).write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
            replace_directory(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    def __repr__(self) -> str:
        return f"{type(self).__name__}(components={self.components}, dims={self.dims}, hash={self.hash})"


class PCAReducer(Reducer):
    """Principal components of the standardised descriptors. ``explained_variance_ratio``: the first up to
    ``SPECTRUM_COMPONENTS`` components (the plot), of which the first K are used."""

    method = "pca"

    def __init__(self, *, components_matrix: np.ndarray, pca_mean: np.ndarray, explained_variance_ratio: np.ndarray,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.components_matrix = np.asarray(components_matrix, dtype=np.float64)  # (K, D)
        self.pca_mean = np.asarray(pca_mean, dtype=np.float64)  # ~0 after standardising, kept for exactness
        self.explained_variance_ratio = np.asarray(explained_variance_ratio, dtype=np.float64)

    def _model_arrays(self) -> list[np.ndarray]:
        return [self.components_matrix, self.pca_mean]

    def _project_standardised(self, z: np.ndarray) -> np.ndarray:
        return (z - self.pca_mean) @ self.components_matrix.T

    def _reconstruct_standardised(self, z: np.ndarray) -> np.ndarray:
        return self._project_standardised(z) @ self.components_matrix + self.pca_mean

    def _arrays(self) -> dict[str, np.ndarray]:
        return {**super()._arrays(), "components": self.components_matrix, "pca_mean": self.pca_mean,
                "explained_variance_ratio": self.explained_variance_ratio}

    def _extra_json(self) -> dict:
        k = self.components
        return {"explained_variance_ratio": [round(float(v), 6) for v in self.explained_variance_ratio[:k]],
                "explained_variance_kept": round(float(self.explained_variance_ratio[:k].sum()), 6)}


class AutoencoderReducer(Reducer):
    """A dense Keras autoencoder; the K-unit ``bottleneck`` layer is the map."""

    method = "autoencoder"

    def __init__(self, *, model, **kwargs: Any):
        super().__init__(**kwargs)
        import keras

        self.model = model
        self.encoder = keras.Model(model.input, model.get_layer("bottleneck").output, name="descriptor_encoder")

    def _model_arrays(self) -> list[np.ndarray]:
        return [np.asarray(w) for w in self.model.get_weights()]

    def _run(self, network, z: np.ndarray) -> np.ndarray:
        import keras

        return np.asarray(keras.ops.convert_to_numpy(network(z.astype(np.float32), training=False)), dtype=np.float64)

    def _project_standardised(self, z: np.ndarray) -> np.ndarray:
        if len(z) == 0:
            return np.zeros((0, self.components))
        return self._run(self.encoder, z)

    def _reconstruct_standardised(self, z: np.ndarray) -> np.ndarray:
        return self._run(self.model, z)

    def _write_extra(self, directory: Path) -> None:
        self.model.save(directory / AUTOENCODER_FILE)

    def _extra_json(self) -> dict:
        return {"model_file": AUTOENCODER_FILE}


# --- loading ------------------------------------------------------------------------------------------------------


def resolve_reducer_dir(path: str | Path) -> Path:
    """A reducer directory, or a folder holding one in ``reducer/`` (an output or model directory)."""
    path = Path(path)
    if (path / REDUCER_JSON).is_file():
        return path
    if (path / REDUCER_DIR / REDUCER_JSON).is_file():
        return path / REDUCER_DIR
    raise ReducerError(f"no {REDUCER_JSON} here (nor in {REDUCER_DIR}/)", path=path,
                       fix="Pass the reducer folder written by `wsi-pipeline reduce` (OUT/reducer or MODEL/reducer).")


def load_reducer(path: str | Path) -> Reducer:
    """Load a saved reducer (no pickle: JSON + ``np.load(allow_pickle=False)``; Keras ``safe_mode=True``)."""
    directory = resolve_reducer_dir(path)
    try:
        meta = json.loads((directory / REDUCER_JSON).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ReducerError(f"{REDUCER_JSON} cannot be read: {err}", path=directory / REDUCER_JSON) from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ReducerError(f"reducer format {meta.get('format_version')!r}, this version reads {FORMAT_VERSION}",
                           path=directory / REDUCER_JSON)
    try:
        with np.load(directory / REDUCER_ARRAYS, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        common = dict(descriptor=meta["descriptor"], mean=arrays["mean"], scale=arrays["scale"], low=arrays["low"],
                      high=arrays["high"], scale_percentiles=meta["scale_percentiles"], fit_info=meta.get("fit", {}))
        method = meta["method"]
        if method == "pca":
            reducer: Reducer = PCAReducer(components_matrix=arrays["components"], pca_mean=arrays["pca_mean"],
                                          explained_variance_ratio=arrays["explained_variance_ratio"], **common)
        elif method == "autoencoder":
            import keras

            model = keras.saving.load_model(directory / meta.get("model_file", AUTOENCODER_FILE), compile=False,
                                            safe_mode=True)
            reducer = AutoencoderReducer(model=model, **common)
        else:
            raise ReducerError(f"unknown reducer method {method!r}", path=directory / REDUCER_JSON)
    except ReducerError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise ReducerError(f"the reducer files are incomplete or damaged ({type(err).__name__}: {err})",
                           path=directory) from None
    if reducer.hash != meta.get("hash"):
        raise ReducerError(f"content hash {reducer.hash} does not match the recorded {meta.get('hash')} "
                           "(the files were changed or mixed from two reducers)", path=directory)
    return reducer


_REDUCER_CACHE: dict[tuple[str, str], Reducer] = {}


def cached_reducer(directory: str | Path, expected_hash: str | None = None) -> Reducer:
    """Load a reducer once per process (worker processes map many slides with the same one)."""
    key = (str(Path(directory).resolve()), expected_hash or "")
    reducer = _REDUCER_CACHE.get(key)
    if reducer is None:
        reducer = load_reducer(directory)
        if expected_hash and reducer.hash != expected_hash:
            raise ReducerError(f"the reducer changed during the run (hash {reducer.hash}, expected {expected_hash})",
                               path=directory, fix="Do not run two reduce commands on one output at a time; rerun.")
        _remember_reducer(key, reducer)
    return reducer


def _remember_reducer(key: tuple[str, str], reducer: Reducer) -> None:
    if len(_REDUCER_CACHE) >= 2:  # a process rarely needs more than one reducer: keep memory bounded
        _REDUCER_CACHE.clear()
    _REDUCER_CACHE[key] = reducer


# --- fitting --------------------------------------------------------------------------------------------------------


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
    reducer.low, reducer.high = _percentiles(reducer.project(x), reduce.scale_percentiles)
    reducer._hash = None
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
    reducer.low, reducer.high = _percentiles(reducer.project(x), reduce.scale_percentiles)
    reducer._hash = None
    return reducer


def fit_on_sample(sample: np.ndarray, reduce: ReduceConfig, descriptor: dict | None = None,
                  fit_info: dict | None = None) -> Reducer:
    """The reducer of ``reduce.method`` fitted on an in-memory (n, D) sample."""
    fit = fit_pca_on_sample if reduce.method == "pca" else fit_autoencoder_on_sample
    return fit(sample, reduce, descriptor, fit_info)


def sample_store(store: str, n_tiles: int, seed: int) -> dict:
    """Worker task: a seeded draw of up to ``n_tiles`` tissue tiles' descriptors from one store.

    The draw depends on (seed, slide id) only, so adding slides to the cohort leaves the other slides' draws alone.
    Returns {slide_id, key, descriptor, sample (n, D) float32, tissue_tiles}.
    """
    path = Path(store)
    attrs = _require_store(path)
    slide_id = slide_id_of(path)
    mask = read_array(path, "tissue_mask").astype(bool)
    cells = np.flatnonzero(mask)
    rng = np.random.default_rng([seed, _stable_int(slide_id)])
    take = np.sort(rng.choice(cells.size, size=min(n_tiles, cells.size), replace=False)) if cells.size else cells
    chosen = np.zeros(mask.size, dtype=bool)
    chosen[cells[take]] = True
    chosen = chosen.reshape(mask.shape)
    parts = [band[chosen[r0:r1]] for r0, r1, band in iter_descriptor_bands(path, chosen.any(axis=1))]
    dims = int((attrs.get("descriptor") or {}).get("dims", 0))
    sample = np.concatenate(parts, axis=0) if parts else np.zeros((0, dims), np.float32)
    sample = sample[np.isfinite(sample).all(axis=1)]
    return {"slide_id": slide_id, "key": store_key(attrs), "descriptor": descriptor_signature(attrs),
            "sample": sample.astype(np.float32), "tissue_tiles": int(cells.size)}


def fit_inputs(stores: Sequence[str | Path], config: PipelineConfig) -> dict:
    """What a fit depends on: every store's (fingerprint, describe hash) and the reduce settings."""
    stores_info = {}
    for store in stores:
        attrs = read_attrs(store) or {}
        stores_info[slide_id_of(store)] = store_key(attrs)
    return {"stores": dict(sorted(stores_info.items())), "config_hash": reduce_settings_hash(config.reduce)}


def tiles_per_slide(config: PipelineConfig, n_slides: int, dims: int) -> int:
    """Per-slide sample size: ``sample_tiles_per_slide``, lowered so the whole sample fits ``max_sample_mb``."""
    budget = int(config.reduce.max_sample_mb * 2**20 / (4 * max(1, dims) * max(1, n_slides)))
    return max(MIN_SAMPLE_PER_SLIDE, min(config.reduce.sample_tiles_per_slide, budget))


def collect_sample(stores: Sequence[str | Path], config: PipelineConfig, runner=None
                   ) -> tuple[np.ndarray, dict, dict]:
    """The cohort fit sample: (n, D) float32, the descriptor signature used, and fit information.

    Slides whose descriptors differ from the majority's (other descriptor settings) are left out of the fit and
    listed in ``info["excluded"]``; they fail later when mapped, with a ``ReducerMismatchError``.
    """
    stores = [Path(s) for s in stores]
    if not stores:
        raise ReducerError("no slide stores to fit a reducer on", fix="Run `wsi-pipeline describe` first.")
    signatures = {s: descriptor_signature(read_attrs(s)) for s in stores}
    dims = max((sig["dims"] for sig in signatures.values() if sig), default=1)
    n_tiles = tiles_per_slide(config, len(stores), dims)
    runner = runner or LocalRunner()
    tasks = iter([Task(sample_store, (str(store), n_tiles, config.reduce.seed), slide_id_of(store))
                  for store in stores])
    results: dict[str, dict] = {}
    excluded: dict[str, str] = {}
    for done in run_bounded(runner, lambda: next(tasks, None), len(stores)):
        if done.error is not None:
            excluded[done.tag] = error_record(done.error)["message"]
            log.warning("reduce: slide %s left out of the fit: %s", done.tag, excluded[done.tag])
        else:
            results[done.tag] = done.result
    votes = Counter(json.dumps(r["descriptor"], sort_keys=True) for r in results.values() if r["descriptor"])
    if not votes:
        raise ReducerError("no slide store could be sampled for the fit", path=slides_dir(stores[0].parent.parent),
                           fix="Check the stores (wsi-pipeline describe) and the log for each slide's error.")
    chosen = votes.most_common(1)[0][0]
    parts, sample_tiles = [], {}
    for slide_id in sorted(results):
        r = results[slide_id]
        if json.dumps(r["descriptor"], sort_keys=True) != chosen:
            excluded[slide_id] = "descriptor settings differ from the rest of the cohort"
            continue
        parts.append(r["sample"])
        sample_tiles[slide_id] = int(len(r["sample"]))
    sample = np.concatenate(parts, axis=0) if parts else np.zeros((0, dims), np.float32)
    info = {"tiles_per_slide": n_tiles, "sample_tiles": sample_tiles, "sample_rows": int(len(sample)),
            "excluded": dict(sorted(excluded.items())), "seed": config.reduce.seed}
    return sample, json.loads(chosen), info


def fit_reducer(stores: Sequence[str | Path], config: PipelineConfig | None = None, runner=None) -> Reducer:
    """Fit the reducer of ``config.reduce`` on a bounded, seeded sample of tissue tiles from every store."""
    config = config or PipelineConfig()
    t0 = time.monotonic()
    sample, descriptor, info = collect_sample(stores, config, runner)
    info = {**fit_inputs(stores, config), **info}
    reducer = fit_on_sample(sample, config.reduce, descriptor, info)
    reducer.fit_info["seconds"] = round(time.monotonic() - t0, 3)
    reducer.fit_info["reduce_config"] = config.reduce.model_dump(mode="json")
    log.info("reduce: fitted %s (%d components) on %d tiles from %d slides in %.1f s", reducer.method,
             reducer.components, len(sample), len(info["sample_tiles"]), time.monotonic() - t0)
    return reducer


# --- mapping --------------------------------------------------------------------------------------------------------


def compute_feature_map(store: str | Path, reducer: Reducer) -> np.ndarray:
    """(rows, cols, K) float32: tissue cells through the reducer, everything else ``FEATURE_MAP_FILL``.

    Descriptors are read band by band (whole Zarr chunk rows). A tissue cell with non-finite descriptors (which
    the describe stage does not produce) is treated as background.
    """
    mask = read_array(store, "tissue_mask").astype(bool)
    out = np.full(mask.shape + (reducer.components,), FEATURE_MAP_FILL, dtype=np.float32)
    for r0, r1, band in iter_descriptor_bands(store, mask.any(axis=1)):
        if band.shape[:2] != mask[r0:r1].shape:
            raise ReducerMismatchError(f"descriptors {band.shape[:2]} and tissue mask {mask[r0:r1].shape} differ",
                                       path=store, fix="Describe the slide again (the store is inconsistent).")
        m = mask[r0:r1]
        values = band[m]
        ok = np.isfinite(values).all(axis=1)
        cells = np.full((len(values), reducer.components), FEATURE_MAP_FILL, dtype=np.float32)
        if ok.any():
            cells[ok] = reducer.transform(values[ok])
        out[r0:r1][m] = cells
    return out


def feature_map_attrs(reducer: Reducer, store_attrs: dict) -> dict:
    return {"method": reducer.method, "components": reducer.components, "reducer_hash": reducer.hash,
            "fill_value": FEATURE_MAP_FILL, "config_hash": reducer.config_hash, "value_range": list(VALUE_RANGE),
            "store_fingerprint": store_attrs.get("fingerprint"), "store_config_hash": store_attrs.get("config_hash")}


def map_is_current(store: str | Path, reducer_hash: str) -> bool:
    """True when the store's feature map was made by this reducer from the store's current descriptors."""
    attrs = array_attrs(store, FEATURE_MAP)
    store_attrs = read_attrs(store) or {}
    return bool(attrs and attrs.get("reducer_hash") == reducer_hash
                and attrs.get("store_fingerprint") == store_attrs.get("fingerprint")
                and attrs.get("store_config_hash") == store_attrs.get("config_hash"))


def map_slide(store_path: str | Path, reducer: Reducer | str | Path) -> np.ndarray:
    """Map one slide store with a reducer (object or saved directory); writes ``feature_map`` atomically.

    Returns the (rows, cols, K) float32 map. Raises ``MissingInputError`` for an incomplete store and
    ``ReducerMismatchError`` when its descriptors are not the ones the reducer was fitted on.
    """
    if not isinstance(reducer, Reducer):
        reducer = load_reducer(reducer)
    store = Path(store_path)
    attrs = _require_store(store)
    reducer.check_descriptor(attrs.get("descriptor"), path=store)
    fmap = compute_feature_map(store, reducer)
    rows, cols, k = fmap.shape
    write_array(store, FEATURE_MAP, fmap, chunks=(max(1, min(rows, 512)), max(1, min(cols, 512)), k),
                attrs=feature_map_attrs(reducer, attrs), fill_value=FEATURE_MAP_FILL)
    return fmap


def map_picture_path(out_dir: str | Path, slide_id: str) -> Path:
    return Path(out_dir) / MAPS_DIR / f"{slide_id}.png"


def map_store_task(store: str, reducer_dir: str, reducer_hash: str, picture: str | None) -> dict:
    """Worker task: map one slide with the saved reducer and write its picture."""
    from .core.pictures import save_feature_map_png

    t0 = time.monotonic()
    reducer = cached_reducer(reducer_dir, reducer_hash)
    fmap = map_slide(store, reducer)
    if picture:
        save_feature_map_png(picture, fmap, FEATURE_MAP_FILL)
    tissue = int((fmap[..., 0] != FEATURE_MAP_FILL).sum())
    return {"tissue_cells": tissue, "shape": list(fmap.shape), "seconds": round(time.monotonic() - t0, 3)}


# --- the runner -----------------------------------------------------------------------------------------------------


def _saved_reducer(directory: Path) -> Reducer | None:
    if not (directory / REDUCER_JSON).is_file():
        return None
    try:
        return load_reducer(directory)
    except ReducerError as err:
        log.warning("reduce: the saved reducer cannot be used and is fitted again: %s", err)
        return None


def reduce_slides(out_dir: str | Path, config: PipelineConfig | None = None, reducer_path: str | Path | None = None,
                  runner=None, progress: bool | None = None, errors: dict | None = None) -> dict:
    """Fit (or reuse / load) the reducer and map every described slide in ``out_dir``.

    ``reducer_path``: map with this saved reducer instead of fitting (copied to ``OUT/reducer/``); its method and
    component count win over ``config.reduce``. ``runner``: a TaskRunner (default: the cluster of
    ``config.cluster``). ``errors``: if given, filled with slide id -> the exception that failed it.
    Returns a summary dict; per-slide outcomes are in the manifest under ``stages.reduce``.
    """
    config = config or PipelineConfig()
    out_dir = Path(out_dir)
    with output_lock(out_dir, command="reduce"), runner_for(runner, config.cluster) as active:
        return _reduce(out_dir, config, reducer_path, active, progress, errors)


def _obtain_reducer(out_dir: Path, stores: list[Path], config: PipelineConfig, reducer_path, runner
                    ) -> tuple[Reducer, str]:
    target = out_dir / REDUCER_DIR
    if reducer_path is not None:
        reducer = load_reducer(reducer_path)
        source = resolve_reducer_dir(reducer_path).resolve()
        if source != target.resolve():
            saved = _saved_reducer(target)
            if saved is None or saved.hash != reducer.hash:
                reducer.save(target)
        return reducer, "loaded"
    inputs = fit_inputs(stores, config)
    saved = _saved_reducer(target)
    if saved is not None and saved.fit_inputs_match(inputs):
        return saved, "reused"
    reducer = fit_reducer(stores, config, runner)
    reducer.save(target)
    return reducer, "fitted"


def _reduce(out_dir: Path, config: PipelineConfig, reducer_path, runner, progress: bool | None,
            errors: dict | None) -> dict:
    from .core.pictures import save_explained_variance_png

    errors = {} if errors is None else errors
    t_start = time.monotonic()
    stores = list_stores(out_dir)
    if not stores:
        raise ReducerError("no described slides (complete stores) in this output directory",
                           path=slides_dir(out_dir), fix="Run `wsi-pipeline describe --slides ... --out OUT` first.")
    if runner.dashboard_link:
        log.info("Dask dashboard: %s", runner.dashboard_link)
    reducer, source = _obtain_reducer(out_dir, stores, config, reducer_path, runner)
    reducer_dir = out_dir / REDUCER_DIR
    _remember_reducer((str(reducer_dir.resolve()), reducer.hash), reducer)  # in-process tasks reuse this object
    log.info("reduce: %s reducer %s (%s, %d components)", source, reducer.hash, reducer.method, reducer.components)
    ev_png = out_dir / MAPS_DIR / EXPLAINED_VARIANCE_PNG
    if isinstance(reducer, PCAReducer) and (source != "reused" or not ev_png.exists()):
        save_explained_variance_png(ev_png, reducer.explained_variance_ratio, reducer.components,
                                    title=f"PCA explained variance ({reducer.descriptor['name']} descriptors, "
                                          f"{reducer.fit_info.get('sample_rows', '?')} tiles)")
    elif not isinstance(reducer, PCAReducer):
        ev_png.unlink(missing_ok=True)  # from an earlier PCA run: it would describe another reducer

    manifest = Manifest(out_dir)
    todo, skipped = [], 0
    for store in stores:
        slide_id = slide_id_of(store)
        if map_is_current(store, reducer.hash) and map_picture_path(out_dir, slide_id).exists():
            skipped += 1
            continue
        todo.append((slide_id, store))

    bar = Progress(total_slides=len(stores), done_slides=skipped, enabled=progress)
    tasks = iter([Task(map_store_task, (str(store), str(reducer_dir), reducer.hash,
                                        str(map_picture_path(out_dir, slide_id))), slide_id)
                  for slide_id, store in todo])
    done_count = failed_count = 0
    for done in run_bounded(runner, lambda: next(tasks, None), in_flight_limit(runner, config.cluster)):
        slide_id = done.tag
        if done.error is not None:
            errors[slide_id] = done.error
            record = error_record(done.error)
            manifest.update_stage(slide_id, "reduce", status="failed", error=record, reducer_hash=reducer.hash)
            failed_count += 1
            bar.slide_done(failed=True)
            level = logging.WARNING if isinstance(done.error, SlideError) else logging.ERROR
            log.log(level, "reduce: slide %s failed: %s", slide_id, record["message"])
            continue
        result = done.result
        manifest.update_stage(slide_id, "reduce", status="done", error=None, method=reducer.method,
                              components=reducer.components, reducer_hash=reducer.hash,
                              tissue_cells=result["tissue_cells"], map_shape=result["shape"],
                              picture=str(map_picture_path(out_dir, slide_id)), seconds=result["seconds"])
        done_count += 1
        bar.add_tiles(result["tissue_cells"])
        bar.tiles_done(result["tissue_cells"])
        bar.slide_done()
    bar.close()
    summary = {"slides": len(stores), "done": done_count, "skipped": skipped, "failed": failed_count,
               "method": reducer.method, "components": reducer.components, "reducer": source,
               "reducer_hash": reducer.hash, "seconds": round(time.monotonic() - t_start, 2)}
    manifest.record_run("reduce", summary)
    return summary
