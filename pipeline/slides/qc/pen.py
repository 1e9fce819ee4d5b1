"""Marker ink: thumbnail pixels whose colour lies far from the slide's own tissue colours.

Features per pixel: optical-density chromaticity (two numbers, the hue of what absorbs) and log total optical density
(darkness). A robust covariance (minimum covariance determinant over 90% of the pixels, ``robust_fit``, refitted
without the pixels the last fit called ink, up to three times) of the slide's tissue pixels models its stain; a pixel
further than ``max_distance`` (Mahalanobis) is ink. Relative to the slide, so a second lab's stain is not ink; blue,
green and red inks move the chromaticity, black ink the darkness. Runs on the tissue-mask thumbnail (8 µm/px):
strokes are tens of pixels wide there and averaging over nuclei steadies the tissue colours (docs/design/qc.md).
"""

from __future__ import annotations

import numpy as np

MIN_PIXELS = 50  # fewer tissue pixels: no colour model, nothing flagged
SUPPORT = 0.9  # share of the sample each robust fit covers: every tissue colour mode (pink dermis, purple epidermis)
#               stays in; the refits drop what the last fit called ink. Chosen on the tuning cohorts (qc.md).
ROUNDS = 3  # robust fits at most
MIN_BLOB_PX = 40  # flagged blobs smaller than this (40 px at 8 µm/px: 0.0026 mm²) are dark nuclei, not a stroke
GLASS_MARGIN = 15  # grey levels: pixels whose darkest channel is within this of the slide's glass are glass


def colour_features(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) float32: OD chromaticity red-green, OD chromaticity blue, log of the total optical density."""
    od = -np.log(np.clip(rgb.astype(np.float32), 1.0, 255.0) / 255.0)
    total = od.sum(axis=-1)
    chroma = od / np.maximum(total, 1e-3)[..., None]
    return np.stack([chroma[..., 0] - chroma[..., 1], chroma[..., 2], np.log(total + 1e-3)], axis=-1)


def _squared_distance(x: np.ndarray, centre: np.ndarray, precision: np.ndarray) -> np.ndarray:
    d = x - centre
    return np.einsum("ij,jk,ik->i", d, precision, d)


def robust_fit(x: np.ndarray, support: float, steps: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(centre, precision) of the ``support`` share of ``x`` (n, p) that fits together: concentration steps of the
    minimum covariance determinant from the median and the full covariance, then its consistency correction and
    reweighting (as scikit-learn's MinCovDet does after its random starts; one start suffices when the outliers are
    a minority, and costs milliseconds instead of a second)."""
    from scipy.stats import chi2

    n, p = x.shape
    keep = max(p + 1, int(support * n))
    centre, cov = np.median(x, axis=0), np.cov(x, rowvar=False)
    for _ in range(steps):
        d2 = _squared_distance(x, centre, np.linalg.pinv(cov))
        idx = np.argpartition(d2, keep - 1)[:keep]
        centre, cov = x[idx].mean(axis=0), np.cov(x[idx], rowvar=False)
    d2 = _squared_distance(x, centre, np.linalg.pinv(cov))
    cov = cov * np.median(d2) / chi2.ppf(0.5, p)  # consistent at the normal model
    d2 = _squared_distance(x, centre, np.linalg.pinv(cov))
    good = d2 <= chi2.ppf(0.975, p)  # reweighting
    centre, cov = x[good].mean(axis=0), np.cov(x[good], rowvar=False)
    d2 = _squared_distance(x, centre, np.linalg.pinv(cov))
    cov = cov * np.median(d2) / chi2.ppf(0.5, p)
    return centre, np.linalg.pinv(cov)


def pen_pixels(thumbnail: np.ndarray, tissue_px: np.ndarray, max_distance: float = 3.25, sample_px: int = 20000,
               seed: int = 0) -> np.ndarray:
    """Bool (h, w): pixels of ``thumbnail`` (uint8 RGB) whose colour is ink, relative to its ``tissue_px``."""
    from scipy.ndimage import binary_opening
    from skimage.morphology import remove_small_objects

    features = colour_features(thumbnail)
    darkest = thumbnail.min(axis=-1).astype(np.int16)
    glass = np.median(darkest[~tissue_px]) if (~tissue_px).sum() >= MIN_PIXELS else 240  # this slide's glass
    model_px = tissue_px & (darkest < glass - GLASS_MARGIN)  # glass the mask closed over is no part of the model
    # tested: the tissue and whatever is clearly darker than glass (grey ink on glass is not tissue to the mask)
    not_glass = (tissue_px | (darkest < glass - 3 * GLASS_MARGIN)) & (darkest < glass - GLASS_MARGIN)
    out = np.zeros(tissue_px.shape, dtype=bool)
    if model_px.sum() < MIN_PIXELS:
        return out
    rng = np.random.default_rng(seed)
    sample = features[model_px][rng.choice(int(model_px.sum()), min(int(model_px.sum()), sample_px), replace=False)]
    sample = sample.astype(np.float64)
    for _ in range(ROUNDS):  # refit without what the last fit called ink: ink that shifted the first fit is found
        centre, precision = robust_fit(sample, SUPPORT)
        inside = np.sqrt(_squared_distance(sample, centre, precision)) <= max_distance
        if inside.all() or inside.sum() < MIN_PIXELS:
            break
        sample = sample[inside]
    distance = np.sqrt(_squared_distance(features[not_glass].astype(np.float64), centre, precision))
    out[not_glass] = distance > max_distance
    out = binary_opening(out, structure=np.ones((3, 3), bool))  # strokes are wide: lone pixels are not ink
    return remove_small_objects(out, max_size=MIN_BLOB_PX - 1)  # nor are compact specks of dense nuclei


def _detector():
    from . import Detector

    return Detector("pen", "thumbnail", pixels=lambda thumb, tissue, qc: pen_pixels(thumb, tissue, qc.pen_distance),
                    tile_fraction=lambda qc: qc.pen_tile_fraction)


DETECTOR = _detector()
