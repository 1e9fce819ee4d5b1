"""Out of focus: the energy of the Laplacian of a tile's grey levels at its own resolution over their variance (both
over the stained pixels: glass between loose tissue is left out, and pale low-contrast tissue that is sharp keeps its
ratio, while blur removes fine detail far more than contrast), below a share of the slide's reference (the 75th
percentile over its tissue tiles), so a slide's typical sharpness sets the bar.

The score runs in the describe block tasks (it needs full-resolution pixels); the decision runs when the slide is
finalised, over all its tiles' scores. A slide blurred throughout is not flagged (nothing to compare with), and
textureless tissue (fat, mucin) scores low like blur: ``qc.blur_ratio`` trades the two.
"""

from __future__ import annotations

import numpy as np

from ...core.jit import njit

MIN_TILES = 8  # fewer tiles: no reference, nothing flagged
REFERENCE_PERCENTILE = 75.0


GLASS_GREY = 215.0  # pixels at least this bright are glass: left out of the score (sparse tissue is not blur)
MIN_STAINED = 0.05  # a tile with fewer stained pixels has no score (NaN: never flagged)


def _laplacian_variance_numpy(tiles: np.ndarray) -> np.ndarray:
    grey = tiles.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    centre = grey[:, 1:-1, 1:-1]
    lap = 4 * centre - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1] - grey[:, 1:-1, :-2] - grey[:, 1:-1, 2:]
    flat = centre.reshape(len(tiles), -1).astype(np.float64)
    stained = flat < GLASS_GREY
    count = np.maximum(stained.sum(axis=1), 1)
    energy = np.where(stained, (lap * lap).reshape(len(tiles), -1), 0).sum(axis=1) / count
    mean = np.where(stained, flat, 0).sum(axis=1) / count
    variance = np.where(stained, flat * flat, 0).sum(axis=1) / count - mean * mean
    score = energy / np.maximum(variance, 1.0)
    return np.where(stained.sum(axis=1) >= MIN_STAINED * stained.shape[1], score, np.nan)


@njit
def _laplacian_variance_kernel(tiles, out, glass, min_share):  # pragma: no cover - compiled
    n, h, w, _ = tiles.shape
    grey = np.empty((h, w), np.float32)
    for t in range(n):
        for y in range(h):
            for x in range(w):
                grey[y, x] = 0.299 * tiles[t, y, x, 0] + 0.587 * tiles[t, y, x, 1] + 0.114 * tiles[t, y, x, 2]
        squares = 0.0
        total = 0.0
        total2 = 0.0
        count = 0
        for y in range(1, h - 1):
            for x in range(1, w - 1):
                g = grey[y, x]
                if g < glass:
                    v = 4.0 * g - grey[y - 1, x] - grey[y + 1, x] - grey[y, x - 1] - grey[y, x + 1]
                    squares += v * v
                    total += g
                    total2 += g * g
                    count += 1
        if count == 0 or count < min_share * (h - 2) * (w - 2):
            out[t] = np.nan
        else:
            mean = total / count
            out[t] = (squares / count) / max(total2 / count - mean * mean, 1.0)


def focus_scores(tiles: np.ndarray) -> np.ndarray:
    """(n,) float32 mean squared Laplacian / variance of the grey levels over the stained pixels of each uint8 RGB
    tile (n, h, w, 3); NaN for a tile that is nearly all glass."""
    tiles = np.ascontiguousarray(tiles, dtype=np.uint8)
    if len(tiles) == 0 or tiles.shape[1] < 3 or tiles.shape[2] < 3:
        return np.full(len(tiles), np.nan, np.float32)
    if _laplacian_variance_kernel is None:
        return _laplacian_variance_numpy(tiles).astype(np.float32)
    out = np.empty(len(tiles), np.float64)
    _laplacian_variance_kernel(tiles, out, GLASS_GREY, MIN_STAINED)
    return out.astype(np.float32)


def blurred_tiles(scores: np.ndarray, ratio: float = 0.3) -> np.ndarray:
    """Bool (n,): scores below ``ratio`` x the reference of these scores (a slide's tissue tiles)."""
    scores = np.asarray(scores, dtype=np.float64)
    valid = np.isfinite(scores)
    if valid.sum() < MIN_TILES:
        return np.zeros(scores.shape, dtype=bool)
    reference = np.percentile(scores[valid], REFERENCE_PERCENTILE)
    return valid & (scores < ratio * reference)


def _detector():
    from . import Detector

    return Detector("blur", "tile", score=focus_scores, decide=lambda scores, qc: blurred_tiles(scores, qc.blur_ratio))


DETECTOR = _detector()
