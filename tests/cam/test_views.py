"""A slide's CAM on its tile grid: index geometry, windows, reference maps, smoothing, Augmented Grad-CAM,
fold models."""

import numpy as np
import pytest

from pipeline.cam.gradients import gradcam, split_model
from pipeline.cam.views import (augmented_slide_cam, cell_index_image, cells_from_input, map_windows, reference_map,
                                slide_cam, smooth_cam, window_origins)
from pipeline.core.config import TrainConfig
from pipeline.core.maps import FEATURE_MAP_FILL, select_channels
from pipeline.model.inputs import dihedral, fit_size, to_input, undo_dihedral


@pytest.mark.parametrize("strategy", ["resize", "pad", "crop", "native"])
def test_index_geometry_undoes_each_size_strategy(strategy):
    """An input-sized 'CAM' equal to each pixel's cell index maps back to exactly that index per cell."""
    cfg = TrainConfig(recipe="finetune", size_strategy=strategy, input_px=80)
    rows, cols = 13, 21
    index = fit_size(cell_index_image(rows, cols), cfg)
    cam_input = np.where(index[..., 0] >= 0, index[..., 0], 1e6)  # padding would poison the mean if kept
    sums, counts = cells_from_input(cam_input, index, rows * cols)
    seen = counts > 0
    np.testing.assert_allclose(sums[seen] / counts[seen], np.arange(rows * cols)[seen])
    assert seen.all()  # every cell of a small map is visible in every strategy


def test_windows_cover_large_maps():
    assert window_origins(10, 16, 0.5) == [0]
    starts = window_origins(100, 32, 0.5)
    assert starts[0] == 0 and starts[-1] == 68 and all(b - a <= 16 for a, b in zip(starts, starts[1:]))
    wins = map_windows(250, 120, TrainConfig(recipe="finetune", size_strategy="crop", input_px=80), 0.5)
    assert len(wins) == 6 * 2  # rows start 0,40,..,160,170; cols 0,40
    covered = np.zeros((250, 120), dtype=int)
    for r0, r1, c0, c1 in wins:
        covered[r0:r1, c0:c1] += 1
    assert covered.min() >= 1
    assert map_windows(250, 120, TrainConfig(recipe="finetune", size_strategy="resize"), 0.5) == [(0, 250, 0, 120)]


def test_window_mosaic_equals_single_window_on_same_input(small_model):
    model, _ = small_model
    cam_model = split_model(model, "mixed2")
    rng = np.random.default_rng(2)
    fmap = rng.uniform(0, 1, (96, 96, 1)).astype(np.float32)
    fmap[:10, :10] = FEATURE_MAP_FILL
    crop_cfg = TrainConfig(recipe="finetune", size_strategy="crop", input_px=96)
    mosaic, probs, cls = slide_cam(cam_model, fmap, crop_cfg, class_index=0)
    single, _ = gradcam(cam_model, to_input(select_channels(fmap, "replicate"))[None], 0)
    assert cls == 0 and probs.shape == (2,)
    tissue = np.isfinite(mosaic)
    assert tissue.sum() == 96 * 96 - 100
    ref = single[0].copy()
    ref[:10, :10] = np.nan
    np.testing.assert_allclose(mosaic[tissue], (ref / np.nanmax(ref))[tissue], rtol=1e-4, atol=1e-6)


def test_slide_cam_on_large_map_blends_windows(small_model):
    model, _ = small_model
    rng = np.random.default_rng(3)
    fmap = rng.uniform(0, 1, (150, 110, 1)).astype(np.float32)
    cam, probs, cls = slide_cam(split_model(model, "mixed2"), fmap,
                                TrainConfig(recipe="finetune", size_strategy="crop", input_px=96))
    assert cam.shape == (150, 110) and np.isfinite(cam).all()
    assert cam.min() >= 0 and cam.max() == pytest.approx(1.0)
    assert cls in (0, 1) and probs.sum() == pytest.approx(1.0, rel=1e-4)


