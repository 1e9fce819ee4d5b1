import numpy as np
import pytest
from PIL import Image
from skimage.color import rgb2hed

from pipeline.core.config import DescriptorConfig
from pipeline.describe.descriptors import compute_descriptors, stats_descriptors
from pipeline.describe.stats import STATS_FEATURE_NAMES, stats_descriptors_numpy
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


def _numpy_reference(tiles):
    out = np.empty((tiles.shape[0], len(STATS_FEATURE_NAMES)))
    with np.errstate(invalid="ignore", divide="ignore"):
        stats_descriptors_numpy(tiles, out)
    return out.astype(np.float32)


@pytest.fixture(scope="module")
def aperio_tiles(cmu_slide):
    """Twelve 256-px tiles of the real Aperio slide (JPEG, ~0.5 µm/px) as OpenSlide decodes them."""
    import openslide

    with openslide.OpenSlide(str(cmu_slide)) as slide:
        regions = [np.asarray(slide.read_region((x, y), 0, (256, 256)).convert("RGB"))
                   for y in (300, 900, 1500, 2100) for x in (200, 900, 1600)]
    return np.stack(regions)


def test_compiled_kernel_equals_the_numpy_reference(he_tiles, aperio_tiles):
    """The numba kernel (vectorised rows, bucket-select percentiles) against the plain numpy definitions, on real
    tiles and on the shapes that stress it: odd sizes, 1-2 px edges, flat tiles, a mostly-white tile, skewed values."""
    import pipeline.describe.stats_kernel as K

    assert K.stats_kernel is not None  # numba is a dependency: the fast path must be the one in use
    rng = np.random.default_rng(0)
    white = np.full((2, 64, 64, 3), 242, np.uint8)
    white[:, 20:30, 10:50] = rng.integers(60, 200, (2, 10, 40, 3), dtype=np.uint8)
    skewed = (rng.random((2, 48, 40, 3)) ** 6 * 255).astype(np.uint8)
    cases = [he_tiles, aperio_tiles, rng.integers(0, 256, (3, 37, 53, 3), dtype=np.uint8), np.full((2, 32, 32, 3), 77, np.uint8),
             rng.integers(0, 256, (2, 2, 2, 3), dtype=np.uint8), rng.integers(0, 256, (2, 1, 5, 3), dtype=np.uint8),
             rng.integers(0, 256, (2, 1, 1, 3), dtype=np.uint8), white, skewed]
    for tiles in cases:
        fast = stats_descriptors(tiles)
        reference = _numpy_reference(tiles)
        np.testing.assert_array_equal(np.isnan(fast), np.isnan(reference))
        np.testing.assert_allclose(fast, reference, rtol=2e-6, atol=1e-6, err_msg=str(tiles.shape))
        # percentiles are exact selections, not approximations
        pct = [IDX[k] for k in ("hed_p90_h", "gray_p10", "gray_p50", "gray_p90", "grad_p90")]
        np.testing.assert_array_equal(fast[:, pct], reference[:, pct])


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


def test_stain_matrix_is_scikit_images_in_float32():
    """The descriptors' Ruifrok & Johnston matrix is scikit-image's ``hed_from_rgb``, in float32."""
    from skimage.color import hed_from_rgb

    from pipeline.describe.stats import HED_MATRIX

    assert HED_MATRIX.dtype == np.float32
    np.testing.assert_array_equal(HED_MATRIX, hed_from_rgb.astype(np.float32))
