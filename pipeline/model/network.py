"""InceptionV3 on feature maps: building the network, its training phases, BatchNorm calibration, save/load.

``keras.applications.InceptionV3(include_top=False)`` is built flat on the input (its layers, ``mixed0`` ...
``mixed10``, are layers of the model itself, which Grad-CAM needs), then the head on block ``train.head_block`` (an
earlier block than ``mixed10`` truncates the network): ``head_pool`` (global average or max pooling), ``head_norm``
(standardisation with training-set statistics), ``head_dropout``, ``head_dense`` (softmax over K classes, float32 also
under mixed precision).

Phases: ``head`` (the base frozen), ``finetune`` (blocks from ``train.unfreeze_from`` up trainable; BatchNorm stays in
inference mode so small map batches cannot wreck pretrained statistics) and ``scratch`` (every layer trains, BatchNorm
on batch statistics). Which phases run is the recipe's choice (``pipeline.train.fitting``; docs/design/classifier.md).

The model uses only public Keras 3 API; Keras is imported inside the functions.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from ..core.config import TrainConfig
from ..core.errors import ModelError
from ..core.maps import BLOCK_NAMES
from ..core.outputs import atomic_output_path
from .backend import dtype_policy, use_mixed_precision
from .inputs import INPUT_BACKGROUND, input_shape_for, pad_to

HEAD_PREFIX = "head_"
IMAGENET_NOTOP_FILE = "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_NOTOP_MD5 = "bcbd6486424b2319ff4ef7d526e38f63"


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
