"""Out of focus: the variance of the Laplacian of a tile's grey levels at its own resolution, below a share of the
slide's reference (the 75th percentile over its tissue tiles), so a slide's typical sharpness sets the bar.

The score runs in the describe block tasks (it needs full-resolution pixels); the decision runs when the slide is
finalised, over all its tiles' scores. A slide blurred throughout is not flagged (nothing to compare with), and
textureless tissue (fat, mucin) scores low like blur: ``qc.blur_ratio`` trades the two.
"""

from __future__ import annotations

import numpy as np

from ...core.jit import njit

MIN_TILES = 8  # fewer tiles: no reference, nothing flagged
REFERENCE_PERCENTILE = 75.0


def _laplacian_variance_numpy(tiles: np.ndarray) -> np.ndarray:
    grey = tiles.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    lap = 4 * grey[:, 1:-1, 1:-1] - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1] - grey[:, 1:-1, :-2] - grey[:, 1:-1, 2:]
    return lap.reshape(len(tiles), -1).var(axis=1)


@njit
def _laplacian_variance_kernel(tiles, out):  # pragma: no cover - compiled
    n, h, w, _ = tiles.shape
    grey = np.empty((h, w), np.float32)
    for t in range(n):
        for y in range(h):
            for x in range(w):
                grey[y, x] = 0.299 * tiles[t, y, x, 0] + 0.587 * tiles[t, y, x, 1] + 0.114 * tiles[t, y, x, 2]
        total = 0.0
        squares = 0.0
        for y in range(1, h - 1):
            for x in range(1, w - 1):
                v = 4.0 * grey[y, x] - grey[y - 1, x] - grey[y + 1, x] - grey[y, x - 1] - grey[y, x + 1]
                total += v
                squares += v * v
        count = (h - 2) * (w - 2)
        mean = total / count
        out[t] = squares / count - mean * mean


def focus_scores(tiles: np.ndarray) -> np.ndarray:
    """(n,) float32 variance of the Laplacian of each uint8 RGB tile (n, h, w, 3)."""
    tiles = np.ascontiguousarray(tiles, dtype=np.uint8)
    if len(tiles) == 0 or tiles.shape[1] < 3 or tiles.shape[2] < 3:
        return np.zeros(len(tiles), np.float32)
    if _laplacian_variance_kernel is None:
        return _laplacian_variance_numpy(tiles).astype(np.float32)
    out = np.empty(len(tiles), np.float64)
    _laplacian_variance_kernel(tiles, out)
    return out.astype(np.float32)


def blurred_tiles(scores: np.ndarray, ratio: float = 0.45) -> np.ndarray:
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
