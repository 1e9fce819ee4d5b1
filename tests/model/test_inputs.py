"""The channel adapter, network inputs, map sizes, augmentation and batches: numpy, fast."""

import numpy as np
import pytest

from pipeline.core.config import TrainConfig
from pipeline.core.errors import ModelError
from pipeline.core.maps import FEATURE_MAP_FILL, select_channels
from pipeline.model.batches import MapBatches
from pipeline.model.inputs import (TISSUE_INPUT_LOW, add_noise, bucket_shape, dihedral, fit_size, random_crop_fraction,
                                   resize_nearest, to_input, undo_dihedral)


def rng():
    return np.random.default_rng(0)


def tissue_map(rows=20, cols=30, k=3, seed=0):
    r = np.random.default_rng(seed)
    fmap = r.uniform(0, 1, size=(rows, cols, k)).astype(np.float32)
    fmap[:3] = FEATURE_MAP_FILL  # background band
    return fmap


def test_replicate_and_components():
    fmap = tissue_map(k=3)
    rep = select_channels(fmap, "replicate", component=1)
    assert rep.shape == (20, 30, 3)
    assert np.array_equal(rep[..., 0], rep[..., 2]) and np.array_equal(rep[5:, :, 0], fmap[5:, :, 1])
    comp = select_channels(fmap, "components")
    assert np.array_equal(comp[5:], fmap[5:]) and (comp[:3] == FEATURE_MAP_FILL).all()


def test_adapter_errors_name_the_fix():
    with pytest.raises(ModelError, match="reduce.components: 3"):
        select_channels(tissue_map(k=1), "components")
    with pytest.raises(ModelError, match="component 2 does not exist"):
        select_channels(tissue_map(k=2), "replicate", component=2)


def test_scaling_to_inception_range():
    x = np.array([[[0.0], [1.0], [0.5], [FEATURE_MAP_FILL]]], dtype=np.float32)
    out = to_input(x)[0, :, 0]
    assert out.tolist() == pytest.approx([TISSUE_INPUT_LOW, 1.0, (TISSUE_INPUT_LOW + 1) / 2, -1.0])
    assert out.min() >= -1 and out.max() <= 1
    assert out[0] > out[3]  # the lowest tissue value stays distinct from background


def test_nan_cells_are_background():
    fmap = tissue_map(k=1)
    fmap[10, 10] = np.nan
    assert select_channels(fmap, "replicate")[10, 10, 0] == FEATURE_MAP_FILL


def test_resize_keeps_cells_as_blocks():
    x = np.arange(6, dtype=np.float32).reshape(2, 3, 1)
    out = resize_nearest(x, 4, 6)
    assert out.shape == (4, 6, 1) and set(np.unique(out)) == set(range(6))
    assert (out[:2, :2] == 0).all() and (out[2:, 4:] == 5).all()


@pytest.mark.parametrize("strategy", ["resize", "pad", "crop", "native"])
def test_each_size_strategy_shape(strategy):
    cfg = TrainConfig(recipe="finetune", size_strategy=strategy, input_px=96, native_bucket_px=16)
    small = select_channels(tissue_map(20, 30), "replicate")
    big = select_channels(tissue_map(150, 120, seed=1), "replicate")
    for x in (small, big):
        out = fit_size(x, cfg, rng())
        if strategy == "native":
            assert out.shape[0] >= 75 and out.shape[1] >= 75
            if x is big:
                assert out.shape[:2] == x.shape[:2]  # no resizing at the native scale
        else:
            assert out.shape == (96, 96, 3)
        # the values are map values or background: nearest neighbour never blends
        assert set(np.unique(out)) <= set(np.unique(x)) | {FEATURE_MAP_FILL}


