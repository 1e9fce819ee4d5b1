"""One slide's stain estimate (with the checks that leave a slide as it is), the cohort target, and the per-slide
transform handed to the workers. All plain JSON-able dicts: they go into store attrs, ``OUT/config.yaml`` and the
reducer's JSON.

Pixels with more green than red (blue, green and teal marker) are not used. A slide is left as it is
(``status: "not_estimated"`` with a ``reason``) when its image is dark (fluorescence),
when it has fewer than ``min_tissue_pixels`` stained tissue pixels, or when the Macenko vectors are not H&E: an eosin
vector absorbs little red (red share <= 0.37 on H&E tiles, >= 0.55 on IHC tiles with DAB).
"""

from __future__ import annotations

import numpy as np

from .macenko import macenko_estimate, macenko_od_matrix, macenko_target, optical_density, stained
from .reinhard import reinhard_estimate, reinhard_target

DARK_MEDIAN_GREY = 80  # a brightfield slide's median grey (glass and tissue) is far above this; fluorescence below
EOSIN_MAX_RED = 0.45  # red component of a unit eosin OD vector (H&E estimates: 0.07-0.37; IHC DAB/brown: >= 0.55)
MIN_STAIN_ANGLE_DEG = 5.0  # H and E vectors closer than this: one stain only
GLASS_MIN_GREY = 180  # pixels outside the tissue mask darker than this (ink, dust, slide edge) are not glass
MIN_GLASS_PIXELS = 100
DEFAULT_GLASS = 240.0  # glass brightness of a given target without one
# An eosin that absorbs almost no red comes out slightly negative in red (-0.08 at worst on the stain-batch cohorts,
# true red share 0.08): the extreme-angle percentile overshoots a little. A clearly negative component is not a stain.
MAX_NEGATIVE_OD = 0.15
MAX_PIXELS = 20_000  # tissue pixels the estimate uses at most (a seeded sample: a bounded cost on huge slides)


def _not_estimated(method: str, reason: str, tissue_pixels: int) -> dict:
    return {"method": method, "status": "not_estimated", "reason": reason, "estimate": None,
            "tissue_pixels": int(tissue_pixels)}


