"""Grad-CAM on feature maps, mapped back onto each slide's tile grid.

Grad-CAM (Selvaraju et al., 2017): the activations A of a convolutional layer, weighted by the spatial mean of
d score_class / d A per channel, summed over channels, ReLU. The default layer is chosen for resolution: InceptionV3's
last block ``mixed10`` is 8x8 at 299 px, far coarser than a tile grid, so with learned weights we take the deepest
``mixedN`` block whose output still has at least ``input_px / 18`` cells per side (``mixed7``, 17x17, at 299 px),
and with a random-init base ``mixed0`` (``default_cam_layer``).

The model is split at that layer into ``features`` (input -> A) and ``tail`` (A -> class probabilities): InceptionV3
is a chain of blocks, so everything after a ``mixedN`` depends on it alone. The gradient d score / d A is the only
backend-specific step, in one small function per backend.

Mapping back: the model input of a slide is made by ``model.prepare`` (channel selection, resize / pad / crop /
native). Instead of inverting each strategy by hand, the same ``fit_size`` is applied to an image of cell indices, so
each input pixel knows the map cell it shows (or padding); a cell's CAM is the mean over its pixels. Maps larger than
the input (``crop``) are covered by overlapping windows whose per-cell CAMs are averaged into one mosaic.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .model.network import HEAD_PREFIX
from .model.inputs import dihedral, fit_size, to_input
from .core.config import TrainConfig
from .core.errors import ModelError
from .core.artefacts import CAM_DIR, MODEL_DIR, MOSAIC_PNG
from .core.maps import BLOCK_NAMES, FEATURE_MAP, FEATURE_MAP_FILL, has_feature_map, select_channels



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


# --- backend-specific gradients -------------------------------------------------------------------------------------
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
            cams[i] = upsample_bilinear(cam, *out_hw)
    return cams


def gradcam(cam_model: CamModel, inputs: np.ndarray, class_index: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM of a batch (n, h, w, 3) at the layer's resolution, upsampled to (n, h, w); also the probabilities.

    ``class_index`` None: each input's predicted class. Values are >= 0 and not normalised (normalise per slide).
    """
    activations, probs = activations_and_probs(cam_model, inputs)
    classes = probs.argmax(axis=1) if class_index is None else np.full(len(inputs), class_index)
    return gradcam_from_activations(cam_model, activations, classes, inputs.shape[1:3]), probs


def upsample_bilinear(cam: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize of a small CAM to the input size (align-centres, like image resizing)."""
    h, w = cam.shape
    ys = np.clip((np.arange(out_h) + 0.5) * h / out_h - 0.5, 0, h - 1)
    xs = np.clip((np.arange(out_w) + 0.5) * w / out_w - 0.5, 0, w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = cam[y0][:, x0] * (1 - fx) + cam[y0][:, x1] * fx
    bottom = cam[y1][:, x0] * (1 - fx) + cam[y1][:, x1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


# --- from model input back to the map -------------------------------------------------------------------------------


def cell_index_image(rows: int, cols: int) -> np.ndarray:
    """(rows, cols, 3) float32 whose value is each cell's flat index (3 channels, like a map)."""
    idx = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols, 1)
    return np.repeat(idx, 3, axis=2)


