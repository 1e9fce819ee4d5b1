"""wsi-pipeline: whole-slide images -> tile descriptors -> feature maps -> InceptionV3 -> Grad-CAM mosaics.

The Python API for lab scripts (one slide at a time, in-process, no cluster needed)::

    import pipeline
    store = pipeline.describe_slide("slide.svs", "out/")

Heavy dependencies (TensorFlow/Keras, Dask) are imported only by the stages that need them.
"""

from __future__ import annotations

import os as _os

__version__ = "0.1.0"

# TensorFlow's C++ start-up banners (CPU instruction sets, absl) say nothing a user can act on; errors still show.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from .core.config import PipelineConfig, load_config  # noqa: E402
from .describe.runner import describe_slide, describe_slides  # noqa: E402
from .slides.open import read_slide_info  # noqa: E402

__all__ = ["PipelineConfig", "load_config", "describe_slide", "describe_slides", "read_slide_info", "__version__"]

from .predict import predict_slide  # noqa: E402  (describe + map + predict one slide with a trained model)

__all__ += ["predict_slide"]

from .reduce.reducers import load_reducer  # noqa: E402  (one slide's feature map with a saved reducer)
from .reduce.maps import map_slide  # noqa: E402  (one slide's feature map with a saved reducer)

__all__ += ["map_slide", "load_reducer"]

from .api import cam_slide, model_describe_config  # noqa: E402  (Grad-CAM of one slide, a model's describe settings)

__all__ += ["cam_slide", "model_describe_config"]
