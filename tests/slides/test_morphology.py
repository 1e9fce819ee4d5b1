"""The tissue/ink mask morphology gives scikit-image's and scipy.ndimage's results exactly (random masks, real and
generated thumbnails), so describe need import neither skimage.morphology nor scipy.ndimage."""

import numpy as np
import pytest
from skimage import filters, morphology

from pipeline.core.config import TissueConfig
from pipeline.slides import morphology as ours
from pipeline.slides.open import open_handle
from pipeline.slides.tissue import saturation, tissue_mask
from tests.conftest import write_test_slide


def _masks(rng):
    for shape in ((40, 50), (97, 131), (1, 30)):
        for density in (0.2, 0.5, 0.8):
            noise = rng.random(shape)
            yield noise < density
            yield np.kron(noise < density, np.ones((3, 3), bool))[: shape[0] * 2, : shape[1] * 2]
        yield np.ones(shape, bool)
        yield np.zeros(shape, bool)
    yield np.pad(np.ones((3, 3), bool), ((0, 20), (0, 20)))  # a blob in a corner: closing must not leak outside


def test_morphology_equals_skimage():
    rng = np.random.default_rng(0)
    for mask in _masks(rng):
        for radius in (1, 2, 5):
            np.testing.assert_array_equal(ours.close_disk(mask, radius),
                                          morphology.closing(mask, morphology.disk(radius)).astype(bool))
        for size in (0, 1, 3, 12, 200):
            np.testing.assert_array_equal(ours.remove_small_objects(mask, size),
                                          morphology.remove_small_objects(mask, max_size=size))
            np.testing.assert_array_equal(ours.remove_small_holes(mask, size),
                                          morphology.remove_small_holes(mask, max_size=size))
    np.testing.assert_array_equal(ours.disk(4), morphology.disk(4).astype(bool))


def test_labelling_and_opening_equal_scipy_and_the_fallback(monkeypatch):
    """The compiled 4-connected labelling gives scipy.ndimage.label's partition (labels differ, components equal,
    spirals and checkerboards included) and ``open_square3`` scipy's binary_opening; without numba the scipy path."""
    from scipy import ndimage

    rng = np.random.default_rng(3)
    spiral = np.zeros((41, 41), bool)
    for k in range(0, 20, 2):  # nested square rings joined by one gap each: one long winding component
        spiral[k, k:41 - k] = spiral[40 - k, k:41 - k] = spiral[k:41 - k, k] = spiral[k:41 - k, 40 - k] = True
        spiral[k + 1, k] = k + 1 < 20
    checker = (np.add.outer(np.arange(31), np.arange(17)) % 2).astype(bool)
    masks = [*_masks(rng), spiral, checker, ~checker, rng.random((300, 257)) < 0.55]
    for mask in masks:
        ours_labels = ours.component_labels(mask)
        theirs, n = ndimage.label(mask, ndimage.generate_binary_structure(2, 1))
        assert ((ours_labels > 0) == mask).all()
        pairs = np.unique(np.stack([ours_labels[mask], theirs[mask]]), axis=1)
        assert pairs.shape[1] == n == len(np.unique(ours_labels[mask]))  # a one-to-one map between the labellings
        np.testing.assert_array_equal(ours.open_square3(mask),
                                      ndimage.binary_opening(mask, structure=np.ones((3, 3), bool)))
    monkeypatch.setattr(ours, "_label4_kernel", None)
    np.testing.assert_array_equal(ours.remove_small_objects(masks[-1], 5),
                                  morphology.remove_small_objects(masks[-1], max_size=5))


def test_both_closings_agree_around_the_switch(monkeypatch):
    """Shifted copies (small radii) and distance transforms (large radii) give the same closing, and scikit-image's
    on each side of ``SHIFT_RADIUS_MAX`` (lowered here: scikit-image's closing with a large disk is slow)."""
    rng = np.random.default_rng(2)
    masks = [np.kron(rng.random((30, 40)) < d, np.ones((4, 4), bool)) for d in (0.05, 0.4, 0.9)]
    shifted = {(i, r): ours.close_disk(m, r) for i, m in enumerate(masks) for r in (0, 1, 3, 7, 12)}
    monkeypatch.setattr(ours, "SHIFT_RADIUS_MAX", 3)
    for mask in masks:
        for radius in (3, 4):
            np.testing.assert_array_equal(ours.close_disk(mask, radius),
                                          morphology.closing(mask, morphology.disk(radius)).astype(bool))
    monkeypatch.setattr(ours, "SHIFT_RADIUS_MAX", -1)
    for (i, radius), expected in shifted.items():
        np.testing.assert_array_equal(ours.close_disk(masks[i], radius), expected)


def test_otsu_equals_skimage():
    rng = np.random.default_rng(1)
    samples = [rng.random((60, 70)).astype(np.float32), rng.normal(0, 1, (33, 9)),
               np.concatenate([rng.normal(0.1, 0.02, 500), rng.normal(0.6, 0.1, 300)]).astype(np.float32),
               np.full((5, 5), 0.25, np.float32)]
    for values in samples:
        assert ours.otsu_threshold(values) == pytest.approx(filters.threshold_otsu(values), rel=1e-6, abs=1e-9)


def test_tissue_masks_of_slides_are_unchanged(cmu_slide, tmp_path):
    """The whole tissue mask (threshold, closing, specks, holes) against the same steps in scikit-image."""
    generated = write_test_slide(tmp_path / "gen.svs", width=2048, height=1536, seed=3)
    config = TissueConfig()
    for path, mask_mpp in ((cmu_slide, 8.0), (generated, 4.0)):
        handle, _ = open_handle(path)
        level = handle.level_count - 1
        rgb = np.asarray(handle.read_region((0, 0), level, handle.level_dimensions[level]).convert("RGB"))
        handle.close()
        signal = saturation(rgb)
        expected = signal > max(float(filters.threshold_otsu(signal)), config.min_saturation)
        expected = morphology.closing(expected, morphology.disk(int(round(config.closing_um / mask_mpp)))).astype(bool)
        expected = morphology.remove_small_objects(expected, max_size=int(config.min_object_um2 / mask_mpp ** 2) - 1)
        expected = morphology.remove_small_holes(expected, max_size=int(config.min_hole_um2 / mask_mpp ** 2) - 1)
        mask = tissue_mask(rgb, config, mask_mpp)
        assert 0.05 < mask.mean() < 0.95
        np.testing.assert_array_equal(mask, expected)
