"""A slide's CAM on its tile grid: the model inputs made from its feature map (views), and their Grad-CAMs laid
back onto the map cells.

The model input of a slide is made by ``pipeline.model.inputs`` (channel selection, resize / pad / crop / native).
Instead of inverting each strategy by hand, the same ``fit_size`` is applied to an image of cell indices, so each
input pixel knows the map cell it shows (or padding); a cell's CAM is the mean over its pixels. Maps larger than the
input (``crop``) are covered by overlapping windows whose per-cell CAMs are averaged into one mosaic; Augmented
Grad-CAM turns the map through the eight flips/rotations and averages the CAMs turned back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..core.config import TrainConfig
from ..core.maps import FEATURE_MAP_FILL, select_channels
from ..model.inputs import dihedral, fit_size, to_input
from .gradients import CamModel, activations_and_probs, gradcam_from_activations


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


def view_probabilities(views: Sequence[CamView], passes: Sequence[ForwardPass], tta: bool = False) -> np.ndarray:
    """The slide's class probabilities: the mean over the windows of the untransformed map; with ``tta`` (the model
    predicts with ``train.tta``), the mean over the transforms of those means, as ``predict`` gives them, so the CAM
    explains the class the predictions report."""
    by_k: dict[int, list] = {}
    for fp in passes:
        for i, p in zip(fp.views, fp.probs):
            by_k.setdefault(views[i].k, []).append(p)
    return np.mean([np.mean(v, axis=0) for k, v in by_k.items() if tta or k == 0], axis=0)


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
    windows of the untransformed map (and the transforms, with ``cfg.tta``), the class explained). The class is the
    predicted one unless given.
    """
    views = cam_views(fmap, cfg, overlap, reference, range(8) if augment else (0,))
    passes = forward_views(cam_model, views)
    probs = view_probabilities(views, passes, cfg.tta)
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


def slide_cam_with_models(cam_models, fmap: np.ndarray, train_cfg, cam_cfg, described: np.ndarray | None = None
                          ) -> tuple[np.ndarray, np.ndarray, int]:
    """Grad-CAM of one map with one or several (k-fold) split models, with ``cam.augment`` and ``cam.smooth_cells``.

    The class (``cam.class_index``, else the predicted one) is chosen once, from the probabilities averaged over the
    models, so every fold model explains the same class; their CAMs are then averaged. ``described`` (the store's
    ``tissue_mask``): the CAM is kept on these cells only; the map's QC-excluded cells hold their neighbours' values
    (``core.maps.fill_excluded_cells``), no evidence of their own.
    Returns (cam (rows, cols) float32, NaN off tissue; mean probabilities; the class explained).
    """
    views = cam_views(fmap, train_cfg, cam_cfg.window_overlap, cam_cfg.reference,
                      range(8) if cam_cfg.augment else (0,))
    runs = [forward_views(cam_model, views) for cam_model in cam_models]
    probs = np.mean([view_probabilities(views, passes, train_cfg.tta) for passes in runs], axis=0)
    cls = int(probs.argmax()) if cam_cfg.class_index is None else int(cam_cfg.class_index)
    cams = [cam_from_passes(cam_model, fmap, views, passes, cls) for cam_model, passes in zip(cam_models, runs)]
    cam = _nan_mean(cams) if len(cams) > 1 else cams[0]
    if described is not None:
        cam = _peak_one(np.where(np.asarray(described, dtype=bool), cam, np.nan))
    return smooth_cam(cam, cam_cfg.smooth_cells).astype(np.float32), probs, cls
