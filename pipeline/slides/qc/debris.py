"""Debris: near-black (dirt, dust, burnt tissue) or near-white (bubbles, holes the tissue mask closed) pixels of the
tissue mask, on the thumbnail (such debris is as large as tiles or larger; a speck inside a tile is not worth losing
it)."""

from __future__ import annotations

import numpy as np

from ..tissue import channel_extremes


def debris_pixels(thumbnail: np.ndarray, tissue_px: np.ndarray, black_max: int = 40,
                  white_min: int = 225) -> np.ndarray:
    """Bool (h, w): tissue-mask pixels whose brightest channel is <= ``black_max`` or darkest >= ``white_min``."""
    brightest, darkest = channel_extremes(thumbnail)
    return tissue_px & ((brightest <= black_max) | (darkest >= white_min))


def _detector():
    from . import Detector

    return Detector("debris", "thumbnail", pixels=lambda thumb, tissue, qc: debris_pixels(thumb, tissue),
                    tile_fraction=lambda qc: qc.debris_tile_fraction)


DETECTOR = _detector()
