"""Deep Zoom geometry and overlay cells: the same tiles as OpenSlide's DeepZoomGenerator, the same cell placement as
the pyramidal heatmap TIFF, and the colours of each layer."""

from __future__ import annotations

import numpy as np
import openslide
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from pipeline.cam.heatmaps import CMAP_NAME, colorize, render_scores
from pipeline.core.pictures import colormap_lut
from pipeline.view.layers import (DZ_OVERLAP_PX, DZ_TILE_PX, QC_PALETTE, TISSUE_RGB, cam_colours, cell_table,
                                  dz_level_count, dz_tile_box, feature_map_colours, render_cells, tissue_colours)

from .conftest import lesion_grid


def test_deep_zoom_tiles_match_openslide_deepzoom_generator():
    for width, height in ((1536, 1152), (1000, 3), (257, 513)):
        dz = DeepZoomGenerator(openslide.ImageSlide(Image.new("RGB", (width, height))), tile_size=DZ_TILE_PX,
                               overlap=DZ_OVERLAP_PX, limit_bounds=False)
        assert dz_level_count(width, height) == dz.level_count
        for level in range(dz.level_count):
            cols, rows = dz.level_tiles[level]
            for col, row in {(0, 0), (cols - 1, rows - 1), (cols // 2, rows // 2)}:
                x0, y0, w, h, downsample = dz_tile_box(width, height, level, col, row)
                assert (w, h) == dz.get_tile_dimensions(level, (col, row))
                assert downsample == 2 ** (dz.level_count - 1 - level)
            assert dz_tile_box(width, height, level, cols, 0) is None
        assert dz_tile_box(width, height, dz.level_count, 0, 0) is None


def test_cells_are_placed_like_the_heatmap_tiff():
    grid = lesion_grid()
    rng = np.random.default_rng(0)
    scores = np.where(rng.random(grid.shape) < 0.8, rng.random(grid.shape), np.nan)
    table = cell_table(cam_colours(scores))
    lut = colormap_lut(CMAP_NAME)
    for x0, y0, w, h, ds in ((0, 0, 255, 255, 1.0), (100, 37, 200, 90, 2.0), (0, 0, 96, 72, 16.0)):
        rgba = render_cells(table, grid, x0, y0, w, h, ds)
        scores_px = render_scores(scores, grid, x0, y0, w, h, ds)
        assert np.array_equal(rgba[..., 3] > 0, np.isfinite(scores_px))
        inside = np.isfinite(scores_px)
        assert np.array_equal(rgba[..., :3][inside], colorize(scores_px, lut)[inside])


def test_layer_colours():
    fmap = np.array([[[0.0, 0.5, 1.0], [-1.0, -1.0, -1.0]]], dtype=np.float32)
    colours = feature_map_colours(fmap)
    assert colours[0, 1, 3] == 0 and colours[0, 0, 3] == 255 and colours[0, 0, 2] > colours[0, 0, 1] > 0
    mask = np.array([[True, True, False]])
    qc = np.array([[0, 2, 0]])
    tissue = tissue_colours(mask, qc)
    assert tuple(tissue[0, 0]) == (*TISSUE_RGB, 255) and tuple(tissue[0, 1]) == (*QC_PALETTE[1], 255)
    assert tissue[0, 2, 3] == 0
    cam = cam_colours(np.array([[np.nan, 1.0]]))
    assert cam[0, 0, 3] == 0 and tuple(cam[0, 1, :3]) == tuple(colormap_lut(CMAP_NAME)[255])
