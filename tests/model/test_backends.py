"""The model code on JAX (``KERAS_BACKEND=jax``, what the GPU machines have): training through the CLI and Grad-CAM
in subprocesses, then the JAX-trained model loaded here under the default TensorFlow backend (``safe_mode``) with the
same predictions and the same CAMs. Skipped where JAX is not installed (``pip install 'jax[cpu]'``)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ..conftest import make_map_cohort

pytest.importorskip("jax")

pytestmark = pytest.mark.slow  # trains InceptionV3 on the JAX backend in a subprocess

BIN = Path(sys.executable).parent
CONFIG = """
train: {recipe: finetune, input_px: 75, batch_size: 8, head_epochs: 2, finetune_epochs: 1, unfreeze_from: mixed9,
        val_fraction: 0.25, test_fraction: 0.25, seed: 1}
"""
JAX_ENV = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}

CAM_SCRIPT = """
import sys, numpy as np, keras
from pipeline.cam.gradients import default_cam_layer, split_model
from pipeline.cam.views import slide_cam
from pipeline.core.maps import read_feature_maps
from pipeline.model.trained import TrainedModel
out, ids, dest = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
assert keras.backend.backend() == "jax"
trained = TrainedModel(out + "/model")
layer = default_cam_layer(trained.models[0], trained.train_config)
cam_model = split_model(trained.models[0], layer)
result = {}
for slide_id, fmap in zip(ids, read_feature_maps(out, ids)):
    for reference in (False, True):
        cam, probs, cls = slide_cam(cam_model, fmap, trained.train_config, reference=reference)
        result[f"{slide_id}-{reference}"] = cam
np.savez(dest, **result)
"""


@pytest.fixture(scope="module")
def jax_trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("jax_out")
    labels = make_map_cohort(out, n_per_class=6, seed=4, size_range=(12, 16))
    config = out / "train.yaml"
    config.write_text(CONFIG)
    run = subprocess.run([str(BIN / "wsi-pipeline"), "train", "--out", str(out), "--labels", str(labels),
                          "--config", str(config)], capture_output=True, text=True, timeout=600, env=JAX_ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_training_runs_on_jax(jax_trained):
    info = json.loads((jax_trained / "model" / "model_info.json").read_text())
    assert info["versions"]["backend"] == "jax"
    assert set(info["history"][0]["phase"]) == {"head", "finetune"}  # both phases, so set_phase ran under JAX
    assert json.loads((jax_trained / "metrics.json").read_text())["n_slides"] == 3


def test_jax_model_predicts_the_same_under_tensorflow(jax_trained):
    import keras

    from pipeline.core.maps import read_feature_maps
    from pipeline.model.trained import TrainedModel

    assert keras.backend.backend() == "tensorflow"
    with open(jax_trained / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    trained = TrainedModel(jax_trained / "model")  # safe_mode load of the file JAX wrote
    probs = trained.predict(read_feature_maps(jax_trained, [r["slide_id"] for r in rows]))
    expected = np.array([[float(r["prob_0"]), float(r["prob_1"])] for r in rows])
    # Same class; probabilities equal to float32 cross-backend error (XLA and oneDNN sum convolutions in different
    # orders; through 94 random-init BatchNorm layers that reaches ~4e-4 on some CPUs).
    assert (probs.argmax(axis=1) == expected.argmax(axis=1)).all()
    np.testing.assert_allclose(probs, expected, atol=2e-3)


def test_gradcam_is_the_same_on_both_backends(jax_trained, tmp_path):
    from pipeline.cam.gradients import default_cam_layer, split_model
    from pipeline.cam.views import slide_cam
    from pipeline.core.maps import read_feature_maps
    from pipeline.model.trained import TrainedModel

    ids = ["s1_000"]  # a positive slide: its map has the planted disc
    dest = tmp_path / "jax_cams.npz"
    run = subprocess.run([sys.executable, "-c", CAM_SCRIPT, str(jax_trained), ",".join(ids), str(dest)],
                         capture_output=True, text=True, timeout=300, env=JAX_ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    jax_cams = np.load(dest)
    trained = TrainedModel(jax_trained / "model")
    cam_model = split_model(trained.models[0], default_cam_layer(trained.models[0], trained.train_config))
    for slide_id, fmap in zip(ids, read_feature_maps(jax_trained, ids)):
        for reference in (False, True):
            cam, _, _ = slide_cam(cam_model, fmap, trained.train_config, reference=reference)
            theirs = jax_cams[f"{slide_id}-{reference}"]
            np.testing.assert_array_equal(np.isnan(cam), np.isnan(theirs))
            assert np.nanmax(cam) == pytest.approx(1.0)
            np.testing.assert_allclose(np.nan_to_num(cam), np.nan_to_num(theirs), atol=2e-3)
