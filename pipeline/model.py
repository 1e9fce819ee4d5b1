"""InceptionV3 on feature maps: input adapter, map sizes, augmentation, model building, phases, save/load.

Maps arrive as the reduce stage writes them (``feature_map`` (rows, cols, K) float32, tissue cells in [0, 1],
background cells -1.0). Everything up to the batch is plain numpy, so the training input is a
``keras.utils.PyDataset`` that runs the same on TensorFlow and JAX; the model uses only public Keras 3 API. The one
backend-specific question (is there a GPU?) is answered in small named functions below.

**Input adapter** (``train.adapter``):

* ``replicate``: one component (``train.component``) copied into three identical channels;
* ``components``: three distinct components as the three channels (needs ``reduce.components: 3``).

**Scaling.** InceptionV3 expects inputs in [-1, 1]. Tissue values [0, 1] map linearly onto
[``TISSUE_INPUT_LOW``, 1] = [-0.8, 1] and background cells to -1, so the lowest tissue value stays distinguishable
from "no tissue" (a plain 2x-1 would make them equal).

**Map sizes** (``train.size_strategy``); one map cell stays one block of pixels, nearest-neighbour throughout so
tissue values are never blended with the background:

* ``resize`` (default, ``input_px`` 299): every map stretched to input_px x input_px. Fits cohorts whose maps have
  similar aspect ratios; the network always sees the whole slide; the ImageNet-sized input suits pretrained weights.
* ``pad``: the map is enlarged by the largest whole factor that fits (or shrunk to fit) keeping its aspect ratio,
  then centred on a background canvas. Fits cohorts with varied aspect ratios (needle biopsies next to resections).
* ``crop``: an input_px window at one pixel per cell (random in training, central otherwise), padded when the map
  is smaller. Fits large maps (fine tile grids) where the signal is spread over the tissue, texture-like.
* ``native``: no resizing, variable-size input (``input_shape=(None, None, 3)``); maps smaller than
  ``native_min_px`` (75, InceptionV3's minimum) are padded, larger than ``native_max_px`` shrunk; batches hold maps
  of one size bucket (padded up to a multiple of ``native_bucket_px``). Fits when the physical scale must be kept
  (one cell = one tile at the same µm/px for every slide). Each bucket size compiles its own graph (TensorFlow
  retraces, JAX recompiles), so keep buckets coarse.

**Augmentation** (training only, ``train.augment``): the eight flips/rotations (the dihedral group), a random crop
keeping at least ``crop_fraction`` of each side, and Gaussian noise of ``noise_std`` on tissue cells (background stays
exactly background). ``train.tta`` averages predictions over the eight flips/rotations.

**Model**: ``keras.applications.InceptionV3(include_top=False)`` built flat on the input (its layers, ``mixed0`` ...
``mixed10``, are layers of the model itself, which Grad-CAM needs), then the head on block ``train.head_block``
(``mixed10`` by default; an earlier block truncates the network): ``head_pool`` (global average pooling),
``head_norm`` (standardisation with training-set statistics), ``head_dropout``, ``head_dense`` (softmax over K classes,
float32 also under mixed precision). Phase ``head``: the whole base frozen. Phase ``finetune``: layers from the block
``train.unfreeze_from`` (e.g. ``mixed9``) to the head block trainable. BatchNormalization layers stay frozen in both
phases: in Keras a BatchNormalization layer with ``trainable = False`` runs in inference mode (moving statistics),
which keeps small map batches from wrecking them.

**Random weights** (``train.weights: null``): the features of a random base's deep blocks keep little of a small map
(calibrated random ``mixed10`` features at a 96-px input, a linear probe on a 24-slide synthetic cohort: ROC AUC
0.52; ``mixed0``-``mixed2``: 0.99). For such runs ``head_block: mixed2`` with ``calibrate_batchnorm: true`` (each
BatchNorm set to the statistics of its input on the training maps, see ``calibrate_batchnorm``) trained to ROC AUC
1.0 on 40 synthetic slides where the default reached 0.88.
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .core.config import TrainConfig
from .core.errors import ModelError
from .core.outputs import atomic_output_path
from .core.maps import BLOCK_NAMES, FEATURE_MAP_FILL, select_channels

log = logging.getLogger("pipeline")

TISSUE_INPUT_LOW = -0.8  # network input of the lowest tissue value; background is INPUT_BACKGROUND
INPUT_BACKGROUND = -1.0
MIN_INPUT_PX = 75  # InceptionV3 rejects smaller inputs
HEAD_PREFIX = "head_"
IMAGENET_NOTOP_FILE = "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_NOTOP_MD5 = "bcbd6486424b2319ff4ef7d526e38f63"


# --- channels and scaling ------------------------------------------------------------------------------------------


def to_input(x: np.ndarray) -> np.ndarray:
    """Map values -> InceptionV3's range: tissue [0, 1] -> [-0.8, 1], background -> -1."""
    x = np.asarray(x, dtype=np.float32)
    tissue = x >= 0
    scaled = TISSUE_INPUT_LOW + (1.0 - TISSUE_INPUT_LOW) * np.clip(x, 0.0, 1.0)
    return np.where(tissue, scaled, INPUT_BACKGROUND).astype(np.float32)


