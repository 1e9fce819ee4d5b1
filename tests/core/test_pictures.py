import numpy as np
import pytest
from PIL import Image

from pipeline.core.pictures import (TISSUE_MAX_LEVEL, background_cells, colormap_lut, display_factor, feature_map_rgb,
                                    save_explained_variance_png, save_feature_map_png, upscale_nearest)

FILL = -1.0


def _map3():
    fmap = np.full((4, 5, 3), FILL, np.float32)
    fmap[1, 1] = (1.0, 0.0, 0.0)
    fmap[1, 2] = (0.0, 1.0, 0.5)
    fmap[2, 3] = (1.0, 1.0, 1.0)  # the brightest possible tissue cell
    return fmap


def test_three_components_are_red_green_blue_on_white():
    rgb = feature_map_rgb(_map3(), FILL)
    assert rgb.shape == (4, 5, 3) and rgb.dtype == np.uint8
    assert (rgb[0, 0] == 255).all()  # background
    np.testing.assert_array_equal(rgb[1, 1], [TISSUE_MAX_LEVEL, 0, 0])
    np.testing.assert_array_equal(rgb[1, 2], [0, TISSUE_MAX_LEVEL, round(0.5 * TISSUE_MAX_LEVEL)])
    # a tissue cell is never confused with the white background
    assert not (rgb[2, 3] == 255).all()
    assert int((rgb == 255).all(axis=-1).sum()) == 4 * 5 - 3


def test_one_component_uses_colormap_and_two_components_leave_blue_empty():
    fmap = np.full((2, 3, 1), FILL, np.float32)
    fmap[0, 0], fmap[0, 1] = 0.0, 1.0
    rgb = feature_map_rgb(fmap, FILL)
    lut = colormap_lut("viridis")
    np.testing.assert_array_equal(rgb[0, 0], lut[0])
    np.testing.assert_array_equal(rgb[0, 1], lut[255])
    assert (rgb[1] == 255).all()
    two = feature_map_rgb(np.stack([fmap[..., 0], fmap[..., 0]], axis=-1), FILL)
    assert two[0, 1, 2] == 0 and two[0, 1, 0] == TISSUE_MAX_LEVEL


def test_nan_and_fill_are_background():
    fmap = np.zeros((2, 2, 3), np.float32)
    fmap[0, 0, 1] = np.nan
    fmap[1, 1, 2] = FILL
    np.testing.assert_array_equal(background_cells(fmap, FILL), [[True, False], [False, True]])


def test_display_factor_and_nearest_upscale():
    assert display_factor(12, 16) == 16  # capped
    assert display_factor(40, 100) == 5
    assert display_factor(3000, 2000) == 1
    img = np.arange(6, dtype=np.uint8).reshape(2, 3)
    big = upscale_nearest(img, 3)
    assert big.shape == (6, 9)
    np.testing.assert_array_equal(big[::3, ::3], img)
    np.testing.assert_array_equal(big[3:6, 6:9], np.full((3, 3), img[1, 2]))
    with pytest.raises(ValueError):
        upscale_nearest(img, 0)


def test_saved_map_png_round_trips(tmp_path):
    fmap = _map3()
    path = save_feature_map_png(tmp_path / "m.png", fmap, FILL, target_px=50)
    read = np.asarray(Image.open(path).convert("RGB"))
    factor = display_factor(4, 5, target_px=50)
    np.testing.assert_array_equal(read, upscale_nearest(feature_map_rgb(fmap, FILL), factor))
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_explained_variance_plot_marks_kept_components(tmp_path):
    ratio = np.array([0.5, 0.2, 0.1, 0.05, 0.05, 0.04, 0.03])
    path = save_explained_variance_png(tmp_path / "ev.png", ratio, kept=3)
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert img.shape == (400, 700, 3)

    def count(colour):
        return int((np.abs(img - np.array(colour)).sum(axis=-1) < 12).sum())

    # kept bars are blue (tab:blue), the others light grey, and there are far more blue pixels (50+20+10 % vs 17 %)
    blue, grey = count((31, 119, 180)), count((211, 211, 211))
    assert blue > 2 * grey > 0
    with pytest.raises(ValueError):
        save_explained_variance_png(tmp_path / "none.png", [], kept=1)
