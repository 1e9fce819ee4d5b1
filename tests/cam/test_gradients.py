"""Grad-CAM at one layer: the layer choice, the split model against a direct gradient tape, upsampling."""

import numpy as np

from pipeline.cam.gradients import (RECEPTIVE_GRID, default_cam_layer, gradcam, split_model, upsample_bilinear,
                                     upsample_cam)


def test_bilinear_upsample_keeps_constant_and_range():
    cam = np.array([[0.0, 1.0], [2.0, 3.0]], dtype=np.float32)
    up = upsample_bilinear(cam, 8, 8)
    assert up.shape == (8, 8) and up.min() == 0 and up.max() == 3
    np.testing.assert_allclose(upsample_bilinear(np.full((3, 3), 0.5), 9, 9), 0.5)


def test_default_layer_is_finer_than_mixed10(small_model):
    model, cfg = small_model
    assert default_cam_layer(model, cfg) == "mixed0"  # random-init base: the shallowest block of the finest grid
    learned = cfg.model_copy(update={"weights": "imagenet"})  # only the rule reads it: nothing is downloaded
    assert default_cam_layer(model, learned) == "mixed2"  # deepest with >= 96/18 cells: 9x9 (mixed3-7 are 4x4)
    import keras

    full = keras.Model(model.inputs[0], model.get_layer("mixed10").output)
    assert full.output.shape[1] == 1


def test_gradcam_matches_direct_gradient_tape(small_model):
    """Grad-CAM of the class logit minus the mean logit (not of the saturating probability), each cell laid on the
    centre of its receptive field."""
    import keras
    import tensorflow as tf

    model, cfg = small_model
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 96, 96, 3)).astype(np.float32)
    cams, probs = gradcam(split_model(model, "mixed2"), x, class_index=1)
    # reference: the textbook formulation on the unsplit model
    dense = model.get_layer("head_dense")
    ref_model = keras.Model(model.inputs[0], [model.get_layer("mixed2").output, dense.input, model.outputs[0]])
    with tf.GradientTape() as tape:
        acts, features, out = ref_model(x, training=False)
        logits = tf.matmul(features, dense.kernel) + dense.bias
        score = tf.reduce_sum(logits[:, 1] - tf.reduce_mean(logits, axis=1))
    grads = tape.gradient(score, acts).numpy()
    low = np.maximum((grads.mean(axis=(1, 2), keepdims=True) * acts.numpy()).sum(-1), 0)
    np.testing.assert_allclose(probs, out.numpy(), rtol=1e-5, atol=1e-6)
    for i in range(2):
        np.testing.assert_allclose(cams[i], upsample_cam(low[i], 96, 96, RECEPTIVE_GRID["mixed2"]), rtol=1e-4,
                                   atol=1e-6)


def _receptive_centre(model, layer: str, size: int, j: int) -> float:
    """Centre of the input pixels that reach cell (j, j) of ``layer`` (the support of its input gradient)."""
    import keras
    import tensorflow as tf

    features = keras.Model(model.inputs[0], model.get_layer(layer).output)
    x = tf.convert_to_tensor(np.random.default_rng(0).normal(size=(1, size, size, 3)).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        score = tf.reduce_sum(features(x, training=False)[0, j, j, :])
    rows = np.flatnonzero(np.abs(tape.gradient(score, x).numpy()[0]).sum(axis=(1, 2)) > 0)
    return (rows.min() + rows.max()) / 2


def test_receptive_grid_matches_input_gradients(small_model):
    """RECEPTIVE_GRID's (offset, jump) put a cell on the centre of the pixels that reach it (cells whose receptive
    field the image border does not clip)."""
    import keras

    model, _ = small_model  # 96 px: mixed0 is 9 x 9, its middle cell's field lies inside the input
    offset, jump = RECEPTIVE_GRID["mixed0"]
    assert _receptive_centre(model, "mixed0", 96, 4) == offset + 4 * jump
    big = keras.applications.InceptionV3(include_top=False, weights=None, input_shape=(299, 299, 3))
    for layer, j in (("mixed0", 17), ("mixed3", 8)):
        offset, jump = RECEPTIVE_GRID[layer]
        assert _receptive_centre(big, layer, 299, j) == offset + j * jump, layer
    # a known grid puts the corner cell at (13, 13), halfway to the next centre (21) at pixel 17; stretched over the
    # input, the corner cell sits at 4.8 and is gone by pixel 16
    cam = np.zeros((9, 9), np.float32)
    cam[0, 0] = 1.0
    placed = upsample_cam(cam, 96, 96, RECEPTIVE_GRID["mixed0"])
    assert placed[:14, :14].min() == 1.0 and placed[17, 17] == 0.25 and placed[21:, :].max() == 0.0
    assert upsample_bilinear(cam, 96, 96)[17, 17] == 0.0
