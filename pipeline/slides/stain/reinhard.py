"""Reinhard colour transfer in CIELAB (scikit-image's ``rgb2lab``/``lab2rgb``): each channel's tissue mean and spread
are moved to the target's."""

from __future__ import annotations

import warnings

import numpy as np


def reinhard_estimate(pixels: np.ndarray) -> dict:
    """{"lab_mean": [L, a, b], "lab_std": [L, a, b]} of (n, 3) uint8 tissue pixels."""
    from skimage.color import rgb2lab

    lab = rgb2lab(pixels.reshape(1, -1, 3)).reshape(-1, 3)
    return {"lab_mean": lab.mean(axis=0).tolist(), "lab_std": lab.std(axis=0).tolist()}


def reinhard_target(estimates: list[dict]) -> dict:
    """The cohort target: median of the slides' means and spreads."""
    return {key: np.median(np.array([e[key] for e in estimates], np.float64), axis=0).tolist()
            for key in ("lab_mean", "lab_std")}


def reinhard_apply(rgb: np.ndarray, source: dict, target: dict) -> np.ndarray:
    """RGB (..., 3) (uint8, or floats in [0, 1]) with its LAB channels moved from ``source``'s mean/spread to
    ``target``'s; float64 in 0-255 (the caller rounds)."""
    from skimage.color import lab2rgb, rgb2lab

    gain = np.asarray(target["lab_std"], np.float64) / np.maximum(np.asarray(source["lab_std"], np.float64), 1e-6)
    lab = (rgb2lab(rgb) - np.asarray(source["lab_mean"])) * gain + np.asarray(target["lab_mean"])
    with warnings.catch_warnings():  # LAB values outside sRGB are clipped, as intended
        warnings.simplefilter("ignore", UserWarning)
        return lab2rgb(lab) * 255.0
