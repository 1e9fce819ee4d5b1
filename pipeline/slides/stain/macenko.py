"""Macenko stain estimate (stain vectors and concentration maxima) and the per-slide optical-density map.

The estimate is torchstain's numpy Macenko fit (eigen-plane of the optical density, extreme angles, 99th percentile
of the concentrations), on optical density against the slide's own glass brightness per channel (a yellower lamp or
a darker scan is then not mistaken for stain). A slide is normalised by one linear map in optical density
``OD_out = HE_target @ diag(maxC_target / maxC_slide) @ pinv(HE_slide) @ OD``: Macenko's unmix-rescale-remix as a
3x3 matrix, so it is fixed per slide and cheap per pixel; the result is lit with the target's glass brightness.
"""

from __future__ import annotations

import numpy as np

TORCHSTAIN_IO = 240.0  # the Io we hand torchstain after rescaling the pixels to the slide's own glass


def macenko_estimate(pixels: np.ndarray, glass: np.ndarray, luminosity_od: float, angle_percentile: float) -> dict:
    """{"stain_vectors": [H, E] (unit OD vectors), "max_concentrations": [h, e], "background": glass} of (n, 3)
    uint8 tissue pixels; ``glass``: (3,) brightness of the slide's glass (OD = -ln((I + 1) / glass))."""
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    glass = np.asarray(glass, np.float64)
    rescaled = TORCHSTAIN_IO * (pixels.reshape(-1, 3).astype(np.float64) + 1.0) / glass - 1.0  # same OD at Io=240
    normaliser = NumpyMacenkoNormalizer()
    with np.errstate(all="ignore"):
        normaliser.fit(rescaled.reshape(1, -1, 3), Io=TORCHSTAIN_IO, alpha=angle_percentile, beta=luminosity_od)
    vectors = np.asarray(normaliser.HERef, dtype=np.float64).T  # (2, 3): rows H, E
    return {"stain_vectors": vectors.tolist(), "max_concentrations": np.asarray(normaliser.maxCRef).tolist(),
            "background": glass.tolist()}


def macenko_target(estimates: list[dict]) -> dict:
    """The cohort target: component-wise median of the stain vectors (renormalised), the maxima and the glass."""
    vectors = np.median(np.array([e["stain_vectors"] for e in estimates], dtype=np.float64), axis=0)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return {"stain_vectors": vectors.tolist(),
            "max_concentrations": np.median([e["max_concentrations"] for e in estimates], axis=0).tolist(),
            "background": np.median([e["background"] for e in estimates], axis=0).tolist()}


def macenko_od_matrix(source: dict, target: dict) -> np.ndarray:
    """(3, 3) float64 M with OD_out = M @ OD_in (column vectors)."""
    he_src = np.asarray(source["stain_vectors"], dtype=np.float64).T  # (3, 2)
    he_tgt = np.asarray(target["stain_vectors"], dtype=np.float64).T
    ratio = np.asarray(target["max_concentrations"], np.float64) / np.asarray(source["max_concentrations"], np.float64)
    return he_tgt @ np.diag(ratio) @ np.linalg.pinv(he_src)
