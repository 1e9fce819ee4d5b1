"""One InceptionV3 on feature maps (built once for the module): phases, BatchNorm, head block, predictions, save/load,
weights, mixed precision, a training step."""

import numpy as np
import pytest

from pipeline.core.config import TrainConfig
from pipeline.core.errors import ModelError
from pipeline.model.backend import dtype_policy, gpu_count, use_mixed_precision
from pipeline.model.batches import MapBatches, predict_proba
from pipeline.model.network import (HEAD_PREFIX, build_model, calibrate_batchnorm, compile_model, finetune_start,
                                    load_model, resolve_weights, save_model, set_phase, trainable_layer_names)
from tests.model.test_inputs import tissue_map

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
