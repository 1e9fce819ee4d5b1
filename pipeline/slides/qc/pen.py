"""Marker ink: thumbnail pixels whose colour lies far from the slide's own tissue colours.

Features per pixel: optical-density chromaticity (two numbers, the hue of what absorbs) and log total optical density
(darkness). A robust covariance (minimum covariance determinant over 90% of the pixels, ``robust_fit``, refitted
without the pixels the last fit called ink, up to three times) of the slide's tissue pixels models its stain; pixels
whose colour only marker ink gives (``ink_like``: blue, red, green, grey or black, whatever the H&E) are left out of
the fit, so a stroke that covers much of the tissue, or two strokes of one colour, do not become a tissue colour. Ink:
an ink-like pixel further than ``INK_LIKE_DISTANCE`` (Mahalanobis) from the model, or any pixel further than
``max_distance`` that is darker than the tissue's mean (ink adds optical density; a far, lighter pixel is a tissue
colour the model missed). Relative to the slide, so a second lab's stain is not ink. Runs on the tissue-mask
thumbnail (8 µm/px): strokes are tens of pixels wide there and averaging over nuclei steadies the tissue colours
(docs/design/qc.md).
"""

from __future__ import annotations

import math

import numpy as np

from ..morphology import open_square3, remove_small_objects
from ..tissue import channel_extremes

MIN_PIXELS = 50  # fewer tissue pixels: no colour model, nothing flagged
SUPPORT = 0.9  # share of the sample each robust fit covers: every tissue colour mode (pink dermis, purple epidermis)
#               stays in; the refits drop what the last fit called ink. Chosen on the tuning cohorts (qc.md).
ROUNDS = 3  # robust fits at most
MIN_BLOB_PX = 40  # flagged blobs smaller than this (40 px at 8 µm/px: 0.0026 mm²) are dark nuclei, not a stroke
GLASS_MARGIN = 15  # grey levels: pixels whose darkest channel is within this of the slide's glass are glass
# Where marker ink lies in (OD chromaticity red - green, blue; log total OD) and H&E tissue does not (docs/design/qc.md):
BLUE_MAX = 0.2  # blue ink passes blue light: blue chromaticity below this (99% of both labs' H&E above it)
RED_MIN = 0.38  # red ink absorbs green and blue: blue chromaticity above this, or above DARK_BLUE_MIN when dark
DARK_BLUE_MIN, DARK_LOG_OD_MIN = 0.33, 0.9  # (dense H&E absorbs less blue: haematoxylin passes blue light)
GREEN_RG_MIN = -0.05  # green ink absorbs red, grey (black ink on glass) red as much as green: red - green above
GREEN_BLUE_MIN = 0.27  # this with blue above this
BLACK_RG_MIN, BLACK_BLUE_MIN, BLACK_LOG_OD_MIN = -0.12, 0.28, 1.1  # black: near neutral and dark
INK_LIKE_DISTANCE = 2.0  # an ink-like pixel this far from the tissue model is ink (others: ``max_distance``)
MIN_FIT_SHARE = 0.5  # the prior leaves fewer of the tissue pixels than this: it does not fit this slide, unused


def colour_features(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) float32: OD chromaticity red-green, OD chromaticity blue, log of the total optical density."""
    od = -np.log(np.clip(rgb.astype(np.float32), 1.0, 255.0) / 255.0)
    total = od.sum(axis=-1)
    chroma = od / np.maximum(total, 1e-3)[..., None]
    return np.stack([chroma[..., 0] - chroma[..., 1], chroma[..., 2], np.log(total + 1e-3)], axis=-1)


def ink_like(features: np.ndarray) -> np.ndarray:
    """Bool (n,): rows of ``features`` (n, 3) whose colour only marker ink gives (blue, red, green or black), whatever
    the slide's stain. Left out of the colour model's fit, so a stroke that covers much of the tissue, or two of one
    colour, cannot become a tissue colour mode; such a pixel is ink from ``INK_LIKE_DISTANCE`` off the model."""
    rg, blue, log_od = features[:, 0], features[:, 1], features[:, 2]
    return ((blue < BLUE_MAX) | (blue > RED_MIN) | ((blue > DARK_BLUE_MIN) & (log_od > DARK_LOG_OD_MIN))
            | ((rg > GREEN_RG_MIN) & (blue > GREEN_BLUE_MIN))
            | ((rg > BLACK_RG_MIN) & (blue > BLACK_BLUE_MIN) & (log_od > BLACK_LOG_OD_MIN)))


def _squared_distance(x: np.ndarray, centre: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distances of the rows of ``x`` (n, p)."""
    return _distance_by_column(np.ascontiguousarray(x.T), centre, precision)


