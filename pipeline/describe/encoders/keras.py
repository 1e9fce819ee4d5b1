"""``keras``: a ``keras.applications`` backbone (global-average pooled, no top) or a saved ``.keras`` model.

``descriptor.model`` names the backbone (default MobileNetV2) or a ``.keras`` file; ``descriptor.weights`` is
'pretrained' (ImageNet, Keras's cache or a download), a local weights file, or null. The application's own
``preprocess_input`` is the 'auto' normalisation; a saved model gets 0-255 values (put a Rescaling layer in it).
Runs on the Keras backend in use (TensorFlow, JAX or torch), on its GPU when it sees one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from ...core.config import DescriptorConfig, file_sha256
from ...core.errors import EncoderError, EncoderInputSizeError, EncoderWeightsMissingError
from .base import Encoder, EncoderSpec, is_file_like, normalise, require_file, resize_tiles, resolve_precision

DEFAULT_BACKBONE = "MobileNetV2"
DEFAULT_INPUT_PX = 224


def keras_device() -> str:
    """'gpu' when the Keras backend sees a GPU, else 'cpu'."""
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            return "gpu" if tf.config.list_physical_devices("GPU") else "cpu"
        if backend == "jax":
            import jax

            return "gpu" if jax.default_backend() in ("gpu", "cuda", "rocm") else "cpu"
        if backend == "torch":
            import torch

            return "gpu" if torch.cuda.is_available() else "cpu"
    except ImportError:
        pass
    return "cpu"


def application_preprocess(name: str):
    """``preprocess_input`` of the ``keras.applications`` module that defines backbone ``name``."""
    import keras

    for attr in dir(keras.applications):
        module = getattr(keras.applications, attr)
        if getattr(module, "__name__", "").startswith("keras") and hasattr(module, "preprocess_input") \
                and hasattr(module, name):
            return module.preprocess_input
    return None


def _missing_imagenet_file(err: Exception, name: str) -> EncoderWeightsMissingError:
    """The error for ImageNet weights Keras could not fetch: names the cache file to provide."""
    url = next(iter(re.findall(r"https?://\S+?\.h5", str(err))), None)
    cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
    target = cache / url.rsplit("/", 1)[-1] if url else cache
    return EncoderWeightsMissingError(
        f"Keras could not fetch the ImageNet weights of {name} (no network?): {str(err)[:200]}", path=target,
        fix=f"Copy the file {('from ' + url + ' ') if url else ''}to {target}, or set descriptor.weights to a local "
            "weights file (or null for random weights).")


class KerasEncoder(Encoder):
    def __init__(self, config: DescriptorConfig):
        import keras

        name = config.model or DEFAULT_BACKBONE
        device = keras_device()
        precision = resolve_precision(config.precision, device)
        files = {}
        if is_file_like(name):
            path = require_file(name, "Keras model")
            files["model"] = file_sha256(path)
            try:
                self.model = keras.saving.load_model(path, compile=False)
            except Exception as err:  # noqa: BLE001 - any load failure is a bad model file
                raise EncoderError(f"Keras cannot load the model: {err}", path=path) from None
            input_px = self._fixed_input_px(config.input_px, path)
            self.preprocess = None
            normalize = "none" if config.normalize == "auto" else config.normalize
        else:
            constructor = getattr(keras.applications, name, None)
            if not callable(constructor):
                raise EncoderError(f"keras.applications has no backbone '{name}'",
                                   fix="Name a keras.applications model (e.g. MobileNetV2, ResNet50, "
                                       "EfficientNetB0, ConvNeXtTiny) or a .keras file in descriptor.model.")
            weights = config.weights
            if weights in ("pretrained", "imagenet"):
                weights = "imagenet"
            elif weights is not None:
                weights = str(require_file(weights, "Keras weights"))
                files["weights"] = file_sha256(weights)
            input_px = config.input_px or DEFAULT_INPUT_PX
            self.model = self._build(constructor, name, weights, input_px, precision)
            self.preprocess = application_preprocess(name) if config.normalize == "auto" else None
            normalize = "application" if self.preprocess is not None else (
                "none" if config.normalize == "auto" else config.normalize)
        dims = int(self.model.output_shape[-1])
        self.spec = EncoderSpec(kind="keras", model=name, weights=config.weights, input_px=input_px, dims=dims,
                                normalize=normalize, precision=precision, device=device, mpp=config.mpp,
                                file_sha256=files)

    def _fixed_input_px(self, wanted: int | None, path: Path) -> int:
        shape = tuple(self.model.input_shape)
        if len(shape) != 4 or shape[-1] != 3:
            raise EncoderInputSizeError(f"the model takes input of shape {shape}; (n, h, w, 3) RGB is needed",
                                        path=path)
        fixed = {d for d in shape[1:3] if d is not None}
        if len(fixed) > 1:
            raise EncoderInputSizeError(f"the model takes non-square {shape[1]}x{shape[2]} input", path=path)
        if fixed and wanted and wanted not in fixed:
            raise EncoderInputSizeError(f"the model takes {fixed.pop()}-px input but descriptor.input_px is {wanted}",
                                        path=path)
        return fixed.pop() if fixed else (wanted or DEFAULT_INPUT_PX)

    @staticmethod
    def _build(constructor, name: str, weights: str | None, input_px: int, precision: str):
        import keras

        policy = keras.config.dtype_policy()
        if precision == "mixed":
            keras.config.set_dtype_policy("mixed_float16")
        try:
            return constructor(include_top=False, weights=weights, input_shape=(input_px, input_px, 3),
                               pooling="avg")
        except Exception as err:  # noqa: BLE001 - Keras raises a bare Exception when a download fails
            if weights == "imagenet" and ("URL fetch failure" in str(err) or isinstance(err, OSError)):
                raise _missing_imagenet_file(err, name) from None
            raise EncoderError(f"keras.applications.{name} cannot be built: {err}") from None
        finally:
            keras.config.set_dtype_policy(policy)

    def _run(self, tiles: np.ndarray) -> np.ndarray:
        resized = resize_tiles(tiles, self.spec.input_px)
        if self.preprocess is not None:
            x = self.preprocess(resized.astype(np.float32))
        else:
            x = normalise(resized, self.spec.normalize)
        # The compiled predict function (a graph / XLA program), not an eager call: ~2x faster and a fraction of the
        # memory. Batches are padded to a power of two so it is traced for a few batch sizes only.
        n = len(x)
        size = 1 << (n - 1).bit_length()
        if size != n:
            x = np.concatenate([x, np.zeros((size - n, *x.shape[1:]), x.dtype)])
        return np.asarray(self.model.predict_on_batch(x), dtype=np.float32)[:n]