def cells_from_input(cam_input: np.ndarray, index_input: np.ndarray, n_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum and pixel count of an input-sized CAM per map cell (padding pixels, index < 0, are dropped)."""
    idx = index_input[..., 0].round().astype(np.int64).ravel()
    keep = idx >= 0
    sums = np.bincount(idx[keep], weights=cam_input.ravel()[keep], minlength=n_cells)
    counts = np.bincount(idx[keep], minlength=n_cells)
    return sums, counts


def window_origins(size: int, window: int, overlap: float) -> list[int]:
    """Starts of windows of ``window`` cells covering ``size`` cells with at least ``overlap`` overlap."""
    if size <= window:
        return [0]
    step = max(1, int(window * (1 - overlap)))
    starts = list(range(0, size - window + 1, step))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def map_windows(rows: int, cols: int, cfg: TrainConfig, overlap: float) -> list[tuple[int, int, int, int]]:
    """(r0, r1, c0, c1) map windows, each shown to the model as one input."""
    if cfg.size_strategy != "crop":
        return [(0, rows, 0, cols)]
    return [(r0, min(rows, r0 + cfg.input_px), c0, min(cols, c0 + cfg.input_px))
            for r0 in window_origins(rows, cfg.input_px, overlap)
            for c0 in window_origins(cols, cfg.input_px, overlap)]


def reference_map(channels: np.ndarray) -> np.ndarray:
    """The slide's reference for ``reference`` CAMs: its tissue cells all at the per-channel median tissue value
    (same outline, no texture); background stays background."""
    tissue = (channels >= 0).all(axis=2)
    ref = channels.copy()
    if tissue.any():
        ref[tissue] = np.median(channels[tissue], axis=0)
    return ref


@dataclass
class CamView:
    """One model input made from a slide's map: transform ``k`` (``model.dihedral``) of the map, one window of it."""

    k: int
    input: np.ndarray             # (h, w, 3) network input
    index: np.ndarray             # (h, w, 3) flat index of the *untransformed* map cell each pixel shows, -1 padding
    reference: np.ndarray | None  # the same view of the reference map (``reference_map``)


CAM_BATCH = 32  # inputs per forward/gradient call: bounds the activations held at once (8 transforms x windows)


def cam_views(fmap: np.ndarray, cfg: TrainConfig, overlap: float = 0.5, reference: bool = False,
              transforms: Sequence[int] = (0,)) -> list[CamView]:
    """The inputs a slide's CAM is computed on: for each flip/rotation ``k``, each window (``map_windows``).

    The geometry (transform, window, ``fit_size``) is applied to an image of cell indices too, so every input pixel
    knows the map cell it shows and no strategy has to be inverted by hand.
    """
    channels = select_channels(fmap, cfg.adapter, cfg.component)
    ref_channels = reference_map(channels) if reference else None
    index = cell_index_image(*fmap.shape[:2])
    views = []
    for k in transforms:
        turned, turned_index = dihedral(channels, k), dihedral(index, k)
        turned_ref = dihedral(ref_channels, k) if reference else None
        for r0, r1, c0, c1 in map_windows(*turned.shape[:2], cfg, overlap):
            views.append(CamView(
                k, to_input(fit_size(turned[r0:r1, c0:c1], cfg)),
                fit_size(turned_index[r0:r1, c0:c1], cfg),  # padding gets the fill value -1
                to_input(fit_size(turned_ref[r0:r1, c0:c1], cfg)) if reference else None))
    return views


@dataclass
class ForwardPass:
    """Activations at the CAM layer (and of the reference inputs) and probabilities of a batch of views."""

    views: list[int]
    activations: np.ndarray
    probs: np.ndarray
    reference: np.ndarray | None


def forward_views(cam_model: CamModel, views: Sequence[CamView]) -> list[ForwardPass]:
    """Views of one input size go through the model together (native windows of other sizes separately)."""
    groups: dict[tuple, list[int]] = {}
    for i, view in enumerate(views):
        groups.setdefault(view.input.shape, []).append(i)
    passes = []
    for members in groups.values():
        for j in range(0, len(members), CAM_BATCH):
            sel = members[j:j + CAM_BATCH]
            activations, probs = activations_and_probs(cam_model, np.stack([views[i].input for i in sel]))
            ref = None
            if views[sel[0]].reference is not None:
                ref, _ = activations_and_probs(cam_model, np.stack([views[i].reference for i in sel]))
            passes.append(ForwardPass(sel, activations, probs, ref))
    return passes


def view_probabilities(views: Sequence[CamView], passes: Sequence[ForwardPass]) -> np.ndarray:
    """The slide's class probabilities: the mean over the windows of the untransformed map."""
    return np.mean([p for fp in passes for i, p in zip(fp.views, fp.probs) if views[i].k == 0], axis=0)


def cam_from_passes(cam_model: CamModel, fmap: np.ndarray, views: Sequence[CamView],
                    passes: Sequence[ForwardPass], class_index: int) -> np.ndarray:
    """Per-cell CAM of ``class_index``: each view's CAM averaged over the cells its pixels show, windows blended;
    with several transforms, each transform's CAM is brought to peak 1 and the transforms averaged."""
    rows, cols = fmap.shape[:2]
    n_cells = rows * cols
    transforms = sorted({view.k for view in views})
    sums = {k: np.zeros(n_cells) for k in transforms}
    counts = {k: np.zeros(n_cells) for k in transforms}
    for fp in passes:
        cams = gradcam_from_activations(cam_model, fp.activations, np.full(len(fp.views), class_index),
                                        views[fp.views[0]].input.shape[:2], fp.reference)
        for i, cam_input in zip(fp.views, cams):
            s, c = cells_from_input(cam_input, views[i].index, n_cells)
            sums[views[i].k] += s
            counts[views[i].k] += c
    tissue = fmap[..., 0] > FEATURE_MAP_FILL / 2  # background cells carry the fill value -1
    per_transform = []
    for k in transforms:
        with np.errstate(invalid="ignore", divide="ignore"):
            cell_cam = np.where(counts[k] > 0, sums[k] / np.maximum(counts[k], 1), np.nan).reshape(rows, cols)
        cell_cam[~tissue] = np.nan
        per_transform.append(_peak_one(cell_cam))
    return per_transform[0] if len(per_transform) == 1 else _nan_mean(per_transform)


def slide_cam(cam_model: CamModel, fmap: np.ndarray, cfg: TrainConfig, class_index: int | None = None,
              overlap: float = 0.5, reference: bool = False, augment: bool = False
              ) -> tuple[np.ndarray, np.ndarray, int]:
    """Grad-CAM of one slide's feature map on its tile grid.

    ``reference``: each position's evidence is gradient x (activation - activation of the reference map, see
    :func:`reference_map`), summed over channels: a first-order account of how the slide's score differs from that
    of the same outline filled with its typical tissue, so what the tissue outline alone excites cancels out.

    ``augment``: Augmented Grad-CAM (Morbidelli et al., 2020), the CAMs of the eight flips/rotations of the map, each
    laid back onto the map and averaged. The activation grid falls differently on the map in each, so the mean is
    finer than any one CAM. All views of one size go through the model as one batch.

    Returns (cam (rows, cols) in [0, 1] with NaN where no tissue or never seen, mean class probabilities over the
    windows of the untransformed map, the class explained). The class is the predicted one unless given.
    """
    views = cam_views(fmap, cfg, overlap, reference, range(8) if augment else (0,))
    passes = forward_views(cam_model, views)
    probs = view_probabilities(views, passes)
    cls = int(probs.argmax()) if class_index is None else int(class_index)
    return cam_from_passes(cam_model, fmap, views, passes, cls), probs, cls


def augmented_slide_cam(cam_model: CamModel, fmap: np.ndarray, cfg: TrainConfig, class_index: int | None = None,
                        overlap: float = 0.5, reference: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """``slide_cam`` with ``augment=True`` (Augmented Grad-CAM over the eight flips/rotations)."""
    return slide_cam(cam_model, fmap, cfg, class_index, overlap, reference, augment=True)


def smooth_cam(cam: np.ndarray, sigma_cells: float) -> np.ndarray:
    """Gaussian smoothing within tissue (normalised convolution: NaN cells neither contribute nor receive), peak 1."""
    from scipy import ndimage

    valid = np.isfinite(cam)
    if sigma_cells <= 0 or not valid.any():
        return cam
    num = ndimage.gaussian_filter(np.where(valid, cam, 0.0).astype(np.float64), sigma_cells, mode="constant")
    den = ndimage.gaussian_filter(valid.astype(np.float64), sigma_cells, mode="constant")
    return _peak_one(np.where(valid, num / np.maximum(den, 1e-12), np.nan))


def _nan_mean(cams: list[np.ndarray]) -> np.ndarray:
    stack = np.stack(cams)
    counts = np.isfinite(stack).sum(axis=0)
    sums = np.nansum(stack, axis=0)
    return _peak_one(np.where(counts > 0, sums / np.maximum(counts, 1), np.nan))


def _peak_one(cam: np.ndarray) -> np.ndarray:
    peak = np.nanmax(cam) if np.isfinite(cam).any() else 0.0
    return (cam / peak if peak > 0 else cam).astype(np.float32)


# --- the runner -----------------------------------------------------------------------------------------------------



def cam_hash(model_info: dict, cam_cfg, layer: str, map_attrs: dict | None) -> str:
    """What a slide's CAM depends on: the model, the CAM settings and layer, and the feature map."""

    payload = {"model": model_info.get("hash") or model_info.get("model_hash") or model_info.get("models"),
               "cam": cam_cfg.model_dump(mode="json"), "layer": layer,
               "map": (map_attrs or {}).get("reducer_hash"), "map_config": (map_attrs or {}).get("config_hash")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def slide_outputs(out_dir, slide_id: str) -> dict:

    base = Path(out_dir) / CAM_DIR
    return {"png": base / f"{slide_id}.png", "tiff": base / f"{slide_id}.tiff", "geojson": base / f"{slide_id}.geojson"}


def slide_cam_with_models(cam_models, fmap: np.ndarray, train_cfg, cam_cfg) -> tuple[np.ndarray, np.ndarray, int]:
    """Grad-CAM of one map with one or several (k-fold) split models, with ``cam.augment`` and ``cam.smooth_cells``.

    The class (``cam.class_index``, else the predicted one) is chosen once, from the probabilities averaged over the
    models, so every fold model explains the same class; their CAMs are then averaged.
    Returns (cam (rows, cols) float32, NaN off tissue; mean probabilities; the class explained).
    """
    views = cam_views(fmap, train_cfg, cam_cfg.window_overlap, cam_cfg.reference,
                      range(8) if cam_cfg.augment else (0,))
    runs = [forward_views(cam_model, views) for cam_model in cam_models]
    probs = np.mean([view_probabilities(views, passes) for passes in runs], axis=0)
    cls = int(probs.argmax()) if cam_cfg.class_index is None else int(cam_cfg.class_index)
    cams = [cam_from_passes(cam_model, fmap, views, passes, cls) for cam_model, passes in zip(cam_models, runs)]
    cam = _nan_mean(cams) if len(cams) > 1 else cams[0]
    return smooth_cam(cam, cam_cfg.smooth_cells).astype(np.float32), probs, cls


def update_store_cam(store, trained, cam_models, layer: str, cam_cfg, paths: dict):
    """The ``cam`` array of one store, recomputed only when stale (model, CAM settings, layer, map) or when one of
    the slide's CAM files is missing. Returns (cam, mean probabilities, class explained, skipped)."""
    from .core.store import array_attrs, read_array, write_array

    digest = cam_hash(trained.info, cam_cfg, layer, array_attrs(store, FEATURE_MAP))
    old = array_attrs(store, "cam")
    if old and old.get("cam_hash") == digest and all(p.exists() for p in paths.values()):
        return (read_array(store, "cam"), np.asarray(old["probabilities"], dtype=np.float32),
                int(old["class_index"]), True)
    cam, probs, cls = slide_cam_with_models(cam_models, read_array(store, FEATURE_MAP), trained.train_config,
                                            cam_cfg)
    write_array(store, "cam", cam, attrs={
        "cam_hash": digest, "layer": layer, "class_index": cls, "class_label": str(trained.mapping.values[cls]),
        "probabilities": [float(p) for p in probs], "fill_value": "NaN where no tissue"})
    return cam, probs, cls, False


def iter_store_cams(out_dir, model_dir, config, stores, labels: dict | None = None) -> Iterator[dict]:
    """The model half of the CAM stage: loads the model once and brings each store's ``cam`` array up to date.

    Yields one record per store: ``slide_id``, ``layer``, ``current`` (nothing recomputed) and either ``entry``
    (caption data) or ``error`` (a typed error's record). Keras runs here; the file rendering is the caller's.
    """
    from .core.errors import PipelineError, error_record
    from .model.trained import TrainedModel
    from .core.parallel import where_am_i

    trained = TrainedModel(model_dir)
    tcfg = trained.train_config
    layer = config.cam.layer or default_cam_layer(trained.models[0], tcfg)
    cam_models = [split_model(m, layer) for m in trained.models]
    where = where_am_i()
    logging.getLogger("pipeline").info("cam: %d model(s) from %s, Grad-CAM at %s, on %s", len(cam_models), model_dir,
                                       layer, where["worker"] or f"pid {where['pid']}")
    # true labels: given, else those the model was trained with; and which split each slide was in
    labels = {**{k: str(v) for k, v in (trained.info.get("truth") or {}).items()}, **(labels or {})}
    splits = trained.info.get("splits") or []
    split_of = {sid: name for split in splits for name in ("train", "val", "test")
                for sid in split.get(name) or [] if len(splits) == 1}
    for store in stores:
        store = Path(store)
        slide_id = store.name[: -len(".zarr")]
        record = {"slide_id": slide_id, "store": str(store), "layer": layer, "current": False, "computed_on": where}
        paths = slide_outputs(out_dir, slide_id)
        try:
            _, probs, cls, record["current"] = update_store_cam(store, trained, cam_models, layer, config.cam, paths)
        except PipelineError as err:
            record["error"] = error_record(err)
        else:
            record["entry"] = _entry(slide_id, paths, probs, cls, trained, labels, split_of.get(slide_id))
        yield record


def store_cams_task(out_dir: str, model_dir: str, config_json: dict, stores: list[str],
                    labels: dict | None) -> list[dict]:
    """Dask task: :func:`iter_store_cams` for a list of stores on the (GPU) worker it was placed on."""
    from .core.config import PipelineConfig
    from .core.outputs import log_file

    with log_file(out_dir, "cam-worker"):
        return list(iter_store_cams(out_dir, model_dir, PipelineConfig.model_validate(config_json), stores, labels))


def cam_slides(out_dir, config=None, model_dir=None, runner=None, labels: dict | None = None,
               progress: bool | None = None) -> dict:
    """Grad-CAM for every slide with a feature map: ``cam`` array in its store, and OUT/cam/<id>.png/.tiff/.geojson,
    plus the cohort contact sheet OUT/mosaic.png. Resumable: a slide is redone only when the model, the CAM
    settings or its map changed, or one of its files is missing.

    The model runs once for the cohort: as one task on a GPU worker when the cluster has one
    (``cluster.gpu_placement``), else in this process (on its GPU when there is one); the heavy file rendering is
    spread over the ``runner`` (one task per slide, Keras-free).
    """

    from .core.config import PipelineConfig
    from .core.errors import error_record
    from .heatmaps import render_slide_outputs, save_contact_sheet
    from .core.outputs import Manifest, output_lock
    from .core.parallel import GPU_RESOURCES, LocalRunner, gpu_placement
    from .core.progress import Progress
    from .core.store import list_stores

    log = logging.getLogger("pipeline")
    config = config or PipelineConfig()
    out_dir = Path(out_dir)
    model_dir = Path(model_dir) if model_dir else out_dir / MODEL_DIR
    t0 = time.monotonic()
    with output_lock(out_dir, command="cam"):
        manifest = Manifest(out_dir)
        runner = runner or LocalRunner()
        stores = [s for s in list_stores(out_dir) if has_feature_map(s)]
        if stores and gpu_placement(runner, config.cluster):
            records = runner.run_one(store_cams_task, str(out_dir), str(model_dir), config.model_dump(mode="json"),
                                     [str(s) for s in stores], labels, resources=GPU_RESOURCES)
        else:  # lazily: renders of finished slides start while the next CAMs are computed
            records = iter_store_cams(out_dir, model_dir, config, stores, labels)
        bar = Progress(total_slides=len(stores), enabled=progress)
        done = skipped = failed = 0
        layer = config.cam.layer
        entries = []
        pending = {}
        for record in records:
            slide_id, layer = record["slide_id"], record["layer"]
            if "error" in record:
                failed += 1
                manifest.update_stage(slide_id, "cam", status="failed", error=record["error"])
                bar.slide_done(failed=True)
                continue
            entry = record["entry"]
            if record["current"]:
                skipped += 1
                bar.slide_done()
                entries.append(entry)
                continue
            runner.submit(render_slide_outputs, record["store"], slide_outputs(out_dir, slide_id),
                          config.cam.hot_threshold, config.cam.tiff_tile_px, entry["title"], tag=slide_id)
            pending[slide_id] = {**entry, "computed_on": record["computed_on"]}
        while pending and runner.pending():
            result = runner.next_done()
            entry = pending.pop(result.tag)
            if result.error is not None:
                failed += 1
                manifest.update_stage(result.tag, "cam", status="failed", error=error_record(result.error))
                bar.slide_done(failed=True)
                log.warning("CAM outputs of %s failed: %s", result.tag, result.error)
                continue
            done += 1
            manifest.update_stage(result.tag, "cam", status="done", layer=layer, class_index=entry["class_index"],
                                  files=result.result, computed_on=entry["computed_on"])
            entries.append(entry)
            bar.slide_done()
        bar.close()
        entries.sort(key=lambda e: -e["score"])
        if entries:
            save_contact_sheet(out_dir / MOSAIC_PNG, [{"image": e["png"], "caption": e["caption"]} for e in entries])
        summary = {"slides": len(stores), "done": done, "skipped": skipped, "failed": failed, "layer": layer,
                   "seconds": round(time.monotonic() - t0, 2)}
        manifest.data["runs"].append({"command": "cam", "finished": time.time(), **summary})
        manifest.save()
    return summary


def _entry(slide_id, paths, probs, cls, trained, labels, split) -> dict:
    """Caption data of one slide: predicted label and its probability, true label and split when known."""
    predicted = str(trained.mapping.values[int(np.argmax(probs))])
    true = labels.get(slide_id)
    truth = f"true {true}" if true not in (None, "") else "true ?"
    where = f" [{split}]" if split else ""
    p = float(np.max(probs))
    title = (f"{slide_id}{where}: {truth} / predicted {predicted} (p={p:.2f}); "
             f"Grad-CAM of class {trained.mapping.values[cls]}")
    return {"slide_id": slide_id, "png": paths["png"], "score": float(probs[-1]), "class_index": cls,
            "predicted": predicted, "true": true, "split": split, "title": title,
            "caption": f"{slide_id}{where}\n{truth} / pred {predicted} p={p:.2f}", "probabilities": [float(x) for x in probs]}