def test_reference_map_keeps_the_outline_and_flattens_the_tissue():
    ch = np.full((4, 5, 3), FEATURE_MAP_FILL, dtype=np.float32)
    ch[1:3, 1:4] = np.arange(18, dtype=np.float32).reshape(2, 3, 3) / 17
    ref = reference_map(ch)
    np.testing.assert_array_equal(ref[0], ch[0])  # background untouched
    np.testing.assert_allclose(ref[1:3, 1:4], np.broadcast_to(np.median(ch[1:3, 1:4].reshape(-1, 3), axis=0), (2, 3, 3)))


def test_reference_cam_is_zero_on_the_reference_itself(small_model):
    """A map whose tissue is uniform equals its own reference: no position differs, so the CAM is all zero."""
    model, _ = small_model
    fmap = np.full((20, 24, 1), FEATURE_MAP_FILL, dtype=np.float32)
    fmap[3:17, 4:20] = 0.4
    cam, _, _ = slide_cam(split_model(model, "mixed2"), fmap, TrainConfig(recipe="finetune", size_strategy="resize", input_px=96),
                          reference=True)
    tissue = fmap[..., 0] >= 0
    assert np.isnan(cam[~tissue]).all() and (cam[tissue] == 0).all()


def test_smooth_cam_stays_in_tissue_and_keeps_a_flat_cam_flat():
    cam = np.full((9, 11), np.nan, dtype=np.float32)
    cam[2:7, 3:9] = 0.5
    flat = smooth_cam(cam, 1.0)
    np.testing.assert_array_equal(np.isnan(flat), np.isnan(cam))
    np.testing.assert_allclose(flat[2:7, 3:9], 1.0, rtol=1e-6)  # constant within tissue, peak renormalised to 1
    spike = cam.copy()
    spike[4, 5] = 1.0
    smoothed = smooth_cam(spike, 1.0)
    assert np.unravel_index(np.nanargmax(smoothed), cam.shape) == (4, 5) and smoothed[4, 6] > smoothed[4, 8]
    assert smooth_cam(spike, 0.0) is spike


def test_augmented_cam_is_the_mean_of_the_eight_turned_back_cams(small_model):
    model, cfg = small_model
    cam_model = split_model(model, "mixed2")
    rng = np.random.default_rng(5)
    fmap = np.full((21, 26, 1), FEATURE_MAP_FILL, dtype=np.float32)
    fmap[2:19, 3:24] = rng.uniform(0, 1, (17, 21, 1))
    cam, probs, cls = augmented_slide_cam(cam_model, fmap, cfg)
    plain, plain_probs, plain_cls = slide_cam(cam_model, fmap, cfg)
    assert cls == plain_cls and np.allclose(probs, plain_probs)
    turned = [plain] + [undo_dihedral(slide_cam(cam_model, dihedral(fmap, k), cfg, cls)[0], k)
                        for k in range(1, 8)]
    expected = np.mean(turned, axis=0)
    np.testing.assert_array_equal(np.isnan(cam), np.isnan(plain))
    np.testing.assert_allclose(cam, expected / np.nanmax(expected), rtol=1e-5, atol=1e-6)


