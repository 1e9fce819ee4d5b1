"""Input adapter, map sizes, augmentation, batches (numpy, fast) and one InceptionV3 (built once for the module)."""

import numpy as np
import pytest

from pipeline.model.network import (HEAD_PREFIX, build_model, calibrate_batchnorm, compile_model, finetune_start,
                                    load_model, resolve_weights, save_model, set_phase, trainable_layer_names)
from pipeline.model.batches import MapBatches, predict_proba
from pipeline.model.inputs import (TISSUE_INPUT_LOW, add_noise, bucket_shape, dihedral, fit_size,
                                   random_crop_fraction, resize_nearest, to_input, undo_dihedral)
from pipeline.model.backend import dtype_policy, gpu_count, use_mixed_precision
from pipeline.core.config import TrainConfig
from pipeline.core.errors import ModelError
from pipeline.core.maps import FEATURE_MAP_FILL, select_channels


def rng():
    return np.random.default_rng(0)


def tissue_map(rows=20, cols=30, k=3, seed=0):
    r = np.random.default_rng(seed)
    fmap = r.uniform(0, 1, size=(rows, cols, k)).astype(np.float32)
    fmap[:3] = FEATURE_MAP_FILL  # background band
    return fmap


# --- channels and scaling ------------------------------------------------------------------------------------------


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


# --- sizes ---------------------------------------------------------------------------------------------------------


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


# --- augmentation --------------------------------------------------------------------------------------------------


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


# --- the model (built once) ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def native_model():
    cfg = TrainConfig(recipe="finetune", size_strategy="native", weights=None, batch_size=4, native_bucket_px=16, augment=False)
    return build_model(2, cfg), cfg


def _base_layers_with_weights(model):
    return [layer for layer in model.layers if layer.weights and not layer.name.startswith(HEAD_PREFIX)]


def test_phases_set_trainable_layers(native_model):
    import keras

    model, _ = native_model
    names = [layer.name for layer in model.layers]
    set_phase(model, "head")
    assert set(trainable_layer_names(model)) == {"head_dense"}  # pooling/dropout have no weights
    set_phase(model, "finetune", "mixed9")
    trainable = set(trainable_layer_names(model))
    first = names.index("mixed8") + 1
    for i, layer in enumerate(model.layers):
        if not layer.weights or layer.name.startswith(HEAD_PREFIX):
            continue
        if isinstance(layer, keras.layers.BatchNormalization):
            assert layer.name not in trainable  # BatchNorm stays in inference mode
        else:
            assert (layer.name in trainable) == (i >= first), layer.name
    convs = [n for n in trainable if n.startswith("conv2d")]
    assert len(convs) == 18  # the 9 + 9 convolutions of blocks mixed9 and mixed10
    set_phase(model, "finetune", "mixed0")
    stem = names[:names.index("mixed0")]
    assert not any(n in trainable_layer_names(model) for n in stem if n.startswith("conv2d_") and
                   names.index(n) < finetune_start(model, "mixed0"))
    assert len(trainable_layer_names(model)) > len(trainable)
    with pytest.raises(ModelError, match="mixed0"):
        finetune_start(model, "block9")
    set_phase(model, "head")


def test_batchnorm_frozen_runs_in_inference_mode(native_model):
    import keras

    model, _ = native_model
    set_phase(model, "finetune", "mixed9")
    x = np.random.default_rng(0).uniform(-1, 1, (2, 80, 80, 3)).astype(np.float32)
    # with BatchNorm trainable=False, training=True uses moving statistics: a sample's output does not depend
    # on the rest of its batch
    bn = next(layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization))
    probe = keras.Model(model.inputs[0], bn.output)
    one = np.asarray(probe(x[:1], training=True))
    both = np.asarray(probe(x, training=True))[:1]
    assert np.allclose(one, both, atol=1e-5)
    set_phase(model, "head")


def test_calibrated_batchnorm_normalises_a_random_base_on_the_training_maps():
    import keras

    cfg = TrainConfig(recipe="finetune", size_strategy="resize", input_px=80, weights=None, batch_size=4, augment=False)
    keras.utils.set_random_seed(0)
    model = build_model(2, cfg)
    batches = MapBatches([tissue_map(20, 30, seed=s) for s in range(8)], cfg)
    x = np.concatenate([batches.batch_x(i) for i in range(len(batches))])
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    probe = keras.Model(model.inputs[0], [bns[-1].output, model.get_layer("head_pool").output])

    def last_bn_variance_and_pooled_spread():
        out, pooled = (np.asarray(a) for a in probe.predict(x, verbose=0))
        return np.median(out.reshape(-1, out.shape[-1]).var(axis=0)), np.median(pooled.std(axis=0))

    var_before, spread_before = last_bn_variance_and_pooled_spread()
    assert calibrate_batchnorm(model, batches) == len(bns) > 90
    var_after, spread_after = last_bn_variance_and_pooled_spread()
    # Keras' default statistics (0, 1) let a random base's activations vanish; calibrated, the deepest BatchNorm
    # puts out unit-variance channels (inference mode, moving statistics) and slides differ at the head by O(0.1)
    assert var_before < 1e-4 and 0.5 < var_after < 2.0
    assert spread_before < 1e-3 < 0.05 < spread_after
    assert not any(layer.trainable for layer in bns) and {layer.momentum for layer in bns} == {0.99}


