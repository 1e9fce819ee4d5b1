"""Reducers: descriptors (n, D) -> K (1..3) map values in [0, 1], fitted once on the cohort and applied to every slide.

* descriptors are standardised (mean 0, variance 1 on the fit sample; a constant feature keeps scale 1);
* ``PCAReducer``: principal components of the standardised descriptors, each component's sign fixed so that its
  largest loading is positive (refits give the same picture colours);
* ``AutoencoderReducer``: a dense Keras autoencoder with a K-unit linear bottleneck; the bottleneck is the map;
* both: the cohort percentiles ``reduce.scale_percentiles`` of each component over the fit sample are mapped to 0 and
  1 and values are clipped, so tissue cells are in [0, 1] on every slide.

Saved in ``OUT/reducer/``: ``reducer.json`` (method, descriptor names, fit inputs, content hash) and ``reducer.npz``
(plain arrays, loaded with ``allow_pickle=False``); the autoencoder adds ``autoencoder.keras`` (loaded with
``safe_mode=True``). ``load_reducer`` checks the content hash.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..core.artefacts import REDUCER_DIR
from ..core.errors import ReducerError, ReducerMismatchError
from ..core.maps import FEATURE_MAP_FILL
from ..core.outputs import replace_directory
from ..core.store import package_versions

REDUCER_JSON = "reducer.json"
REDUCER_ARRAYS = "reducer.npz"
AUTOENCODER_FILE = "autoencoder.keras"
FORMAT_VERSION = 1
SPECTRUM_COMPONENTS = 50  # PCA components whose explained variance is kept for the plot

TRANSFORM_BATCH_ROWS = 65536  # descriptors transformed at once (bounds memory on wide CNN descriptors)


def descriptor_signature(attrs: dict | None) -> dict | None:
    """{name, dims, feature_names} of a store's descriptors, as the describe stage recorded them."""
    desc = (attrs or {}).get("descriptor")
    if not desc:
        return None
    return {"name": desc.get("name"), "dims": int(desc.get("dims", 0)), "feature_names": list(desc.get("feature_names", []))}


def _hash_arrays(digest, arrays: Sequence[np.ndarray]) -> None:
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(a.tobytes())


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

    def set_range(self, low: np.ndarray, high: np.ndarray) -> None:
        """The raw component values mapped to 0 and 1 (the fit sample's percentiles); the content hash follows."""
        self.low = np.asarray(low, dtype=np.float64)
        self.high = np.asarray(high, dtype=np.float64)
        self._hash = None

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
        remember_reducer(key, reducer)
    return reducer


def remember_reducer(key: tuple[str, str], reducer: Reducer) -> None:
    if len(_REDUCER_CACHE) >= 2:  # a process rarely needs more than one reducer: keep memory bounded
        _REDUCER_CACHE.clear()
    _REDUCER_CACHE[key] = reducer