def test_fold_models_explain_one_class_chosen_from_their_mean_probabilities(small_model):
    """k-fold: the class is picked once from the averaged probabilities, not by each fold model for itself."""
    import keras

    from pipeline.cam.views import _nan_mean, slide_cam_with_models
    from pipeline.core.config import CamConfig

    model, cfg = small_model
    folds = []
    for bias in ([0.0, 3.0], [1.0, 0.0]):  # the first fold says class 1 firmly, the second class 0 weakly
        fold = keras.models.clone_model(model)
        fold.set_weights(model.get_weights())
        dense = fold.get_layer("head_dense")
        dense.bias.assign(np.asarray(bias, dtype=np.float32))
        folds.append(split_model(fold, "mixed2"))
    rng = np.random.default_rng(2)
    fmap = np.full((18, 22, 1), FEATURE_MAP_FILL, dtype=np.float32)
    fmap[2:16, 3:20] = rng.uniform(0, 1, (14, 17, 1))
    own = [slide_cam(cm, fmap, cfg) for cm in folds]
    assert [cls for *_, cls in own] == [1, 0]  # on their own the folds disagree
    cam_cfg = CamConfig(augment=False, smooth_cells=0, reference=True)  # the reference path too
    cam, probs, cls = slide_cam_with_models(folds, fmap, cfg, cam_cfg)
    np.testing.assert_allclose(probs, np.mean([p for _, p, _ in own], axis=0), rtol=1e-5)
    assert cls == int(probs.argmax()) == 1
    expected = _nan_mean([slide_cam(cm, fmap, cfg, class_index=cls, reference=True)[0] for cm in folds])
    np.testing.assert_allclose(cam, expected, rtol=1e-5, atol=1e-6)


def test_cam_explains_the_class_predict_reports_with_tta(small_model):
    """With ``train.tta`` the predictions average the eight flips/rotations: the CAM's probabilities (and so the class
    it explains) are those, not the untransformed map's alone (they disagreed on 3 of 108 test slides of a run)."""
    from pipeline.cam.views import slide_cam_with_models
    from pipeline.core.config import CamConfig
    from pipeline.model.batches import predict_proba

    import keras

    model, cfg = small_model
    cfg = cfg.model_copy(update={"tta": True})
    model = keras.models.clone_model(model)
    model.set_weights(small_model[0].get_weights())
    dense = model.get_layer("head_dense")
    dense.kernel.assign(dense.kernel * 1000.0)  # a random head says ~0.5 everywhere: make the transforms disagree
    rng = np.random.default_rng(4)
    fmap = np.full((19, 23, 1), FEATURE_MAP_FILL, dtype=np.float32)
    fmap[2:17, 3:21] = rng.uniform(0, 1, (15, 18, 1))
    _, probs, cls = slide_cam_with_models([split_model(model, "mixed2")], fmap, cfg, CamConfig(smooth_cells=0))
    expected = predict_proba(model, [fmap], cfg)[0]
    np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-5)
    assert cls == int(expected.argmax())
    untransformed = predict_proba(model, [fmap], cfg, tta=False)[0]
    assert np.abs(untransformed - expected).max() > 1e-3  # the untransformed map alone gives other figures


def test_cam_is_left_out_on_cells_qc_excluded_and_filled_in_the_map(small_model):
    """A map's QC-excluded cells hold their neighbours' values (core.maps.fill_excluded_cells): the CAM gives them
    no value of their own (NaN, as glass) and peaks at 1 on the described cells."""
    from pipeline.cam.views import slide_cam_with_models
    from pipeline.core.config import CamConfig

    model, cfg = small_model
    rng = np.random.default_rng(5)
    fmap = np.full((19, 23, 1), FEATURE_MAP_FILL, dtype=np.float32)
    fmap[2:17, 3:21] = rng.uniform(0, 1, (15, 18, 1))
    described = fmap[..., 0] != FEATURE_MAP_FILL
    excluded = np.zeros_like(described)
    excluded[6:9, 8:12] = True  # a pen stroke's cells, filled in the map
    cam_cfg = CamConfig(smooth_cells=1.0)
    full, _, cls = slide_cam_with_models([split_model(model, "mixed2")], fmap, cfg, cam_cfg)
    cam, _, cls2 = slide_cam_with_models([split_model(model, "mixed2")], fmap, cfg, cam_cfg,
                                         described=described & ~excluded)
    assert cls == cls2 and np.isfinite(full[excluded]).all()
    assert np.isnan(cam[excluded]).all() and np.isnan(cam[~described]).all()
    assert np.isfinite(cam[described & ~excluded]).all() and np.nanmax(cam) == pytest.approx(1.0)
