"""Grad-CAM at one layer of a trained classifier.

Grad-CAM (Selvaraju et al., 2017): the activations A of a convolutional layer, weighted by the spatial mean of
d score_class / d A per channel, summed over channels, ReLU. The default layer is chosen for resolution: InceptionV3's
last block ``mixed10`` is 8x8 at 299 px, far coarser than a tile grid, so with learned weights we take the deepest
``mixedN`` block whose output still has at least ``input_px / 18`` cells per side (``mixed7``, 17x17, at 299 px),
and with a random-init base ``mixed0`` (``default_cam_layer``).

The model is split at that layer into ``features`` (input -> A) and ``tail`` (A -> class logits): InceptionV3 is a
chain of blocks, so everything after a ``mixedN`` depends on it alone. The gradient d score / d A is the only
backend-specific step, in one small function per backend. Keras is imported inside the functions.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import numpy as np

from ..core.config import TrainConfig
from ..core.errors import ModelError
from ..core.maps import BLOCK_NAMES
from ..model.network import HEAD_PREFIX


def _spatial_size(layer) -> int | None:
    shape = layer.output.shape
    if shape[1] is None or shape[2] is None:
        return None
    return int(min(shape[1], shape[2]))


def default_cam_layer(model, cfg: TrainConfig) -> str:
    """The Grad-CAM layer when ``cam.layer`` is not set.

    Learned weights (``train.weights``): the deepest ``mixedN`` block with at least ``input_px / 18`` cells per side
    (at least 2). A random-init base: ``mixed0``, the finest grid and the shallowest block on it. Its features are
    local random projections of the map that the trained layers above weigh; deeper random blocks mix the whole input,
    and Grad-CAM there follows slide-wide shifts of the map instead of the lesion (README, Grad-CAM; measured in
    benchmarks/README.md, CAM localisation).
    """
    if cfg.weights is None:
        return "mixed0"
    need = max(2, math.ceil(cfg.input_px / 18))
    best = "mixed0"
    for name in BLOCK_NAMES:
        try:
            layer = model.get_layer(name)
        except ValueError:
            continue
        size = _spatial_size(layer)
        if size is None:
            # variable-size model: sizes scale like a 299-px input, where mixed0-7 keep >= 17 cells
            size = {"mixed8": 8, "mixed9": 8, "mixed10": 8}.get(name, 17 if name in BLOCK_NAMES[3:8] else 35)
            size = size * cfg.input_px // 299
        if size >= need:
            best = name
    return best


@dataclass
class CamModel:
    """A classifier split at the Grad-CAM layer; the tail stops before the softmax so Grad-CAM differentiates the
    class score (logit), which does not saturate on confident predictions the way the probability does."""

    layer: str
    features: object  # keras.Model: input -> activations
    tail: object      # keras.Model: activations -> class logits


def split_model(model, layer: str) -> CamModel:
    import keras

    try:
        target = model.get_layer(layer)
    except ValueError:
        raise ModelError(f"the model has no layer {layer!r} for Grad-CAM",
                         fix="Set cam.layer to a layer name of the model, e.g. mixed5 or mixed7.") from None
    features = keras.Model(model.inputs[0], target.output)
    tail = keras.Model(target.output, logits_output(model))
    return CamModel(layer, features, tail)


def logits_output(model):
    """The pre-softmax class scores of a ``pipeline.model.network`` classifier: its ``head_dense`` layer without the
    softmax, rebuilt on the same weights (a Dense layer's activation cannot be tapped)."""
    import keras

    try:
        dense = model.get_layer(f"{HEAD_PREFIX}dense")
    except ValueError:
        raise ModelError("the model has no head_dense layer: Grad-CAM needs a model trained by wsi-pipeline",
                         fix="Pass the model directory written by `wsi-pipeline train`.") from None
    logits = keras.layers.Dense(dense.units, dtype="float32", name="cam_logits")
    out = logits(dense.input)
    logits.set_weights(dense.get_weights())
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


# One compiled gradient function per tail model (tf.function / jax.jit, traced once per batch shape): run op by op,
# every layer of the tail is dispatched from Python for every slide (JAX: ~1 s per slide on CPU, compiled ~0.1 s).
# The score is the class logit minus the mean logit (for two classes, half the log-odds): Grad-CAM's class score.
_GRADIENT_FNS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _gradients_tensorflow(tail, activations: np.ndarray, class_index: int) -> tuple[np.ndarray, np.ndarray]:
    import tensorflow as tf

    fn = _GRADIENT_FNS.get(tail)
    if fn is None:
        @tf.function(reduce_retracing=True)
        def fn(acts, index):
            with tf.GradientTape() as tape:
                tape.watch(acts)
                logits = tail(acts, training=False)
                margin = tf.gather(logits, index, axis=1) - tf.reduce_mean(logits, axis=1)
                score = tf.reduce_sum(margin)
            return tape.gradient(score, acts), logits

        _GRADIENT_FNS[tail] = fn
    grads, logits = fn(tf.convert_to_tensor(activations), tf.constant(class_index, tf.int32))
    return grads.numpy(), softmax(logits.numpy())


def _gradients_jax(tail, activations: np.ndarray, class_index: int) -> tuple[np.ndarray, np.ndarray]:
    import jax
    import jax.numpy as jnp

    fn = _GRADIENT_FNS.get(tail)
    if fn is None:
        def score(trainable, non_trainable, acts, index):
            logits, _ = tail.stateless_call(trainable, non_trainable, acts, training=False)
            margin = jnp.take(logits, index, axis=1) - jnp.mean(logits, axis=1)
            return jnp.sum(margin), logits

        fn = jax.jit(jax.value_and_grad(score, argnums=2, has_aux=True))
        _GRADIENT_FNS[tail] = fn
    (_, logits), grads = fn([v.value for v in tail.trainable_variables],
                            [v.value for v in tail.non_trainable_variables],
                            jnp.asarray(activations), jnp.int32(class_index))
    return np.asarray(grads), softmax(np.asarray(logits))


def class_score_gradients(tail, activations: np.ndarray, class_index: int) -> tuple[np.ndarray, np.ndarray]:
    """d (logit[class_index] - mean logit) / d activations, and the probabilities, on the active Keras backend."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        return _gradients_tensorflow(tail, activations, class_index)
    if backend == "jax":
        return _gradients_jax(tail, activations, class_index)
    raise ModelError(f"Grad-CAM supports the tensorflow and jax Keras backends, not {backend!r}",
                     fix="Set KERAS_BACKEND=tensorflow or jax.")


def activations_and_probs(cam_model: CamModel, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One forward pass: the layer's activations and the class probabilities of a batch."""
    import keras

    # predict_on_batch: the backend's compiled forward pass (a plain call runs op by op under JAX)
    activations = np.asarray(keras.ops.convert_to_numpy(cam_model.features.predict_on_batch(inputs)), dtype=np.float32)
    probs = softmax(keras.ops.convert_to_numpy(cam_model.tail.predict_on_batch(activations)))
    return activations, probs


def gradcam_from_activations(cam_model: CamModel, activations: np.ndarray, classes: np.ndarray,
                             out_hw: tuple[int, int], reference: np.ndarray | None = None) -> np.ndarray:
    """Grad-CAM of each input for its class in ``classes``, upsampled to ``out_hw``; >= 0, not normalised.

    With ``reference`` (activations of each input's reference map, same shape): ReLU(sum over channels of
    gradient x (activation - reference)) at each position instead of the channel-mean-weighted activations.
    """
    cams = np.empty((len(activations),) + tuple(out_hw), dtype=np.float32)
    for c in np.unique(classes):
        sel = np.flatnonzero(classes == c)
        grads, _ = class_score_gradients(cam_model.tail, activations[sel], int(c))
        if reference is None:
            weights = grads.mean(axis=(1, 2), keepdims=True)  # per channel
            low = np.maximum((weights * activations[sel]).sum(axis=-1), 0.0)
        else:
            low = np.maximum((grads * (activations[sel] - reference[sel])).sum(axis=-1), 0.0)
        for i, cam in zip(sel, low):
            cams[i] = upsample_cam(cam, *out_hw, RECEPTIVE_GRID.get(cam_model.layer))
    return cams


def gradcam(cam_model: CamModel, inputs: np.ndarray, class_index: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM of a batch (n, h, w, 3) at the layer's resolution, upsampled to (n, h, w); also the probabilities.

    ``class_index`` None: each input's predicted class. Values are >= 0 and not normalised (normalise per slide).
    """
    activations, probs = activations_and_probs(cam_model, inputs)
    classes = probs.argmax(axis=1) if class_index is None else np.full(len(inputs), class_index)
    return gradcam_from_activations(cam_model, activations, classes, inputs.shape[1:3]), probs


# Where InceptionV3's activation cells sit on its input: the centre of cell j of a block is input pixel
# offset + j * jump (the stem's and the two reduction blocks' valid 3x3 convolutions and poolings shift and stride the
# grid; checked against input gradients in tests/cam/test_gradients.py). Stretching the grid over the whole input
# instead puts mixed0's edge cells 13 px (three 4-px map cells at 96 px) too far out.
RECEPTIVE_GRID = {**{f"mixed{i}": (13, 8) for i in range(3)}, **{f"mixed{i}": (21, 16) for i in range(3, 8)},
                  **{name: (37, 32) for name in ("mixed8", "mixed9", "mixed10")}}


def _bilinear_at(cam: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """``cam`` sampled at fractional row indices ``ys`` x column indices ``xs`` (already within the grid)."""
    h, w = cam.shape
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = cam[y0][:, x0] * (1 - fx) + cam[y0][:, x1] * fx
    bottom = cam[y1][:, x0] * (1 - fx) + cam[y1][:, x1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


def upsample_bilinear(cam: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize of a small CAM to the input size (align-centres, like image resizing)."""
    h, w = cam.shape
    ys = np.clip((np.arange(out_h) + 0.5) * h / out_h - 0.5, 0, h - 1)
    xs = np.clip((np.arange(out_w) + 0.5) * w / out_w - 0.5, 0, w - 1)
    return _bilinear_at(cam, ys, xs)


def upsample_cam(cam: np.ndarray, out_h: int, out_w: int, grid: tuple[int, int] | None = None) -> np.ndarray:
    """A layer's CAM laid onto its input pixels: each cell at the centre of its receptive field (``grid`` =
    (offset, jump) from ``RECEPTIVE_GRID``), bilinear between centres, constant beyond the outer ones. Without a
    known grid the CAM is stretched over the input (``upsample_bilinear``)."""
    if grid is None:
        return upsample_bilinear(cam, out_h, out_w)
    offset, jump = grid
    h, w = cam.shape
    ys = np.clip((np.arange(out_h) - offset) / jump, 0, h - 1)
    xs = np.clip((np.arange(out_w) - offset) / jump, 0, w - 1)
    return _bilinear_at(cam, ys, xs)