# --- geometry ------------------------------------------------------------------------------------------------------


def resize_nearest(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Nearest-neighbour resize of (h, w, ...) (cells become blocks; no blending with the background)."""
    h, w = x.shape[:2]
    rows = np.minimum((np.arange(out_h) + 0.5) * h / out_h, h - 1).astype(np.int64)
    cols = np.minimum((np.arange(out_w) + 0.5) * w / out_w, w - 1).astype(np.int64)
    return x[rows][:, cols]


def pad_to(x: np.ndarray, out_h: int, out_w: int, fill: float = FEATURE_MAP_FILL) -> np.ndarray:
    """Centre x on a (out_h, out_w) background canvas (out_h >= h, out_w >= w)."""
    h, w = x.shape[:2]
    out = np.full((out_h, out_w) + x.shape[2:], fill, dtype=x.dtype)
    r0, c0 = (out_h - h) // 2, (out_w - w) // 2
    out[r0:r0 + h, c0:c0 + w] = x
    return out


def crop_window(x: np.ndarray, out_h: int, out_w: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """An (out_h, out_w) window: random with ``rng``, central without; padded first where x is smaller."""
    x = pad_to(x, max(out_h, x.shape[0]), max(out_w, x.shape[1]))
    h, w = x.shape[:2]
    if rng is None:
        r0, c0 = (h - out_h) // 2, (w - out_w) // 2
    else:
        r0, c0 = int(rng.integers(0, h - out_h + 1)), int(rng.integers(0, w - out_w + 1))
    return x[r0:r0 + out_h, c0:c0 + out_w]


def fit_within(x: np.ndarray, size_px: int) -> np.ndarray:
    """Keep the aspect ratio: enlarge by the largest whole factor that fits, or shrink so the long side fits."""
    h, w = x.shape[:2]
    long_side = max(h, w)
    if long_side <= size_px:
        f = size_px // long_side
        return np.repeat(np.repeat(x, f, axis=0), f, axis=1) if f > 1 else x
    scale = size_px / long_side
    return resize_nearest(x, max(1, min(size_px, round(h * scale))), max(1, min(size_px, round(w * scale))))


def native_shape(h: int, w: int, cfg: TrainConfig) -> tuple[int, int]:
    """Size (before bucketing) of a map under the native strategy."""
    if max(h, w) > cfg.native_max_px:
        f = int(np.ceil(max(h, w) / cfg.native_max_px))
        h, w = int(np.ceil(h / f)), int(np.ceil(w / f))
    return max(h, cfg.native_min_px), max(w, cfg.native_min_px)


def bucket_shape(h: int, w: int, cfg: TrainConfig) -> tuple[int, int]:
    """The padded size a native map is batched at: rounded up to a multiple of native_bucket_px."""
    h, w = native_shape(h, w, cfg)
    b = cfg.native_bucket_px
    return int(np.ceil(h / b) * b), int(np.ceil(w / b) * b)


def fit_size(x: np.ndarray, cfg: TrainConfig, rng: np.random.Generator | None = None) -> np.ndarray:
    """Apply the size strategy to one (h, w, 3) map (random crop position only for ``crop`` with an rng)."""
    strategy, size = cfg.size_strategy, cfg.input_px
    if strategy == "resize":
        return resize_nearest(x, size, size)
    if strategy == "pad":
        return pad_to(fit_within(x, size), size, size)
    if strategy == "crop":
        return crop_window(x, size, size, rng)
    if strategy == "native":
        h, w = x.shape[:2]
        if max(h, w) > cfg.native_max_px:
            f = int(np.ceil(max(h, w) / cfg.native_max_px))
            x = resize_nearest(x, int(np.ceil(h / f)), int(np.ceil(w / f)))
        return pad_to(x, *native_shape(*x.shape[:2], cfg)) if min(x.shape[:2]) < cfg.native_min_px else x
    raise ModelError(f"unknown train.size_strategy {strategy!r}")


def input_shape_for(cfg: TrainConfig) -> tuple:
    return (None, None, 3) if cfg.size_strategy == "native" else (cfg.input_px, cfg.input_px, 3)


# --- augmentation --------------------------------------------------------------------------------------------------


def dihedral(x: np.ndarray, k: int, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    """The k-th of the eight flips/rotations (k = 0 is the identity): rotate by 90*(k % 4), then flip if k >= 4."""
    out = np.rot90(x, k % 4, axes=axes)
    if k >= 4:
        out = np.flip(out, axis=axes[1])
    return np.ascontiguousarray(out)


def undo_dihedral(x: np.ndarray, k: int, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    """The inverse of ``dihedral(., k)``: ``undo_dihedral(dihedral(x, k), k) == x``."""
    if k >= 4:
        x = np.flip(x, axis=axes[1])
    return np.ascontiguousarray(np.rot90(x, -(k % 4), axes=axes))


def random_crop_fraction(x: np.ndarray, rng: np.random.Generator, min_fraction: float) -> np.ndarray:
    """A random window keeping a random fraction in [min_fraction, 1] of each side."""
    if min_fraction >= 1:
        return x
    h, w = x.shape[:2]
    ch = max(1, int(round(h * rng.uniform(min_fraction, 1.0))))
    cw = max(1, int(round(w * rng.uniform(min_fraction, 1.0))))
    r0, c0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return x[r0:r0 + ch, c0:c0 + cw]


def add_noise(x: np.ndarray, rng: np.random.Generator, std: float) -> np.ndarray:
    """Gaussian noise on tissue cells, clipped to [0, 1]; background cells are left exactly as they are."""
    if std <= 0:
        return x
    tissue = x >= 0
    noisy = np.clip(x + rng.normal(0.0, std, size=x.shape).astype(np.float32), 0.0, 1.0)
    return np.where(tissue, noisy, x).astype(np.float32)


def prepare(x: np.ndarray, cfg: TrainConfig, rng: np.random.Generator | None = None,
            augment: bool = False, flip: bool = True) -> np.ndarray:
    """One (h, w, 3) channel-selected map -> network input, augmented when ``augment`` (needs ``rng``).

    ``flip=False`` leaves the flips/rotations to the caller (native batches flip a whole batch at once).
    """
    if augment:
        if cfg.size_strategy != "crop":  # crop already draws a random window
            x = random_crop_fraction(x, rng, cfg.crop_fraction)
        if flip:
            x = dihedral(x, int(rng.integers(0, 8)))
        x = add_noise(x, rng, cfg.noise_std)
    return to_input(fit_size(x, cfg, rng if augment else None))


# --- batches -------------------------------------------------------------------------------------------------------


def _py_dataset_base():
    import keras

    return keras.utils.PyDataset


class MapBatches(_py_dataset_base()):
    """Batches of maps for ``model.fit`` / prediction: ``(x, y, sample_weight)``, or ``x`` alone without labels.

    Fixed-size strategies batch in (shuffled) order with per-map augmentation. ``native`` groups maps by their
    size bucket so each batch has one shape; the flip/rotation is drawn per batch (a rotation swaps height and
    width for the whole batch). Augmentation randomness comes from (seed, epoch, batch), so it is reproducible and
    safe with worker threads.
    """

    def __init__(self, maps: Sequence[np.ndarray], cfg: TrainConfig, y: np.ndarray | None = None,
                 sample_weight: np.ndarray | None = None, *, batch_size: int | None = None, augment: bool = False,
                 shuffle: bool = False, seed: int = 0, dihedral_k: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.maps = [select_channels(m, cfg.adapter, cfg.component) for m in maps]
        self.cfg = cfg
        self.y = None if y is None else np.asarray(y, dtype=np.int32)
        self.sample_weight = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float32)
        self.batch_size = batch_size or cfg.batch_size
        self.augment, self.shuffle, self.seed = augment, shuffle, seed
        self.dihedral_k = dihedral_k  # fixed transform for test-time averaging (0 = identity)
        self.epoch = 0
        self.batches = self._plan(0)

    def _plan(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch, 7])
        n = len(self.maps)
        if self.cfg.size_strategy != "native":
            order = rng.permutation(n) if self.shuffle else np.arange(n)
            return [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, m in enumerate(self.maps):
            groups.setdefault(bucket_shape(*m.shape[:2], self.cfg), []).append(i)
        batches, shapes = [], []
        for shape in sorted(groups):
            members = np.asarray(groups[shape])
            if self.shuffle:
                members = rng.permutation(members)
            for i in range(0, len(members), self.batch_size):
                batches.append(members[i:i + self.batch_size])
                shapes.append(shape)
        if self.shuffle:
            order = rng.permutation(len(batches))
            batches, shapes = [batches[i] for i in order], [shapes[i] for i in order]
        # Keras (TensorFlow backend) infers the input signature from the first two batches: when sizes differ,
        # put two different sizes first so height and width come out as None instead of one fixed size.
        if len(set(shapes)) > 1 and shapes[0] == shapes[1]:
            j = next(i for i, s in enumerate(shapes) if s != shapes[0])
            batches[1], batches[j] = batches[j], batches[1]
        return batches

    @property
    def num_batches(self) -> int:
        return len(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def batch_x(self, i: int) -> np.ndarray:
        idx = self.batches[i]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        if self.cfg.size_strategy != "native":
            xs = [prepare(self.maps[j], self.cfg, rng, self.augment) for j in idx]
            x = np.stack(xs)
        else:
            shape = bucket_shape(*self.maps[idx[0]].shape[:2], self.cfg)
            xs = [prepare(self.maps[j], self.cfg, rng, self.augment, flip=False) for j in idx]
            # a random crop makes a map smaller than its bucket; pad every map to the bucket size
            x = np.stack([pad_to(v, *shape, fill=INPUT_BACKGROUND) for v in xs])
            if self.augment:
                x = dihedral(x, int(rng.integers(0, 8)), axes=(1, 2))
        if self.dihedral_k:
            x = dihedral(x, self.dihedral_k, axes=(1, 2))
        return x

    def __getitem__(self, i: int):
        x = self.batch_x(i)
        if self.y is None:
            return x
        idx = self.batches[i]
        if self.sample_weight is None:
            return x, self.y[idx]
        return x, self.y[idx], self.sample_weight[idx]

    def on_epoch_end(self) -> None:
        self.epoch += 1
        if self.shuffle:
            self.batches = self._plan(self.epoch)


# --- backend-specific helpers (the only places that know the backend) -------------------------------------------------


def _tf_gpu_count() -> int:
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


def _jax_gpu_count() -> int:
    import jax

    return sum(1 for d in jax.devices() if d.platform in ("gpu", "cuda", "rocm"))


def _torch_gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_count() -> int:
    """GPUs visible to the current Keras backend."""
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            return _tf_gpu_count()
        if backend == "jax":
            return _jax_gpu_count()
        if backend == "torch":
            return _torch_gpu_count()
    except Exception as err:  # noqa: BLE001 - a broken GPU setup means "train on CPU", with a note
        log.warning("could not list GPUs for backend %s: %s", backend, err)
    return 0


def use_mixed_precision(mode: str) -> bool:
    """``auto``: mixed float16 on GPU only (on CPU it is slower and no more accurate)."""
    if mode == "on":
        return True
    if mode == "off":
        return False
    return gpu_count() > 0


@contextlib.contextmanager
def dtype_policy(name: str | None) -> Iterator[None]:
    """Build layers under a dtype policy (e.g. ``mixed_float16``) without leaving it set globally."""
    import keras

    if not name:
        yield
        return
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


# --- the model -----------------------------------------------------------------------------------------------------


def keras_cache_dir() -> Path:
    import os

    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def resolve_weights(weights: str | None) -> str | None:
    """``None``, ``"imagenet"`` or an existing local file; anything else is a ``ModelError`` before any work."""
    if weights in (None, "", "none", "None", "null"):
        return None
    if weights == "imagenet":
        return "imagenet"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ModelError("weights file not found", path=path,
                         fix="Set train.weights to an existing InceptionV3 no-top weights file (.h5 / .weights.h5), "
                             "'imagenet', or null for random initialisation.")
    return str(path)


def build_model(num_classes: int, cfg: TrainConfig, mixed_precision: bool | None = None):
    """InceptionV3 (no top) + head, flat, with the base frozen (phase ``head``)."""
    import keras

    if num_classes < 2:
        raise ModelError(f"a classifier needs at least 2 classes, got {num_classes}")
    weights = resolve_weights(cfg.weights)
    if mixed_precision is None:
        mixed_precision = use_mixed_precision(cfg.mixed_precision)
    with dtype_policy("mixed_float16" if mixed_precision else None):
        inputs = keras.Input(shape=input_shape_for(cfg), name="feature_map", dtype="float32")
        try:
            base = keras.applications.InceptionV3(include_top=False, weights=weights, input_tensor=inputs)
        except Exception as err:  # noqa: BLE001 - Keras raises a bare Exception when the download fails
            raise _weights_error(weights, err) from None
        # The head pools ``head_block`` (mixed10 = all of InceptionV3); blocks after it drop out of the model.
        pool = keras.layers.GlobalMaxPooling2D if cfg.pooling == "max" else keras.layers.GlobalAveragePooling2D
        x = pool(name=f"{HEAD_PREFIX}pool")(base.get_layer(cfg.head_block).output)
        # Standardise the pooled features with statistics of the training maps (``adapt_head_norm``): channels differ
        # in scale by orders of magnitude, and a head on raw features needs more steps than a small cohort gives.
        x = keras.layers.Normalization(axis=-1, name=f"{HEAD_PREFIX}norm", dtype="float32")(x)
        x = keras.layers.Dropout(cfg.dropout, name=f"{HEAD_PREFIX}dropout", seed=cfg.seed)(x)
        outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name=f"{HEAD_PREFIX}dense")(x)
        model = keras.Model(inputs, outputs, name="inception_v3_maps")
    set_phase(model, "head", cfg.unfreeze_from)
    return model


def adapt_head_norm(model, batches) -> None:
    """Set ``head_norm``'s mean and variance from the pooled base features of ``batches`` (no augmentation)."""
    import keras

    pooled = keras.Model(model.inputs[0], model.get_layer(f"{HEAD_PREFIX}pool").output)
    features = [np.asarray(keras.ops.convert_to_numpy(pooled(batches.batch_x(i), training=False)), dtype=np.float32)
                for i in range(len(batches))]
    model.get_layer(f"{HEAD_PREFIX}norm").adapt(np.concatenate(features))


CALIBRATION_MAPS = 64  # training maps in the one BatchNorm calibration batch (bounds its memory at 299 px)


def calibrate_batchnorm(model, batches, max_maps: int = CALIBRATION_MAPS) -> int:
    """Data-dependent start for a random-init base: every BatchNormalization layer's moving mean and variance set to
    the statistics of its own input over the training maps of ``batches`` (like LSUV initialisation).

    Keras initialises the moving statistics to mean 0, variance 1, which normalises nothing: through 94 conv +
    BatchNorm layers a random InceptionV3's activations shrink to ~1e-4 and its pooled features differ between slides
    by ~1e-5, so the head learns from numerical noise and a BatchNorm that starts training on batch statistics jumps
    by orders of magnitude. All maps (up to ``max_maps``) go through the base as one batch in training mode with
    momentum 0: each layer is normalised by, and stores, the statistics of its input given the already calibrated
    layers before it, so inference mode afterwards reproduces that pass exactly. Native maps are padded to one
    size with background. Returns the number of layers calibrated.
    """
    import keras

    inputs: list[np.ndarray] = []
    for i in range(len(batches)):
        if len(inputs) >= max_maps:
            break
        inputs.extend(batches.batch_x(i)[:max_maps - len(inputs)])
    h, w = max(m.shape[0] for m in inputs), max(m.shape[1] for m in inputs)
    x = np.stack([pad_to(m, h, w, fill=INPUT_BACKGROUND) for m in inputs])
    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    saved = [(layer.trainable, layer.momentum) for layer in layers]
    base = keras.Model(model.inputs[0], model.get_layer(f"{HEAD_PREFIX}pool").input)
    try:
        for layer in layers:
            layer.trainable, layer.momentum = True, 0.0  # a frozen BatchNormalization ignores training=True
        base(x, training=True)
    finally:
        for layer, (trainable, momentum) in zip(layers, saved):
            layer.trainable, layer.momentum = trainable, momentum
    return len(layers)


@contextlib.contextmanager
def batchnorm_momentum(model, momentum: float) -> Iterator[None]:
    """Every BatchNormalization layer's moving-statistics momentum set to ``momentum`` inside the block."""
    import keras

    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    saved = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = momentum
    try:
        yield
    finally:
        for layer, value in zip(layers, saved):
            layer.momentum = value


def _weights_error(weights: str | None, err: Exception) -> ModelError:
    if weights == "imagenet":
        return ModelError(
            f"could not get the ImageNet weights ({type(err).__name__}: {err})",
            fix=(f"Connect to the internet once, or place {IMAGENET_NOTOP_FILE} (md5 {IMAGENET_NOTOP_MD5}) in "
                 f"{keras_cache_dir()}, or set train.weights to a local weights file or null."))
    return ModelError(f"could not load the weights ({type(err).__name__}: {err})", path=weights,
                      fix="Use InceptionV3 weights without the top (include_top=False), e.g. "
                          f"{IMAGENET_NOTOP_FILE}, or set train.weights to null.")


def finetune_start(model, unfreeze_from: str) -> int:
    """Index in ``model.layers`` of the first layer of block ``unfreeze_from`` (``mixed0`` ... ``mixed10``).

    ``model.layers`` is in topological order and every path through InceptionV3 passes each ``mixedN`` concat, so
    block N is exactly the layers after ``mixed{N-1}``'s concat; block 0 starts after the stem's last max-pooling.
    """
    import keras

    match = re.fullmatch(r"mixed(\d+)", unfreeze_from or "")
    if not match or unfreeze_from not in BLOCK_NAMES:
        raise ModelError(f"train.unfreeze_from {unfreeze_from!r} is not an InceptionV3 block",
                         fix=f"Use one of {', '.join(BLOCK_NAMES)} (mixed9 unfreezes the top two blocks).")
    names = [layer.name for layer in model.layers]
    n = int(match.group(1))
    if n > 0:
        return names.index(f"mixed{n - 1}") + 1
    end_of_stem = max(i for i, layer in enumerate(model.layers[:names.index("mixed0")])
                      if isinstance(layer, keras.layers.MaxPooling2D))
    return end_of_stem + 1


def batchnorm_trains(cfg: TrainConfig) -> bool:
    """Whether unfrozen BatchNorm layers learn (batch statistics) in fine-tuning (``train.batchnorm: train``).

    The default keeps them in inference mode: small map batches would wreck pretrained statistics, and a random-init
    base can start from calibrated statistics (``train.calibrate_batchnorm``, see ``calibrate_batchnorm``).
    """
    return cfg.batchnorm == "train"


def set_phase(model, phase: str, unfreeze_from: str = "mixed9", batchnorm: bool = False) -> None:
    """``head``: only the head trains. ``finetune``: also the base from ``unfreeze_from`` up; its BatchNorm layers
    learn only when ``batchnorm`` (see ``batchnorm_trains``), otherwise they stay in inference mode. ``scratch``:
    every layer trains, BatchNorm included (the ``scratch`` recipe).

    Recompile after calling this (the trainable set is captured at compile time).
    """
    import keras

    if phase not in ("head", "finetune", "scratch"):
        raise ModelError(f"unknown training phase {phase!r}")
    if phase == "scratch":  # the whole (truncated) network learns, BatchNorm on batch statistics
        for layer in model.layers:
            layer.trainable = True
        return
    start = finetune_start(model, unfreeze_from) if phase == "finetune" else len(model.layers)
    for i, layer in enumerate(model.layers):
        if layer.name.startswith(HEAD_PREFIX):
            layer.trainable = True
        elif isinstance(layer, keras.layers.BatchNormalization):
            # trainable=False means inference mode in Keras: moving statistics, frozen beta
            layer.trainable = batchnorm and i >= start
        else:
            layer.trainable = i >= start


def trainable_layer_names(model) -> list[str]:
    """Layers with weights that the optimiser updates."""
    return [layer.name for layer in model.layers if layer.trainable_weights]


def compile_model(model, learning_rate: float, decay_steps: int | None = None) -> None:
    """Adam at ``learning_rate``; with ``decay_steps`` on a cosine schedule down to 1% of it."""
    import keras

    if decay_steps:
        learning_rate = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps, alpha=0.01)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])


