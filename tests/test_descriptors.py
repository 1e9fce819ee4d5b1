import numpy as np
import pytest
from PIL import Image
from skimage.color import rgb2hed

from pipeline.config import DescriptorConfig
from pipeline.descriptors import STATS_FEATURE_NAMES, compute_descriptors, stats_descriptors
from tests.conftest import shared_file

IDX = {name: i for i, name in enumerate(STATS_FEATURE_NAMES)}


@pytest.fixture(scope="module")
def he_tiles():
    """Four real H&E tiles (256 px crops) from the histolab fixtures."""
    names = ["high-nuclei-score-level0.png", "low-nuclei-score-level0.png",
             "tissue-level0-4302-10273-4814-10785.png", "no-tissue.png"]
    tiles = [np.asarray(Image.open(shared_file("histolab", "tiles", n)).convert("RGB"))[:256, :256] for n in names]
    return np.stack(tiles)


def test_shape_and_names(he_tiles):
    d = stats_descriptors(he_tiles)
    assert d.shape == (4, len(STATS_FEATURE_NAMES)) and d.dtype == np.float32
    assert np.isfinite(d).all()


def test_values_match_direct_numpy(he_tiles):
    d = stats_descriptors(he_tiles)
    for i, tile in enumerate(he_tiles):
        px = tile.reshape(-1, 3).astype(np.float64)
        np.testing.assert_allclose(d[i, IDX["rgb_mean_r"]:IDX["rgb_mean_b"] + 1], px.mean(0), rtol=1e-5)
        np.testing.assert_allclose(d[i, IDX["rgb_std_r"]:IDX["rgb_std_b"] + 1], px.std(0), rtol=1e-4)
        hed = rgb2hed(tile).reshape(-1, 3)  # scikit-image's float64 reference
        hed = np.maximum(hed, 0)
        np.testing.assert_allclose(d[i, IDX["hed_mean_h"]:IDX["hed_mean_d"] + 1], hed.mean(0), rtol=1e-3, atol=1e-5)
        gray = px @ np.array([0.299, 0.587, 0.114])
        np.testing.assert_allclose(d[i, IDX["gray_p50"]], np.quantile(gray, 0.5), atol=1e-3)
        od = -np.log10(np.maximum(px, 1) / 255).sum(1).mean()
        assert d[i, IDX["od_sum_mean"]] == pytest.approx(od, rel=1e-4)


def test_flat_tile_has_no_texture():
    flat = np.full((2, 32, 32, 3), (200, 150, 190), dtype=np.uint8)
    d = stats_descriptors(flat)
    assert d[0, IDX["grad_mean"]] == 0 and d[0, IDX["laplacian_abs_mean"]] == 0
    assert d[0, IDX["gray_entropy"]] == 0 and d[0, IDX["rgb_std_r"]] == 0


def test_entropy_of_two_level_tile_is_one_bit():
    tile = np.zeros((1, 16, 16, 3), dtype=np.uint8)
    tile[0, :8] = 255
    assert stats_descriptors(tile)[0, IDX["gray_entropy"]] == pytest.approx(1.0)


def test_nuclei_rich_tile_scores_higher(he_tiles):
    d = stats_descriptors(he_tiles)
    high, low, _, blank = d
    assert high[IDX["hed_mean_h"]] > low[IDX["hed_mean_h"]] > blank[IDX["hed_mean_h"]]
    assert high[IDX["nuclear_fraction"]] > blank[IDX["nuclear_fraction"]]
    assert blank[IDX["sat_mean"]] < low[IDX["sat_mean"]]


def test_batching_does_not_change_values(he_tiles):
    whole = stats_descriptors(he_tiles)
    parts = np.concatenate([stats_descriptors(he_tiles[:1]), stats_descriptors(he_tiles[1:])])
    np.testing.assert_array_equal(whole, parts)


def test_rejects_wrong_shape():
    with pytest.raises(ValueError, match="RGB tiles"):
        stats_descriptors(np.zeros((4, 4, 3), dtype=np.uint8))


def test_cnn_descriptor_is_batched_and_pooled(he_tiles):
    import keras

    keras.utils.set_random_seed(0)
    config = DescriptorConfig(name="cnn", cnn_backbone="MobileNetV2", cnn_weights=None, cnn_input_px=64)
    d = compute_descriptors(he_tiles[:, :96, :96], config)
    assert d.shape == (4, 1280) and d.dtype == np.float32 and np.isfinite(d).all()
    # same model (cached per process) and same input give the same features
    np.testing.assert_allclose(compute_descriptors(he_tiles[:2, :96, :96], config), d[:2], rtol=1e-4, atol=1e-5)
