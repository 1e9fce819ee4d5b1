"""Marker ink: thumbnail pixels whose colour lies far from the slide's own tissue colours.

Features per pixel: optical-density chromaticity (two numbers, the hue of what absorbs) and log total optical density
(darkness). A robust covariance (scikit-learn's MinCovDet, half the pixels at most count as outliers) of a sample of
the slide's tissue pixels models its stain; a pixel further than ``max_distance`` (Mahalanobis) is ink. Relative to
the slide, so a second lab's stain is not ink; blue, green and red inks move the chromaticity, black ink the darkness.
Runs on the tissue-mask thumbnail (8 µm/px): strokes are tens of pixels wide there and averaging over nuclei steadies
the tissue colours (docs/design/qc.md has the measurements).
"""

from __future__ import annotations

import numpy as np

MIN_PIXELS = 50  # fewer tissue pixels: no colour model, nothing flagged
GLASS_MIN = 225  # pixels whose darkest channel is at least this bright are glass, not ink


def colour_features(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) float32: OD chromaticity red-green, OD chromaticity blue, log of the total optical density."""
    od = -np.log(np.clip(rgb.astype(np.float32), 1.0, 255.0) / 255.0)
    total = od.sum(axis=-1)
    chroma = od / np.maximum(total, 1e-3)[..., None]
    return np.stack([chroma[..., 0] - chroma[..., 1], chroma[..., 2], np.log(total + 1e-3)], axis=-1)


def pen_pixels(thumbnail: np.ndarray, tissue_px: np.ndarray, max_distance: float = 4.0, sample_px: int = 5000,
               seed: int = 0) -> np.ndarray:
    """Bool (h, w): tissue-mask pixels of ``thumbnail`` (uint8 RGB) whose colour is ink."""
    from scipy.ndimage import binary_opening
    from sklearn.covariance import MinCovDet

    features = colour_features(thumbnail)
    tissue_px = tissue_px & (thumbnail.min(axis=-1) < GLASS_MIN)  # glass the mask closed over is no colour model
    candidates = features[tissue_px]
    out = np.zeros(tissue_px.shape, dtype=bool)
    if len(candidates) < MIN_PIXELS:
        return out
    rng = np.random.default_rng(seed)
    sample = candidates[rng.choice(len(candidates), min(len(candidates), sample_px), replace=False)]
    model = MinCovDet(random_state=seed).fit(sample.astype(np.float64))
    distance = np.sqrt(model.mahalanobis(candidates.astype(np.float64)))
    out[tissue_px] = distance > max_distance
    return binary_opening(out, structure=np.ones((3, 3), bool))  # strokes are wide; lone outlier pixels are not ink


def _detector():
    from . import Detector

    return Detector("pen", "thumbnail", pixels=lambda thumb, tissue, qc: pen_pixels(thumb, tissue, qc.pen_distance),
                    tile_fraction=lambda qc: qc.pen_tile_fraction)


DETECTOR = _detector()
