"""wsi-pipeline: whole-slide images -> tile descriptors -> feature maps -> InceptionV3 -> Grad-CAM mosaics.

The package follows the walk of the pipeline, one subpackage (or module) per stage, in this order::

    core      config, typed errors, slide stores, output directory, feature-map contract, task runners
    slides    open slides, read pixels, tile grid, tissue mask                     (stage 1)
    describe  tiles -> one descriptor per tile, in a Zarr store per slide           (stage 2)
    reduce    descriptors -> K-channel feature map per slide                       (stage 3)
    model     InceptionV3 on feature maps, labels, the trained-model directory     (stage 4)
    evaluate  metrics, plots and files of predictions                              (stage 5)
    train     splits, fitting, saving and evaluating a model                       (stage 6)
    predict   new slides end to end with a trained model                           (stage 7)
    cam       Grad-CAM of each slide, heatmap files                                (stage 8)
    report    OUT/report.html                                                      (stage 9)
    view      wsi-pipeline view OUT: the slides with their overlays in the browser (stage 10)

Import rule: a module imports only its own stage, earlier stages and ``core``; ``core`` imports no stage. The entry
points above them all (``console``, ``cli``, ``cli_options``, ``run``, ``api``, this file) may import anything.
``tests/test_layout.py`` checks this.

The Python API for lab scripts (one slide at a time, in-process, no cluster needed)::

    import pipeline
    store = pipeline.describe_slide("slide.svs", "out/")

Heavy dependencies (TensorFlow/Keras) are imported only when a stage that needs them runs.
"""

from __future__ import annotations

import os as _os

__version__ = "0.1.0"

# TensorFlow's C++ start-up banners (CPU instruction sets, absl) say nothing a user can act on; errors still show.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The public API, imported on first use (PEP 562): `wsi-pipeline describe` then loads only what describing needs,
# not the reduce/predict/cam modules (~0.3 s of start-up).
_LAZY = {
    "cam_slide": "api", "model_describe_config": "api",   # Grad-CAM of one slide, a model's describe settings
    "PipelineConfig": "core.config", "load_config": "core.config",
    "describe_slide": "describe.runner", "describe_slides": "describe.runner",
    "predict_slide": "predict",                           # describe + map + predict one slide with a trained model
    "map_slide": "reduce.maps",                           # one slide's feature map with a saved reducer
    "load_reducer": "reduce.reducers",
    "read_slide_info": "slides.open",
}

__all__ = ["PipelineConfig", "load_config", "describe_slide", "describe_slides", "read_slide_info", "__version__",
           "predict_slide", "map_slide", "load_reducer", "cam_slide", "model_describe_config"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