def test_head_block_truncates_the_base():
    cfg = TrainConfig(recipe="finetune", size_strategy="resize", input_px=80, weights=None, head_block="mixed2", unfreeze_from="mixed1")
    model = build_model(3, cfg)
    names = {layer.name for layer in model.layers}
    assert "mixed2" in names and not names & {f"mixed{i}" for i in range(3, 11)}
    assert model.get_layer("head_pool").input.shape[1:] == model.get_layer("mixed2").output.shape[1:]
    set_phase(model, "finetune", cfg.unfreeze_from)
    trained = set(trainable_layer_names(model))
    assert "head_dense" in trained and any(n.startswith("conv2d") for n in trained)
    assert predict_proba(model, [tissue_map()], cfg).shape == (1, 3)


@pytest.mark.parametrize("strategy", ["resize", "pad", "crop", "native"])
def test_forward_pass_each_strategy(native_model, strategy):
    model, _ = native_model
    cfg = TrainConfig(recipe="finetune", size_strategy=strategy, input_px=80, native_bucket_px=16)
    maps = [tissue_map(20, 30), tissue_map(90, 85, seed=2)]
    probs = predict_proba(model, maps, cfg)
    assert probs.shape == (2, 2)
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5) and (probs > 0).all()


def test_tta_on_a_symmetric_map_equals_plain(native_model):
    model, _ = native_model
    cfg = TrainConfig(recipe="finetune", size_strategy="resize", input_px=80)
    fmap = np.full((21, 21, 1), 0.4, np.float32)
    fmap[8:13, 8:13] = 0.9  # invariant under all eight flips/rotations
    plain = predict_proba(model, [fmap], cfg, tta=False)
    tta = predict_proba(model, [fmap], cfg, tta=True)
    assert np.allclose(plain, tta, atol=1e-5)


def test_save_load_safe_mode_round_trip(native_model, tmp_path):
    model, cfg = native_model
    path = save_model(model, tmp_path / "m.keras")
    loaded = load_model(path)
    x = np.random.default_rng(1).uniform(-1, 1, (2, 96, 80, 3)).astype(np.float32)
    assert np.allclose(model.predict_on_batch(x), loaded.predict_on_batch(x), atol=1e-6)
    assert trainable_layer_names(loaded) == trainable_layer_names(model)
    assert loaded.get_layer("mixed7") is not None  # flat: Grad-CAM reaches the blocks
    assert [p.name for p in tmp_path.iterdir()] == ["m.keras"]  # no temporary file left


def test_safe_mode_refuses_code_in_a_model_file(tmp_path):
    import keras

    inputs = keras.Input((4,))
    outputs = keras.layers.Lambda(lambda t: t * 2)(inputs)
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(path)
    with pytest.raises(ModelError, match="safe_mode|Lambda|lambda"):
        load_model(path)


def test_local_weights_file_loads(native_model, tmp_path):
    import keras

    model, _ = native_model
    base = keras.Model(model.inputs[0], model.get_layer("mixed10").output)
    weights = tmp_path / "inception_notop.weights.h5"
    base.save_weights(weights)
    cfg = TrainConfig(recipe="finetune", size_strategy="native", weights=str(weights))
    again = build_model(2, cfg)
    first_conv = next(layer for layer in model.layers if layer.name.startswith("conv2d"))
    twin = again.layers[[layer.name for layer in model.layers].index(first_conv.name)]
    assert np.array_equal(np.asarray(first_conv.kernel), np.asarray(twin.kernel))


def test_weights_errors():
    with pytest.raises(ModelError, match="weights file not found"):
        resolve_weights("/no/such/weights.h5")
    assert resolve_weights(None) is None and resolve_weights("imagenet") == "imagenet"


def test_mixed_precision_only_on_gpu_and_policy_restored():
    import keras

    assert use_mixed_precision("on") and not use_mixed_precision("off")
    assert use_mixed_precision("auto") == (gpu_count() > 0)
    before = keras.config.dtype_policy().name
    with dtype_policy("mixed_float16"):
        assert keras.config.dtype_policy().name == "mixed_float16"
    assert keras.config.dtype_policy().name == before


def test_native_training_step_with_two_sizes(native_model):
    """The PyDataset path with variable sizes trains (one epoch, two size buckets) and changes the head."""
    model, cfg = native_model
    maps = [tissue_map(20, 20, seed=i) for i in range(4)] + [tissue_map(90, 100, seed=9 + i) for i in range(4)]
    y = np.array([0, 1] * 4)
    data = MapBatches(maps, cfg, y, np.ones(8), augment=True, shuffle=True, batch_size=4)
    set_phase(model, "head")
    compile_model(model, 1e-2)
    before = np.asarray(model.get_layer("head_dense").kernel).copy()
    history = model.fit(data, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert not np.allclose(before, np.asarray(model.get_layer("head_dense").kernel))
