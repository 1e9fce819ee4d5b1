"""Tile encoders: one interface (``base.Encoder``), one file per kind, chosen by ``descriptor.name``.

``stats`` (colour/stain/texture statistics, no model), ``keras`` (``cnn`` is its old name), ``onnx`` and ``timm``.
``get_encoder`` builds a config's encoder once per process (each Dask worker builds its own); ``validate_encoder``
builds it in the client and runs two blank tiles through it before any slide is read, so a missing weights file, an
input size the model does not take or an output that is not (n, d) stop the run with a typed error up front.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import replace

import numpy as np

from ...core.config import DescriptorConfig, PipelineConfig
from ...core.errors import ConfigError, EncoderError, EncoderInputSizeError
from .base import Encoder, EncoderSpec

# kind -> (module in this package, class); modules are imported on first use (keras, torch and onnxruntime are heavy)
ENCODER_KINDS = {
    "stats": ("stats", "StatsEncoder"),
    "keras": ("keras", "KerasEncoder"),
    "cnn": ("keras", "KerasEncoder"),
    "onnx": ("onnx", "OnnxEncoder"),
    "timm": ("timm", "TimmEncoder"),
}
CACHE_SIZE = 2  # encoders kept per process (a model can take GBs)
_encoders: dict[str, Encoder] = {}


def get_encoder(config: DescriptorConfig) -> Encoder:
    """The encoder of ``config``, built on first use in this process and kept for the next blocks."""
    # keyed by process too: a worker forked from the client must not use the client's session (its threads are gone)
    key = f"{os.getpid()}:{config.model_dump_json(exclude={'batch_tiles', 'gpu_batch_tiles'})}"
    encoder = _encoders.get(key)
    if encoder is None:
        module, name = ENCODER_KINDS[config.name]
        cls = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        encoder = cls(config)
        while len(_encoders) >= CACHE_SIZE:
            _encoders.pop(next(iter(_encoders)))
        _encoders[key] = encoder
    return encoder


def validate_encoder(config: PipelineConfig) -> Encoder:
    """Build the encoder and check it on two blank tiles: output (n, d), input size, declared µm/px.

    Raises a typed ``EncoderError`` (a ``ConfigError``: the command stops before any slide is read).
    """
    descriptor = config.descriptor
    encoder = get_encoder(descriptor)
    if not encoder.learned:
        return encoder
    spec = encoder.spec
    probe = np.full((2, config.tiling.tile_px, config.tiling.tile_px, 3), 200, np.uint8)
    try:
        out = encoder.encode(probe)
    except EncoderError:
        raise
    except Exception as err:  # noqa: BLE001 - a model that cannot run this input: say which setting to change
        cls = EncoderInputSizeError if descriptor.input_px else EncoderError
        raise cls(f"the encoder fails on a batch of {spec.input_px}-px tiles: {type(err).__name__}: {err}",
                  path=spec.model) from None
    if out.shape[1] != spec.dims:  # a model with a symbolic output width: now known
        encoder.spec = replace(spec, dims=int(out.shape[1]))
    check_resolution(config, encoder.spec)
    return encoder


def check_resolution(config: PipelineConfig, spec: EncoderSpec) -> None:
    """The encoder sees tiles at tiling.mpp x tile_px / input_px µm/px: that must be the µm/px it declares."""
    if spec.mpp is None or not spec.input_px:
        return
    seen_mpp = config.tiling.mpp * config.tiling.tile_px / spec.input_px
    if abs(seen_mpp / spec.mpp - 1) > config.tiling.mpp_tolerance:
        tile_px = round(spec.input_px * spec.mpp / config.tiling.mpp)
        raise ConfigError(
            f"the encoder {spec.model} expects {spec.mpp:g} µm/px at its {spec.input_px}-px input, but "
            f"{config.tiling.tile_px}-px tiles at {config.tiling.mpp:g} µm/px resized to {spec.input_px} px are "
            f"{seen_mpp:.3g} µm/px",
            fix=f"Set tiling.tile_px to {tile_px} (or tiling.mpp to {spec.mpp:g} with tile_px {spec.input_px}).")


def encoder_info(encoder: Encoder) -> dict:
    """What the slide tasks need to know of the encoder without building it: its column names and its identity
    (kind, model, weights and their file hashes, input size, normalisation), stored in each slide store."""
    return {"feature_names": encoder.feature_names(), "identity": encoder.spec.identity()}


__all__ = ["ENCODER_KINDS", "Encoder", "EncoderSpec", "check_resolution", "encoder_info", "get_encoder",
           "validate_encoder"]