def _distance_by_column(xt: np.ndarray, centre: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """``_squared_distance`` of ``xt`` (p, n): d . (P d) column by column (one matrix product; the three-argument
    einsum was 6x, the quadratic form spelt out term by term 2x slower)."""
    d = xt - centre[:, None]
    return np.einsum("in,in->n", d, precision @ d)


def _inverse(cov: np.ndarray) -> np.ndarray:
    """``cov``'s inverse (``np.linalg.inv``, 5x faster than ``pinv`` on 3 x 3), or its pseudo-inverse when it is
    singular or too badly conditioned for the inverse to be one (e.g. a colour feature constant over the fit)."""
    try:
        inverse = np.linalg.inv(cov)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(cov)
    if not np.isfinite(inverse).all() or np.abs(inverse @ cov - np.eye(len(cov))).max() > 1e-6:
        return np.linalg.pinv(cov)
    return inverse


def _mean_cov(xt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, sample covariance) of the columns of ``xt`` (p, n) (``np.cov``'s figures, without its overhead)."""
    centre = xt.mean(axis=1)
    d = xt - centre[:, None]
    return centre, d @ d.T / (xt.shape[1] - 1)


def _median(values: np.ndarray) -> float:
    """``np.median`` of a 1-d array by one partition (np.median's checks cost 80 us a call here)."""
    half = len(values) // 2
    if len(values) % 2:
        return float(np.partition(values, half)[half])
    part = np.partition(values, (half - 1, half))
    return float((part[half - 1] + part[half]) / 2)


def chi2_quantile(q: float, p: int) -> float:
    """The ``q`` quantile of the chi-square distribution with ``p`` degrees of freedom. For p = 3 (the pen model)
    Newton's method on the closed-form CDF, erf(sqrt(x/2)) - sqrt(2x/pi) exp(-x/2): importing scipy.stats costs
    ~0.3-0.6 s in every process that plans a slide."""
    if p != 3:
        from scipy.stats import chi2

        return float(chi2.ppf(q, p))
    x = 3.0
    for _ in range(50):
        cdf = math.erf(math.sqrt(x / 2)) - math.sqrt(2 * x / math.pi) * math.exp(-x / 2)
        step = (cdf - q) / (math.sqrt(x / (2 * math.pi)) * math.exp(-x / 2))
        x = max(x - step, x / 10)
        if abs(step) < 1e-14 * x:
            break
    return x


def robust_fit(x: np.ndarray, support: float, steps: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(centre, precision) of the ``support`` share of ``x`` (n, p) that fits together: concentration steps of the
    minimum covariance determinant from the median and the full covariance, then its consistency correction and
    reweighting (as scikit-learn's MinCovDet does after its random starts; one start suffices when the outliers are
    a minority, and costs milliseconds instead of a second). The steps stop once the subset repeats (a fixed point:
    further steps would give the same fit)."""
    return _robust_fit_columns(np.ascontiguousarray(x.T), support, steps)


def _robust_fit_columns(xt: np.ndarray, support: float, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """``robust_fit`` of the columns of ``xt`` (p, n)."""
    p, n = xt.shape
    keep = max(p + 1, int(support * n))
    chi2_median, chi2_reweight = chi2_quantile(0.5, p), chi2_quantile(0.975, p)
    centre, cov = np.array([_median(row) for row in xt]), _mean_cov(xt)[1]
    subset = None
    for _ in range(steps):
        d2 = _distance_by_column(xt, centre, _inverse(cov))
        chosen = np.zeros(n, bool)
        chosen[np.argpartition(d2, keep - 1)[:keep]] = True
        if subset is not None and np.array_equal(chosen, subset):
            break
        subset = chosen
        centre, cov = _mean_cov(xt.compress(chosen, axis=1))
    d2 = _distance_by_column(xt, centre, _inverse(cov))
    cov = cov * _median(d2) / chi2_median  # consistent at the normal model
    d2 = _distance_by_column(xt, centre, _inverse(cov))
    centre, cov = _mean_cov(xt.compress(d2 <= chi2_reweight, axis=1))  # reweighting
    d2 = _distance_by_column(xt, centre, _inverse(cov))
    cov = cov * _median(d2) / chi2_median
    return centre, _inverse(cov)


def pen_pixels(thumbnail: np.ndarray, tissue_px: np.ndarray, max_distance: float = 3.25, sample_px: int = 6000,
               seed: int = 0) -> np.ndarray:
    """Bool (h, w): pixels of ``thumbnail`` (uint8 RGB) whose colour is ink, relative to its ``tissue_px``."""
    darkest = channel_extremes(thumbnail)[1].astype(np.int16)
    glass = np.median(darkest[~tissue_px]) if (~tissue_px).sum() >= MIN_PIXELS else 240  # this slide's glass
    model_px = tissue_px & (darkest < glass - GLASS_MARGIN)  # glass the mask closed over is no part of the model
    # tested: the tissue and whatever is clearly darker than glass (grey ink on glass is not tissue to the mask)
    not_glass = (tissue_px | (darkest < glass - 3 * GLASS_MARGIN)) & (darkest < glass - GLASS_MARGIN)
    out = np.zeros(tissue_px.shape, dtype=bool)
    n_model = int(model_px.sum())
    if n_model < MIN_PIXELS:
        return out
    tested = colour_features(thumbnail[not_glass])  # (n, 3); the model's pixels are among them (model_px ⊆ not_glass)
    rng = np.random.default_rng(seed)
    sample = tested[model_px[not_glass]][rng.choice(n_model, min(n_model, sample_px), replace=False)]
    tissue_like = ~ink_like(sample)
    if tissue_like.sum() >= max(MIN_PIXELS, MIN_FIT_SHARE * len(sample)):
        sample = sample[tissue_like]
    sample = np.ascontiguousarray(sample.T, dtype=np.float64)  # (3, n): one row per feature
    for _ in range(ROUNDS):  # refit without what the last fit called ink: ink that shifted the first fit is found
        centre, precision = _robust_fit_columns(sample, SUPPORT, 10)
        inside = _distance_by_column(sample, centre, precision) <= max_distance ** 2
        if inside.all() or inside.sum() < MIN_PIXELS:
            break
        sample = sample.compress(inside, axis=1)
    d2 = _squared_distance(tested.astype(np.float64), centre, precision)
    # ink: ink's colour, off the tissue's core (a second lab's bluer haematoxylin brings the slide's stain close to
    # blue ink), or far from the tissue and darker than its mean (ink adds optical density: a far pixel lighter than
    # the tissue is a tissue colour the model missed, such as a second lab's pale eosin)
    out[not_glass] = ((ink_like(tested) & (d2 > INK_LIKE_DISTANCE ** 2))
                      | ((d2 > max_distance ** 2) & (tested[:, 2] > centre[2])))
    out = open_square3(out)  # strokes are wide: lone pixels are not ink
    return remove_small_objects(out, max_size=MIN_BLOB_PX - 1)  # nor are compact specks of dense nuclei


def _detector():
    from . import Detector

    return Detector("pen", "thumbnail", pixels=lambda thumb, tissue, qc: pen_pixels(thumb, tissue, qc.pen_distance),
                    tile_fraction=lambda qc: qc.pen_tile_fraction)


DETECTOR = _detector()
