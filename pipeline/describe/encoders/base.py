"""What every tile encoder is: a spec (input size, µm/px, normalisation, output size, precision) and ``encode``.

An encoder turns a batch of uint8 RGB tiles (n, h, w, 3) at the tiling resolution into (n, d) float32 descriptors.
Learned encoders resize the tiles to their input edge and normalise them here, the same way for every kind, so the
kinds differ only in how they run their model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ...core.errors import EncoderOutputError, EncoderWeightsMissingError
from ...core.parallel import current_dask_worker

# per-channel mean and std of the inputs on a 0-1 scale
NORMALISATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "zero_one": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "none": None,  # raw 0-255 values as float32
}
WEIGHT_SUFFIXES = (".h5", ".keras", ".onnx", ".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder declares: ``input_px`` edge, ``mpp`` it was trained at (None = not declared), normalisation,
    output ``dims``, ``precision`` ('float32' or 'mixed') and where it runs (``device``)."""

    kind: str
    model: str
    weights: str | None
    input_px: int
    dims: int
    normalize: str
    precision: str
    device: str = "cpu"
    mpp: float | None = None
    file_sha256: dict = field(default_factory=dict)

    def identity(self) -> dict:
        """Stored in each slide store: which encoder made the descriptors (weights by content, not by path). The
        device is left out: blocks may run elsewhere than the client that checked the encoder (see ``encoded_on``)."""
        return {k: v for k, v in asdict(self).items() if k != "device"}


class Encoder:
    """Base of the encoder kinds. Subclasses set ``spec`` and implement ``_run(batch)`` on prepared input."""

    spec: EncoderSpec
    learned = True

    @property
    def on_accelerator(self) -> bool:
        return self.spec.device != "cpu"

    def feature_names(self) -> list[str]:
        stem = Path(self.spec.model).stem.replace("hf-hub:", "").split("/")[-1].lower() or self.spec.kind
        return [f"{stem}_{i}" for i in range(self.spec.dims)]

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        """(n, h, w, 3) uint8 tiles -> (n, dims) float32."""
        tiles = check_tiles(tiles)
        if not len(tiles):
            return np.zeros((0, self.spec.dims), np.float32)
        return check_output(self._run(tiles), len(tiles), self.spec.model)

    def _run(self, tiles: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def check_tiles(tiles: np.ndarray) -> np.ndarray:
    tiles = np.asarray(tiles)
    if tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise ValueError(f"expected (n, h, w, 3) RGB tiles, got shape {tiles.shape}")
    return tiles if tiles.dtype == np.uint8 else np.clip(tiles, 0, 255).astype(np.uint8)


def check_output(out, n: int, model: str) -> np.ndarray:
    """The model's output as (n, d) float32, or ``EncoderOutputError``."""
    out = np.asarray(out)
    if out.ndim != 2 or out.shape[0] != n:
        raise EncoderOutputError(f"the encoder returned shape {tuple(out.shape)} for {n} tiles; one vector per tile "
                                 f"(shape ({n}, d)) is needed", path=model)
    return out.astype(np.float32, copy=False)


def resize_tiles(tiles: np.ndarray, input_px: int) -> np.ndarray:
    """Tiles resized to ``input_px`` (bilinear, antialiased when shrinking: PIL), still uint8."""
    if tiles.shape[1] == input_px and tiles.shape[2] == input_px:
        return tiles
    out = np.empty((len(tiles), input_px, input_px, 3), np.uint8)
    for i, tile in enumerate(tiles):
        out[i] = np.asarray(Image.fromarray(tile).resize((input_px, input_px), Image.BILINEAR))
    return out


def normalise(tiles: np.ndarray, normalize: str) -> np.ndarray:
    """uint8 (n, h, w, 3) -> float32 ``(x / 255 - mean) / std`` (channels last); 'none' keeps 0-255."""
    x = tiles.astype(np.float32)
    stats = NORMALISATIONS[normalize]
    if stats is None:
        return x
    mean, std = (np.asarray(v, np.float32) for v in stats)
    return (x / np.float32(255.0) - mean) / std


def is_file_like(value: str | None) -> bool:
    """A ``model``/``weights`` value naming a file (a path or a weights suffix) rather than a name."""
    if not value:
        return False
    return "/" in value or "\\" in value or value.lower().endswith(WEIGHT_SUFFIXES)


def require_file(value: str, what: str) -> Path:
    """The file ``value`` names, or ``EncoderWeightsMissingError`` saying which file to provide."""
    path = Path(value).expanduser()
    if not path.is_file():
        raise EncoderWeightsMissingError(f"the {what} file does not exist", path=path,
                                         fix=f"Copy the {what} file to {path} (no weights are downloaded on an "
                                             "offline cluster), or point the config at the file you have.")
    return path


def resolve_precision(precision: str, device: str) -> str:
    """'auto' -> 'mixed' (float16 compute) on an accelerator, 'float32' on CPU; 'mixed' on CPU stays float32."""
    if device == "cpu":
        return "float32"
    return "mixed" if precision in ("auto", "mixed") else "float32"


def worker_threads() -> int | None:
    """Threads of the Dask worker this runs in (a learned encoder uses that many, not every core), else None."""
    worker = current_dask_worker()
    try:
        return int(worker.state.nthreads) if worker is not None else None
    except AttributeError:
        return None
