"""``onnx``: any encoder exported to ONNX (``descriptor.model: path/to/encoder.onnx``), run with onnxruntime.

The model takes one image batch, NCHW (PyTorch exports) or NHWC, float32 or float16, and returns (n, d). Its fixed
input edge, when it has one, is the encoder's input size. onnxruntime runs on CUDA when the CUDA provider is installed
and a GPU is visible (``onnxruntime-gpu``), else on CPU with the Dask worker's threads.
"""

from __future__ import annotations

import numpy as np

from ...core.config import DescriptorConfig, file_sha256
from ...core.errors import EncoderError, EncoderInputSizeError
from .base import Encoder, EncoderSpec, normalise, require_file, resize_tiles, worker_threads

PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
DEFAULT_INPUT_PX = 224


def input_layout(shape: list, path) -> tuple[str, int | None]:
    """('nchw' | 'nhwc', fixed square edge or None) of an ONNX image input shape (dims are ints or names)."""
    if len(shape) != 4:
        raise EncoderInputSizeError(f"the model input has shape {shape}; an image batch (n, 3, h, w) or (n, h, w, 3) "
                                    "is needed", path=path)
    if shape[1] == 3:
        layout, spatial = "nchw", shape[2:4]
    elif shape[3] == 3:
        layout, spatial = "nhwc", shape[1:3]
    else:
        raise EncoderInputSizeError(f"the model input {shape} has no axis of 3 colour channels", path=path,
                                    fix="Export the encoder with a fixed channel axis of 3 (NCHW or NHWC).")
    if isinstance(shape[0], int) and shape[0] > 0:
        raise EncoderInputSizeError(f"the model input {shape} has a fixed batch size of {shape[0]}", path=path,
                                    fix="Export it with a dynamic batch axis, e.g. torch.onnx.export(..., "
                                        "dynamic_axes={'x': {0: 'n'}, 'y': {0: 'n'}}).")
    fixed = {d for d in spatial if isinstance(d, int) and d > 0}
    if len(fixed) > 1:
        raise EncoderInputSizeError(f"the model takes non-square {spatial[0]}x{spatial[1]} input", path=path)
    return layout, (fixed.pop() if fixed else None)


class OnnxEncoder(Encoder):
    def __init__(self, config: DescriptorConfig):
        try:
            import onnxruntime as ort
        except ImportError:
            raise EncoderError("descriptor.name 'onnx' needs onnxruntime, which is not installed",
                               fix="pip install 'wsi-pipeline[onnx]' (onnxruntime-gpu for CUDA)") from None
        if not config.model:
            raise EncoderError("descriptor.name 'onnx' needs descriptor.model: the encoder's .onnx file",
                               fix="Set descriptor.model (or --encoder-model) to the exported .onnx file.")
        path = require_file(config.model, "ONNX model")
        options = ort.SessionOptions()
        threads = worker_threads()
        if threads:
            options.intra_op_num_threads = threads
        providers = [p for p in PROVIDERS if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise EncoderError(f"onnxruntime cannot load the model: {err}", path=path) from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise EncoderInputSizeError(f"the model has {len(inputs)} inputs; one image batch is needed", path=path)
        self.input_name = inputs[0].name
        self.layout, fixed_px = input_layout(list(inputs[0].shape), path)
        if fixed_px and config.input_px and config.input_px != fixed_px:
            raise EncoderInputSizeError(f"the model takes {fixed_px}-px input but descriptor.input_px is "
                                        f"{config.input_px}", path=path)
        self.dtype = np.float16 if inputs[0].type == "tensor(float16)" else np.float32
        device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        outputs = self.session.get_outputs()
        self.output_name = outputs[0].name
        dims = outputs[0].shape[-1] if outputs[0].shape and isinstance(outputs[0].shape[-1], int) else 0
        self.spec = EncoderSpec(
            kind="onnx", model=str(config.model), weights=None, input_px=fixed_px or config.input_px or DEFAULT_INPUT_PX,
            dims=int(dims), normalize="imagenet" if config.normalize == "auto" else config.normalize,
            precision="mixed" if self.dtype == np.float16 else "float32", device=device, mpp=config.mpp,
            file_sha256={"model": file_sha256(path)})

    def prepare(self, tiles: np.ndarray) -> np.ndarray:
        """The model's input for uint8 tiles: resized, normalised, in its layout and dtype."""
        x = normalise(resize_tiles(tiles, self.spec.input_px), self.spec.normalize)
        if self.layout == "nchw":
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x, dtype=self.dtype)

    def _run(self, tiles: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: self.prepare(tiles)})[0]
