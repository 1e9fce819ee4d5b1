"""The backend-specific questions (how many GPUs does the Keras backend see, mixed precision), answered in small
named functions: the only places of the model code that know the backend.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

log = logging.getLogger("pipeline")


def _tf_gpu_count() -> int:
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


def _jax_gpu_count() -> int:
    import jax

    return sum(1 for d in jax.devices() if d.platform in ("gpu", "cuda", "rocm"))


def _torch_gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_count() -> int:
    """GPUs visible to the current Keras backend."""
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            return _tf_gpu_count()
        if backend == "jax":
            return _jax_gpu_count()
        if backend == "torch":
            return _torch_gpu_count()
    except Exception as err:  # noqa: BLE001 - a broken GPU setup means "train on CPU", with a note
        log.warning("could not list GPUs for backend %s: %s", backend, err)
    return 0


def use_mixed_precision(mode: str) -> bool:
    """``auto``: mixed float16 on GPU only (on CPU it is slower and no more accurate)."""
    if mode == "on":
        return True
    if mode == "off":
        return False
    return gpu_count() > 0


@contextlib.contextmanager
def dtype_policy(name: str | None) -> Iterator[None]:
    """Build layers under a dtype policy (e.g. ``mixed_float16``) without leaving it set globally."""
    import keras

    if not name:
        yield
        return
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)
