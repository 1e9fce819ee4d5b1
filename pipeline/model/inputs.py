"""Feature maps -> network inputs: scaling, map sizes and augmentation, all plain numpy.

**Scaling.** InceptionV3 expects inputs in [-1, 1]. Tissue values [0, 1] map linearly onto
[``TISSUE_INPUT_LOW``, 1] = [-0.8, 1] and background cells to -1, so the lowest tissue value stays distinguishable
from "no tissue" (a plain 2x-1 would make them equal). The three channels come from the channel adapter,
``pipeline.core.maps.select_channels`` (``train.adapter``: ``replicate`` one component, or ``components``).

**Map sizes** (``train.size_strategy``); one map cell stays one block of pixels, nearest-neighbour throughout so
tissue values are never blended with the background:

* ``resize`` (default, ``input_px`` 299): every map stretched to input_px x input_px. Fits cohorts whose maps have
  similar aspect ratios; the network always sees the whole slide; the ImageNet-sized input suits pretrained weights.
* ``pad``: the map is enlarged by the largest whole factor that fits (or shrunk to fit) keeping its aspect ratio,
  then centred on a background canvas. Fits cohorts with varied aspect ratios (needle biopsies next to resections).
* ``crop``: an input_px window at one pixel per cell (random in training, central otherwise), padded when the map
  is smaller. Fits large maps (fine tile grids) where the signal is spread over the tissue, texture-like.
* ``native``: no resizing, variable-size input (``input_shape=(None, None, 3)``); maps smaller than
  ``native_min_px`` (75, InceptionV3's minimum) are padded, larger than ``native_max_px`` shrunk; batches hold maps
  of one size bucket (padded up to a multiple of ``native_bucket_px``). Fits when the physical scale must be kept
  (one cell = one tile at the same µm/px for every slide). Each bucket size compiles its own graph (TensorFlow
  retraces, JAX recompiles), so keep buckets coarse.

**Augmentation** (training only, ``train.augment``): the eight flips/rotations (the dihedral group), a random crop
keeping at least ``crop_fraction`` of each side, and Gaussian noise of ``noise_std`` on tissue cells (background stays
exactly background). ``train.tta`` averages predictions over the eight flips/rotations.
"""

from __future__ import annotations

import numpy as np

from ..core.config import TrainConfig
from ..core.errors import ModelError
from ..core.maps import FEATURE_MAP_FILL

TISSUE_INPUT_LOW = -0.8  # network input of the lowest tissue value; background is INPUT_BACKGROUND
INPUT_BACKGROUND = -1.0
MIN_INPUT_PX = 75  # InceptionV3 rejects smaller inputs


def to_input(x: np.ndarray) -> np.ndarray:
    """Map values -> InceptionV3's range: tissue [0, 1] -> [-0.8, 1], background -> -1."""
    x = np.asarray(x, dtype=np.float32)
    tissue = x >= 0
    scaled = TISSUE_INPUT_LOW + (1.0 - TISSUE_INPUT_LOW) * np.clip(x, 0.0, 1.0)
    return np.where(tissue, scaled, INPUT_BACKGROUND).astype(np.float32)


