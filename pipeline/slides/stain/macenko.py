"""Macenko stain estimate (stain vectors and concentration maxima) and the per-slide optical-density map.

The estimate is Macenko's (as in torchstain's numpy ``fit``: eigen-plane of the optical density, extreme angles, 99th
percentile of the concentrations), on optical density against the slide's own glass brightness per channel (a
yellower lamp or a darker scan is then not mistaken for stain), with one change: a pixel is "stained" when the norm of
its optical density reaches ``luminosity_od * sqrt(3)`` (a grey pixel at ``luminosity_od`` in every channel), not
when every channel does. Torchstain's every-channel rule drops the pixels of an eosin that absorbs little red, so the
eosin vector came out mixed with haematoxylin, by an amount that depends on the lab (docs/design/stain.md).
A slide is normalised by one linear map in optical density
``OD_out = HE_target @ diag(maxC_target / maxC_slide) @ pinv(HE_slide) @ OD``: Macenko's unmix-rescale-remix as a
3x3 matrix, so it is fixed per slide and cheap per pixel; the result is lit with the target's glass brightness.
"""

from __future__ import annotations

import numpy as np

MAX_CONCENTRATION_PERCENTILE = 99.0
# Changes when the fit gives other numbers for the same pixels and settings: cached estimates (OUT/stain.json) and
# the target fitted on them are then redone (torchstain's every-channel rule was revision 1).
ESTIMATE_REVISION = 2


def od_tables(glass) -> list[np.ndarray]:
    """Per channel, the (256,) float64 optical density -ln((I + 1) / glass) of every uint8 value I: the definition
    the estimate and the per-slide transform (``transform.py``) share."""
    values = np.arange(256, dtype=np.float64) + 1.0
    return [-np.log(values / float(g)) for g in np.broadcast_to(np.asarray(glass, np.float64), 3)]


def optical_density(pixels: np.ndarray, glass: np.ndarray) -> np.ndarray:
    """(n, 3) float64 OD = -ln((I + 1) / glass) of (n, 3) uint8 pixels (``od_tables``)."""
    tables = od_tables(glass)
    pixels = np.asarray(pixels, np.uint8).reshape(-1, 3)
    return np.stack([tables[c][pixels[:, c]] for c in range(3)], axis=1)


def stained(od: np.ndarray, luminosity_od: float) -> np.ndarray:
    """(n,) bool: pixels whose optical density norm reaches that of a grey pixel at ``luminosity_od`` per channel."""
    return np.einsum("ij,ij->i", od, od) >= 3.0 * float(luminosity_od) ** 2


def stain_plane(od: np.ndarray) -> np.ndarray:
    """(3, 2): the two leading eigenvectors of the optical density's covariance, the first pointing into positive
    OD (so that every pixel's angle in the plane lies within (-pi, pi) without wrapping)."""
    _, vectors = np.linalg.eigh(np.cov(od.T))
    plane = vectors[:, [2, 1]]
    return plane * np.sign(plane[:, 0].sum() or 1.0)


def macenko_estimate(pixels: np.ndarray, glass: np.ndarray, luminosity_od: float, angle_percentile: float) -> dict:
    """{"stain_vectors": [H, E] (unit OD vectors), "max_concentrations": [h, e], "background": glass} of (n, 3)
    uint8 tissue pixels; ``glass``: (3,) brightness of the slide's glass (OD = -ln((I + 1) / glass))."""
    glass = np.asarray(glass, np.float64)
    od = optical_density(pixels, glass)
    fit = od[stained(od, luminosity_od)]
    if len(fit) < 3:
        raise ValueError("fewer than three stained pixels")
    plane = stain_plane(fit)
    coords = fit @ plane
    angles = np.percentile(np.arctan2(coords[:, 1], coords[:, 0]), [angle_percentile, 100.0 - angle_percentile])
    ends = plane @ np.stack([np.cos(angles), np.sin(angles)])  # (3, 2): the two extreme directions
    he = ends if ends[0, 0] > ends[0, 1] else ends[:, ::-1]  # haematoxylin absorbs red more than eosin
    concentrations = np.linalg.pinv(he) @ od.T
    maxima = np.percentile(concentrations, MAX_CONCENTRATION_PERCENTILE, axis=1)
    return {"stain_vectors": he.T.tolist(), "max_concentrations": maxima.tolist(), "background": glass.tolist()}


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