def test_pad_keeps_aspect_ratio_and_whole_cells():
    cfg = TrainConfig(recipe="finetune", size_strategy="pad", input_px=96)
    x = np.zeros((20, 40, 3), np.float32)  # all tissue, value 0
    out = fit_size(x, cfg)
    tissue = out[..., 0] >= 0
    rows, cols = np.where(tissue.any(1))[0], np.where(tissue.any(0))[0]
    assert (len(rows), len(cols)) == (40, 80)  # enlarged by 2 (largest whole factor), aspect kept, centred
    assert rows[0] == 28 and cols[0] == 8


def test_crop_random_in_training_central_otherwise():
    cfg = TrainConfig(recipe="finetune", size_strategy="crop", input_px=75)
    x = select_channels(tissue_map(200, 200), "replicate")
    central = fit_size(x, cfg)
    assert np.array_equal(central, x[62:137, 62:137])
    draws = {fit_size(x, cfg, np.random.default_rng(s)).tobytes() for s in range(4)}
    assert len(draws) > 1


def test_native_shrinks_huge_maps_and_buckets():
    cfg = TrainConfig(recipe="finetune", size_strategy="native", native_max_px=100, native_bucket_px=32)
    x = select_channels(tissue_map(250, 90), "replicate")
    out = fit_size(x, cfg)
    assert max(out.shape[:2]) <= 100 and out.shape[:2] == (84, 75)  # /3, then width padded to 75
    assert bucket_shape(250, 90, cfg) == (96, 96)


def test_eight_distinct_dihedral_transforms():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    outs = [dihedral(x, k) for k in range(8)]
    assert np.array_equal(outs[0], x)
    assert len({(o.shape, o.tobytes()) for o in outs}) == 8
    for o in outs:
        assert sorted(o.ravel().tolist()) == sorted(x.ravel().tolist())
    for k, o in enumerate(outs):
        np.testing.assert_array_equal(undo_dihedral(o, k), x)  # turned back onto the map (augmented CAMs)


def test_noise_and_crop_respect_background():
    x = select_channels(tissue_map(), "replicate")
    noisy = add_noise(x, rng(), 0.1)
    bg = x[..., 0] < 0
    assert np.array_equal(noisy[bg], x[bg])
    assert not np.array_equal(noisy[~bg], x[~bg]) and noisy[~bg].min() >= 0 and noisy[~bg].max() <= 1
    crop = random_crop_fraction(x, rng(), 0.8)
    assert 16 <= crop.shape[0] <= 20 and 24 <= crop.shape[1] <= 30


def test_batches_fixed_size_augmented_and_reproducible():
    cfg = TrainConfig(recipe="finetune", input_px=75, batch_size=4)
    maps = [tissue_map(20 + i, 25, seed=i) for i in range(10)]
    y = np.arange(10) % 2
    data = MapBatches(maps, cfg, y, np.ones(10), augment=True, shuffle=True, seed=1)
    assert len(data) == 3
    x, yb, wb = data[0]
    assert x.shape == (4, 75, 75, 3) and x.dtype == np.float32 and -1 <= x.min() and x.max() <= 1
    again = MapBatches(maps, cfg, y, np.ones(10), augment=True, shuffle=True, seed=1)
    assert np.array_equal(again[0][0], x) and np.array_equal(again[0][1], yb)
    seen = np.concatenate([data.batches[i] for i in range(len(data))])
    assert sorted(seen.tolist()) == list(range(10))
    data.on_epoch_end()
    assert not np.array_equal(data[0][0], x)  # new shuffle / augmentation next epoch


def test_native_batches_group_by_size_with_varied_first_two():
    cfg = TrainConfig(recipe="finetune", size_strategy="native", batch_size=2, native_bucket_px=32)
    maps = [tissue_map(20, 20)] * 5 + [tissue_map(100, 110)] * 3
    data = MapBatches(maps, cfg, np.zeros(8), augment=True, shuffle=True, seed=0)
    shapes = [data[i][0].shape for i in range(len(data))]
    assert len(data) == 5
    assert {s[1:3] for s in shapes} <= {(96, 96), (128, 128)}
    assert shapes[0][1:3] != shapes[1][1:3]  # so Keras infers a variable-size input signature