def predict_proba(model, maps: Sequence[np.ndarray], cfg: TrainConfig, tta: bool | None = None,
                  batch_size: int | None = None) -> np.ndarray:
    """Class probabilities (n, K) for maps in order; ``tta`` averages over the eight flips/rotations."""
    tta = cfg.tta if tta is None else tta
    n = len(maps)
    if n == 0:
        return np.zeros((0, int(model.output_shape[-1])), dtype=np.float32)
    total = None
    transforms = range(8) if tta else (0,)
    for k in transforms:
        data = MapBatches(maps, cfg, batch_size=batch_size, dihedral_k=k)
        out = np.zeros((n, int(model.output_shape[-1])), dtype=np.float64)
        for i in range(len(data)):
            probs = np.asarray(model.predict_on_batch(data.batch_x(i)), dtype=np.float64)
            out[data.batches[i]] = probs
        total = out if total is None else total + out
    return (total / len(transforms)).astype(np.float32)


# --- save / load ---------------------------------------------------------------------------------------------------


def save_model(model, path: str | Path) -> Path:
    """Write ``.keras`` atomically (temporary file, then rename)."""
    path = Path(path)
    with atomic_output_path(path) as tmp:
        model.save(tmp)
    return path


def load_model(path: str | Path):
    """Load a ``.keras`` model with ``safe_mode=True`` (no arbitrary code from the file), not compiled."""
    import keras

    path = Path(path)
    if not path.is_file():
        raise ModelError("model file not found", path=path,
                         fix="Pass the model directory written by `wsi-pipeline train` (OUT/model).")
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as err:  # noqa: BLE001 - damaged or foreign file
        raise ModelError(f"could not load the model ({type(err).__name__}: {err})", path=path,
                         fix="Retrain, or copy the model directory again (the file may be truncated).") from None