def resize_nearest(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Nearest-neighbour resize of (h, w, ...) (cells become blocks; no blending with the background)."""
    h, w = x.shape[:2]
    rows = np.minimum((np.arange(out_h) + 0.5) * h / out_h, h - 1).astype(np.int64)
    cols = np.minimum((np.arange(out_w) + 0.5) * w / out_w, w - 1).astype(np.int64)
    return x[rows][:, cols]


def pad_to(x: np.ndarray, out_h: int, out_w: int, fill: float = FEATURE_MAP_FILL) -> np.ndarray:
    """Centre x on a (out_h, out_w) background canvas (out_h >= h, out_w >= w)."""
    h, w = x.shape[:2]
    out = np.full((out_h, out_w) + x.shape[2:], fill, dtype=x.dtype)
    r0, c0 = (out_h - h) // 2, (out_w - w) // 2
    out[r0:r0 + h, c0:c0 + w] = x
    return out


def crop_window(x: np.ndarray, out_h: int, out_w: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """An (out_h, out_w) window: random with ``rng``, central without; padded first where x is smaller."""
    x = pad_to(x, max(out_h, x.shape[0]), max(out_w, x.shape[1]))
    h, w = x.shape[:2]
    if rng is None:
        r0, c0 = (h - out_h) // 2, (w - out_w) // 2
    else:
        r0, c0 = int(rng.integers(0, h - out_h + 1)), int(rng.integers(0, w - out_w + 1))
    return x[r0:r0 + out_h, c0:c0 + out_w]


def fit_within(x: np.ndarray, size_px: int) -> np.ndarray:
    """Keep the aspect ratio: enlarge by the largest whole factor that fits, or shrink so the long side fits."""
    h, w = x.shape[:2]
    long_side = max(h, w)
    if long_side <= size_px:
        f = size_px // long_side
        return np.repeat(np.repeat(x, f, axis=0), f, axis=1) if f > 1 else x
    scale = size_px / long_side
    return resize_nearest(x, max(1, min(size_px, round(h * scale))), max(1, min(size_px, round(w * scale))))


def native_shape(h: int, w: int, cfg: TrainConfig) -> tuple[int, int]:
    """Size (before bucketing) of a map under the native strategy."""
    if max(h, w) > cfg.native_max_px:
        f = int(np.ceil(max(h, w) / cfg.native_max_px))
        h, w = int(np.ceil(h / f)), int(np.ceil(w / f))
    return max(h, cfg.native_min_px), max(w, cfg.native_min_px)


def bucket_shape(h: int, w: int, cfg: TrainConfig) -> tuple[int, int]:
    """The padded size a native map is batched at: rounded up to a multiple of native_bucket_px."""
    h, w = native_shape(h, w, cfg)
    b = cfg.native_bucket_px
    return int(np.ceil(h / b) * b), int(np.ceil(w / b) * b)


def fit_size(x: np.ndarray, cfg: TrainConfig, rng: np.random.Generator | None = None) -> np.ndarray:
    """Apply the size strategy to one (h, w, 3) map (random crop position only for ``crop`` with an rng)."""
    strategy, size = cfg.size_strategy, cfg.input_px
    if strategy == "resize":
        return resize_nearest(x, size, size)
    if strategy == "pad":
        return pad_to(fit_within(x, size), size, size)
    if strategy == "crop":
        return crop_window(x, size, size, rng)
    if strategy == "native":
        h, w = x.shape[:2]
        if max(h, w) > cfg.native_max_px:
            f = int(np.ceil(max(h, w) / cfg.native_max_px))
            x = resize_nearest(x, int(np.ceil(h / f)), int(np.ceil(w / f)))
        return pad_to(x, *native_shape(*x.shape[:2], cfg)) if min(x.shape[:2]) < cfg.native_min_px else x
    raise ModelError(f"unknown train.size_strategy {strategy!r}")


def input_shape_for(cfg: TrainConfig) -> tuple:
    return (None, None, 3) if cfg.size_strategy == "native" else (cfg.input_px, cfg.input_px, 3)


def dihedral(x: np.ndarray, k: int, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    """The k-th of the eight flips/rotations (k = 0 is the identity): rotate by 90*(k % 4), then flip if k >= 4."""
    out = np.rot90(x, k % 4, axes=axes)
    if k >= 4:
        out = np.flip(out, axis=axes[1])
    return np.ascontiguousarray(out)


def undo_dihedral(x: np.ndarray, k: int, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    """The inverse of ``dihedral(., k)``: ``undo_dihedral(dihedral(x, k), k) == x``."""
    if k >= 4:
        x = np.flip(x, axis=axes[1])
    return np.ascontiguousarray(np.rot90(x, -(k % 4), axes=axes))


def random_crop_fraction(x: np.ndarray, rng: np.random.Generator, min_fraction: float) -> np.ndarray:
    """A random window keeping a random fraction in [min_fraction, 1] of each side."""
    if min_fraction >= 1:
        return x
    h, w = x.shape[:2]
    ch = max(1, int(round(h * rng.uniform(min_fraction, 1.0))))
    cw = max(1, int(round(w * rng.uniform(min_fraction, 1.0))))
    r0, c0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return x[r0:r0 + ch, c0:c0 + cw]


def add_noise(x: np.ndarray, rng: np.random.Generator, std: float) -> np.ndarray:
    """Gaussian noise on tissue cells, clipped to [0, 1]; background cells are left exactly as they are."""
    if std <= 0:
        return x
    tissue = x >= 0
    noisy = np.clip(x + rng.normal(0.0, std, size=x.shape).astype(np.float32), 0.0, 1.0)
    return np.where(tissue, noisy, x).astype(np.float32)


def prepare(x: np.ndarray, cfg: TrainConfig, rng: np.random.Generator | None = None,
            augment: bool = False, flip: bool = True) -> np.ndarray:
    """One (h, w, 3) channel-selected map -> network input, augmented when ``augment`` (needs ``rng``).

    ``flip=False`` leaves the flips/rotations to the caller (native batches flip a whole batch at once).
    """
    if augment:
        if cfg.size_strategy != "crop":  # crop already draws a random window
            x = random_crop_fraction(x, rng, cfg.crop_fraction)
        if flip:
            x = dihedral(x, int(rng.integers(0, 8)))
        x = add_noise(x, rng, cfg.noise_std)
    return to_input(fit_size(x, cfg, rng if augment else None))
