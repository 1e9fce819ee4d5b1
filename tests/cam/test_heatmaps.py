import json
from pathlib import Path

import numpy as np
import openslide
import pytest
from matplotlib.path import Path as MplPath
from PIL import Image

from pipeline.cam.heatmaps import (CMAP_NAME, colorize, hot_region_polygons, render_scores, save_contact_sheet,
                                   save_overlay_png, write_heatmap_tiff, write_hot_regions_geojson)
from pipeline.core.pictures import colormap_lut
from pipeline.slides.tiling import TileGrid

EXPECTATIONS = Path(__file__).parent / "expectations"


def _grid(rows=12, cols=9, tile_l0=100.5, stride_l0=100.5, width=950, height=1230):
    return TileGrid(width, height, 0.25, 0.5, 50, 50, rows=rows, cols=cols, tile_l0_px=tile_l0,
                    stride_l0_px=stride_l0, read_level=0, read_downsample=1.0)


def _scores(grid):
    s = np.full(grid.shape, np.nan, dtype=np.float32)
    s[2:10, 1:8] = 0.2
    s[4:7, 3:6] = 0.9  # the hot spot
    return s


def test_render_matches_golden_array():
    grid = _grid()
    rendered = render_scores(_scores(grid), grid, 0, 0, 60, 78, 16.0)
    golden = np.load(EXPECTATIONS / "heatmap_render_16x.npy", allow_pickle=False)
    np.testing.assert_array_equal(rendered, golden)


def test_render_cells_land_on_their_tiles():
    grid = _grid()
    s = _scores(grid)
    # a level-0 pixel in the middle of tile (5, 4) takes that tile's score; beyond the grid is NaN
    x, y = 4 * 100.5 + 50, 5 * 100.5 + 50
    assert render_scores(s, grid, int(x), int(y), 1, 1, 1.0)[0, 0] == pytest.approx(0.9)
    assert np.isnan(render_scores(s, grid, 940, 1220, 1, 1, 1.0)[0, 0])


def test_colorize_background_white():
    lut = colormap_lut(CMAP_NAME)
    rgb = colorize(np.array([[np.nan, 0.0, 1.0]]), lut)
    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert rgb[0, 1].tolist() == lut[0].tolist() and rgb[0, 2].tolist() == lut[255].tolist()


def test_heatmap_tiff_opens_with_slide_size(tmp_path):
    grid = _grid()
    s = _scores(grid)
    path = write_heatmap_tiff(tmp_path / "h.tiff", s, grid, tile_px=128)
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.dimensions == (grid.slide_width_px, grid.slide_height_px)
        assert slide.level_count >= 2
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25, rel=1e-3)
        px = np.asarray(slide.read_region((int(4 * 100.5 + 50), int(5 * 100.5 + 50)), 0, (1, 1)))[0, 0, :3]
    expected = colormap_lut(CMAP_NAME)[int(0.9 * 255 + 0.5)]
    assert np.abs(px.astype(int) - expected.astype(int)).max() < 12  # JPEG
    assert [p.name for p in tmp_path.iterdir()] == ["h.tiff"]  # no temporary left behind


def test_geojson_regions_inside_slide_and_around_hot_cells(tmp_path):
    grid = _grid()
    s = _scores(grid)
    path = write_hot_regions_geojson(tmp_path / "h.geojson", s, grid, 0.6, "slide-a")
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == 1
    feature = data["features"][0]
    ring = np.array(feature["geometry"]["coordinates"][0])
    assert (ring[:, 0] >= 0).all() and (ring[:, 0] <= grid.slide_width_px).all()
    assert (ring[:, 1] >= 0).all() and (ring[:, 1] <= grid.slide_height_px).all()
    assert np.allclose(ring[0], ring[-1])
    poly = MplPath(ring)
    for r in range(4, 7):
        for c in range(3, 6):
            assert poly.contains_point((c * 100.5 + 50.25, r * 100.5 + 50.25))
    assert not poly.contains_point((1 * 100.5 + 50, 2 * 100.5 + 50))  # a cool cell
    assert feature["properties"]["measurements"]["cam_max"] == pytest.approx(0.9)


def test_hot_region_at_grid_edge_is_closed():
    grid = _grid()
    s = np.zeros(grid.shape, dtype=np.float32)
    s[0:3, 0:2] = 1.0
    (poly,) = hot_region_polygons(s, grid, 0.5)
    ring = np.array(poly["ring"])
    assert np.allclose(ring[0], ring[-1]) and ring[:, 0].min() >= 0 and ring[:, 1].min() >= 0


def test_overlay_and_contact_sheet(tmp_path):
    grid = _grid()
    thumb = np.full((77, 59, 3), 230, dtype=np.uint8)
    png = save_overlay_png(tmp_path / "a.png", thumb, _scores(grid), grid, 16.0, "true 1 / predicted 1 (p=0.93)")
    with Image.open(png) as img:
        assert img.width > 300 and img.height > 200
        pixels = np.asarray(img.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # colour bar and heat, not a blank canvas
    sheet = save_contact_sheet(tmp_path / "sheet.png", [{"image": png, "caption": f"s{i}\np=0.{i}"} for i in range(5)],
                               columns=3, cell_px=200)
    with Image.open(sheet) as img:
        assert img.size == (600, 2 * (200 + 36))
