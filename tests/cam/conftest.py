"""A small random-init InceptionV3 (96-px input, two classes) for the Grad-CAM tests, built once per test module."""

import pytest

from pipeline.core.config import TrainConfig
from pipeline.model.network import build_model


@pytest.fixture(scope="module")
def small_model():
    import keras

    keras.utils.set_random_seed(1)
    cfg = TrainConfig(recipe="finetune", size_strategy="resize", input_px=96, weights=None)
    return build_model(2, cfg), cfg
