import numpy as np
import pytest
from PIL import Image

from pipeline.core.config import TilingConfig, TissueConfig
from pipeline.slides.open import read_slide_info
from pipeline.slides.tiling import tile_grid
from pipeline.slides.tissue import optical_density, tile_tissue_fraction, tissue_mask
from tests.conftest import shared_file


def _disk_image(size=200, radius=60, colour=(200, 120, 180)):
    yy, xx = np.mgrid[:size, :size]
    disk = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < radius ** 2
    img = np.full((size, size, 3), 242, dtype=np.uint8)
    img[disk] = colour
    rng = np.random.default_rng(0)
    noisy = np.clip(img.astype(int) + rng.integers(-4, 5, img.shape), 0, 255).astype(np.uint8)
    return noisy, disk


@pytest.mark.parametrize("method", ["otsu_saturation", "otsu_od"])
def test_mask_finds_planted_disk(method):
    img, disk = _disk_image()
    mask = tissue_mask(img, TissueConfig(method=method, min_object_um2=0, min_hole_um2=0), mask_mpp=8.0)
    iou = (mask & disk).sum() / (mask | disk).sum()
    assert iou > 0.95


def test_blank_glass_gives_empty_mask():
    rng = np.random.default_rng(1)
    blank = np.clip(242 + rng.normal(0, 3, (150, 150, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask(blank, TissueConfig(), 8.0).any()


def test_small_specks_removed_and_holes_filled():
    img, disk = _disk_image(size=300, radius=100)
    img[10:13, 10:13] = (200, 100, 170)  # a 3x3 speck of dust, far from the disk
    img[148:152, 148:152] = 242  # a 4x4 hole inside the disk
    mask = tissue_mask(img, TissueConfig(min_object_um2=64 * 20, min_hole_um2=64 * 30), mask_mpp=8.0)
    assert not mask[10:13, 10:13].any()
    assert mask[148:152, 148:152].all()


def test_optical_density_of_white_is_zero():
    od = optical_density(np.array([[[255, 255, 255], [0, 0, 0]]], dtype=np.uint8))
    assert np.allclose(od[0, 0], 0) and np.allclose(od[0, 1], np.log10(255))


@pytest.mark.parametrize("name, low, high", [
    ("no-tissue.png", 0, 0.05), ("no-tissue2.png", 0, 0.05), ("no-tissue-line.png", 0, 0.05),
    ("almost-white-1.png", 0, 0.05),
    ("tissue-level0-4302-10273-4814-10785.png", 0.7, 1.0), ("tissue-level2-3000-7666-7096-11763.png", 0.7, 1.0),
])
def test_real_tiles(name, low, high):
    rgb = np.asarray(Image.open(shared_file("histolab", "tiles", name)).convert("RGB"))
    fraction = tissue_mask(rgb, TissueConfig(), mask_mpp=2.0).mean()
    assert low <= fraction <= high


def test_tile_fraction_matches_brute_force(cmu_slide):
    info = read_slide_info(cmu_slide)
    grid = tile_grid(info, TilingConfig(mpp=2.0, tile_px=64))  # tile = 256.5 level-0 px
    rng = np.random.default_rng(3)
    mask_ds = 16.0
    mask = rng.random((int(info.height_px / mask_ds), int(info.width_px / mask_ds))) > 0.5
    fraction = tile_tissue_fraction(mask, mask_ds, grid)
    assert fraction.shape == grid.shape
    for r, c in [(0, 0), (3, 5), (grid.rows - 1, grid.cols - 1)]:
        x, y, w, h = grid.tile_box_l0(r, c)
        x0, y0 = int(np.floor(x / mask_ds)), int(np.floor(y / mask_ds))
        x1, y1 = int(np.ceil((x + w) / mask_ds)), int(np.ceil((y + h) / mask_ds))
        assert fraction[r, c] == pytest.approx(mask[y0:y1, x0:x1].mean(), abs=1e-6)


def test_real_slide_mask_is_plausible(cmu_slide):
    import openslide

    from pipeline.slides.pixels import read_thumbnail

    with openslide.OpenSlide(str(cmu_slide)) as handle:
        thumb = read_thumbnail(handle, 16)
    mask = tissue_mask(thumb, TissueConfig(), mask_mpp=0.499 * 16)
    # CMU-1-Small-Region is a skin section with glass around it: some, not all, is tissue
    assert 0.2 < mask.mean() < 0.8
    # the glass corner is background
    assert not mask[:5, -5:].any()


def test_saturation_equals_scikit_image_hsv():
    from skimage import color

    from pipeline.slides.tissue import saturation

    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    rgb[:4] = 0  # black: max 0, saturation 0 (not NaN)
    rgb[4:8] = 200  # grey: saturation 0
    np.testing.assert_array_equal(saturation(rgb), color.rgb2hsv(rgb)[..., 1].astype(np.float32))


def test_saturation_in_float32_equals_float64_for_every_byte_pair():
    """The float32 division ``saturation`` uses for uint8 gives the float64 quotient cast to float32 for all 65,536
    (max, min) pairs: every pixel a uint8 image can hold."""
    from pipeline.slides.tissue import saturation

    brightest, darkest = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    keep = darkest <= brightest
    rgb = np.stack([brightest[keep], darkest[keep], darkest[keep]], axis=-1).astype(np.uint8)[None]
    hi = brightest[keep].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        reference = np.where(hi > 0, (hi - darkest[keep]) / hi, 0.0).astype(np.float32)
    np.testing.assert_array_equal(saturation(rgb)[0], reference)
    assert saturation(rgb)[0].dtype == np.float32


def test_tile_tissue_fraction_integer_sums_equal_float_sums(cmu_slide):
    """A boolean mask and the same mask as float64 (summed in floats) give the same fractions, bit for bit."""
    info = read_slide_info(cmu_slide)
    grid = tile_grid(info, TilingConfig(mpp=2.0, tile_px=64))
    mask_ds = 16.0
    mask = np.random.default_rng(4).random((int(info.height_px / mask_ds), int(info.width_px / mask_ds))) > 0.6
    as_bool = tile_tissue_fraction(mask, mask_ds, grid)
    as_float = tile_tissue_fraction(mask.astype(np.float64), mask_ds, grid)
    assert as_bool.shape == grid.shape and as_bool.dtype == np.float32
    np.testing.assert_array_equal(as_bool, as_float)
    assert 0.3 < float(as_bool.mean()) < 0.5
