"""Grad-CAM at one layer: the layer choice, the split model against a direct gradient tape, upsampling."""

import numpy as np

from pipeline.cam.gradients import default_cam_layer, gradcam, split_model, upsample_bilinear


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
    import keras
    import tensorflow as tf

    model, cfg = small_model
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 96, 96, 3)).astype(np.float32)
    cams, probs = gradcam(split_model(model, "mixed2"), x, class_index=1)
    # reference: the textbook formulation on the unsplit model
    ref_model = keras.Model(model.inputs[0], [model.get_layer("mixed2").output, model.outputs[0]])
    with tf.GradientTape() as tape:
        acts, out = ref_model(x, training=False)
        score = tf.reduce_sum(out[:, 1])
    grads = tape.gradient(score, acts).numpy()
    low = np.maximum((grads.mean(axis=(1, 2), keepdims=True) * acts.numpy()).sum(-1), 0)
    np.testing.assert_allclose(probs, out.numpy(), rtol=1e-5, atol=1e-6)
    for i in range(2):
        np.testing.assert_allclose(cams[i], upsample_bilinear(low[i], 96, 96), rtol=1e-4, atol=1e-6)