def median_of_counts(values: np.ndarray, levels: int) -> float:
    """``np.median`` of small non-negative integers (< ``levels``) from their histogram: the same value, ~5x faster
    than sorting a thumbnail's worth of them."""
    counts = np.cumsum(np.bincount(values.ravel(), minlength=levels))
    n = int(counts[-1])
    if n == 0:
        return float("nan")
    low, high = np.searchsorted(counts, [(n - 1) // 2 + 1, n // 2 + 1])
    return (float(low) + float(high)) / 2.0


def glass_brightness(rgb: np.ndarray, tissue: np.ndarray | None, fixed: float | None) -> np.ndarray:
    """(3,) brightness of the slide's glass: ``fixed`` when given, else the per-channel median of the bright pixels
    outside the tissue (the 99th percentile of all pixels when there are too few, e.g. a tile), capped to 150-255."""
    if fixed is not None:
        return np.full(3, float(fixed))
    pixels = rgb.reshape(-1, 3)
    if tissue is not None:
        outside = rgb[~np.asarray(tissue, bool)]
        outside = outside[outside.sum(axis=1, dtype=np.uint16) > 3 * GLASS_MIN_GREY]  # mean grey above it
        if len(outside) >= MIN_GLASS_PIXELS:
            medians = [median_of_counts(outside[:, c], 256) for c in range(3)]
            return np.clip(np.asarray(medians) + 1.0, 150.0, 255.0)
    return np.clip(np.percentile(pixels, 99, axis=0) + 1.0, 150.0, 255.0)


def he_problem(stain_vectors: np.ndarray, max_concentrations: np.ndarray) -> str | None:
    """Why Macenko vectors (2, 3) and maxima (2,) are not an H&E estimate, or None when they are."""
    h, e = np.asarray(stain_vectors, np.float64)
    maxima = np.asarray(max_concentrations, np.float64)
    if not (np.isfinite(stain_vectors).all() and np.isfinite(maxima).all() and (maxima > 0).all()):
        return "the stain estimate is not finite (a single colour?)"
    if (h < -MAX_NEGATIVE_OD).any() or (e < -MAX_NEGATIVE_OD).any():
        return "a stain vector has negative optical density (not two absorbing stains)"
    angle = float(np.degrees(np.arccos(np.clip(h @ e, -1.0, 1.0))))
    if angle < MIN_STAIN_ANGLE_DEG:
        return f"the two stain vectors are {angle:.1f} degrees apart (one stain only)"
    if e[0] > EOSIN_MAX_RED:
        return (f"no eosin: the second stain's optical density {np.round(e, 2).tolist()} (R, G, B) absorbs red "
                "strongly, eosin does not; an IHC or special stain?")
    return None


def estimate_stain(thumbnail: np.ndarray, tissue: np.ndarray | None, settings) -> dict:
    """The stain estimate of one slide from its low-resolution image and tissue mask (``settings``: ``StainConfig``).

    Returns {"method", "status": "estimated" | "not_estimated", "reason", "estimate", "tissue_pixels"}; never raises
    for a slide whose stain cannot be estimated.
    """
    method = settings.method
    rgb = np.ascontiguousarray(thumbnail[..., :3], dtype=np.uint8)
    grey = median_of_counts(rgb.sum(axis=-1, dtype=np.uint16), 766) / 3.0 if rgb.size else 0.0  # median mean grey
    if grey < DARK_MEDIAN_GREY:
        return _not_estimated(method, f"the image is dark (median grey {grey:.0f}): fluorescence or darkfield", 0)
    pixels = rgb.reshape(-1, 3) if tissue is None else rgb[np.asarray(tissue, bool)]
    pixels = pixels[pixels[:, 0] >= pixels[:, 1]]  # green above red is ink (blue, green, teal), not H&E
    if len(pixels) > MAX_PIXELS:  # a seeded sample: the estimate's cost stays bounded on huge slides
        pixels = pixels[np.random.default_rng(0).choice(len(pixels), MAX_PIXELS, replace=False)]
    glass = glass_brightness(rgb, tissue, settings.background_intensity)
    count = int(stained(optical_density(pixels, glass), settings.luminosity_od).sum())
    if count < settings.min_tissue_pixels:
        return _not_estimated(method, f"too little stained tissue ({count} pixels at the mask resolution, "
                                      f"{settings.min_tissue_pixels} needed)", count)
    try:
        mac = macenko_estimate(pixels, glass, settings.luminosity_od, settings.angle_percentile)
    except (np.linalg.LinAlgError, ValueError) as err:
        return _not_estimated(method, f"Macenko estimate failed: {err}", count)
    problem = he_problem(np.asarray(mac["stain_vectors"]), np.asarray(mac["max_concentrations"]))
    if problem:
        return _not_estimated(method, problem, count)
    estimate = mac if method == "macenko" else reinhard_estimate(pixels)
    return {"method": method, "status": "estimated", "reason": None, "estimate": estimate, "tissue_pixels": count}


def fit_target(records: list[dict], method: str) -> dict | None:
    """The cohort target from the slides' records (median of the estimated ones); None when none was estimated."""
    estimates = [r["estimate"] for r in records if r.get("status") == "estimated" and r.get("method") == method]
    if not estimates:
        return None
    return macenko_target(estimates) if method == "macenko" else reinhard_target(estimates)


def slide_transform(record: dict | None, target: dict | None, settings) -> dict | None:
    """The fixed transform a worker applies to every tile of the slide, or None (the slide is left as it is)."""
    if settings.method == "none" or target is None or not record or record.get("status") != "estimated":
        return None
    if settings.method == "macenko":
        matrix = macenko_od_matrix(record["estimate"], target)
        return {"method": "macenko", "od_matrix": matrix.tolist(), "background": record["estimate"]["background"],
                "target_background": list(target.get("background") or [DEFAULT_GLASS] * 3)}
    return {"method": "reinhard", "source": record["estimate"], "target": target}
