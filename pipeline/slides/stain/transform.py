"""Applying a slide's fixed stain transform to a batch of tiles (n, h, w, 3) uint8, in the worker before descriptors.

* macenko: per pixel and output channel, three look-ups of the input channels' contributions to its optical density
  (the 3x3 map folded into the tables, against the slide's glass) and one of the intensity table (optical density
  quantised to 1/1024: under 0.25 grey levels of error);
* reinhard: the slide's colour map sampled on a 33^3 RGB lattice (scikit-image's CIELAB conversions, once per
  block) and interpolated trilinearly per pixel (within about one grey level of the direct conversion).

Both kernels are compiled with numba (numpy otherwise).
"""

from __future__ import annotations

import numpy as np

from ...core.jit import njit
from .macenko import od_tables
from .reinhard import reinhard_apply

OD_MIN, OD_MAX, OD_STEPS = -0.25, 8.0, 1024  # range and resolution of the intensity tables
LATTICE_NODES = 33  # per RGB axis of the sampled colour map


def _od_tables(matrix: np.ndarray, background_in, background_out) -> tuple[np.ndarray, ...]:
    """Per input channel k, (256, 3) float32 tables t_k[v, c] = matrix[c, k] * OD_k(v) in intensity-table steps (t_0
    also carries the table's offset and the rounding), and (3, K) uint8: the intensity of each OD level per channel."""
    steps = []
    for k, od in enumerate(od_tables(background_in)):
        steps.append((od[:, None] * np.asarray(matrix, np.float64)[None, :, k] * OD_STEPS).astype(np.float32))
    steps[0] += np.float32(-OD_MIN * OD_STEPS + 0.5)
    levels = OD_MIN + np.arange(int((OD_MAX - OD_MIN) * OD_STEPS) + 1) / OD_STEPS
    intensity = np.stack([np.clip(np.rint(b * np.exp(-levels)), 0, 255) for b in background_out]).astype(np.uint8)
    return steps[0], steps[1], steps[2], intensity


def _od_map_py(pixels, out, t0, t1, t2, intensity):
    index = np.floor(t0[pixels[..., 0]] + t1[pixels[..., 1]] + t2[pixels[..., 2]]).astype(np.int64)
    index = np.clip(index, 0, intensity.shape[1] - 1)
    for c in range(3):
        out[..., c] = intensity[c][index[..., c]]


def _od_map_kernel(pixels, out, t0, t1, t2, intensity):  # pragma: no cover - compiled
    last = intensity.shape[1] - 1
    for n in range(pixels.shape[0]):  # (n, h, w, 3) in any memory layout: no copy of a strided batch
        for y in range(pixels.shape[1]):
            for x in range(pixels.shape[2]):
                a = pixels[n, y, x, 0]
                b = pixels[n, y, x, 1]
                c = pixels[n, y, x, 2]
                for ch in range(3):
                    k = np.int32(t0[a, ch] + t1[b, ch] + t2[c, ch])  # >= 0 where it matters: truncation = floor
                    k = min(max(k, 0), last)
                    out[n, y, x, ch] = intensity[ch, k]


_od_map = njit(_od_map_kernel) or _od_map_py


def apply_od_matrix(tiles: np.ndarray, matrix: np.ndarray, background_in, background_out) -> np.ndarray:
    """uint8 tiles (..., 3) through OD_out = matrix @ OD_in, with OD_in = -ln((I + 1) / background_in) per channel
    and I_out = background_out * exp(-OD_out)."""
    tables = _od_tables(matrix, np.broadcast_to(background_in, 3), np.broadcast_to(background_out, 3))
    pixels = np.asarray(tiles, dtype=np.uint8).reshape((-1,) + tiles.shape[-3:])
    out = np.empty(pixels.shape, np.uint8)
    _od_map(pixels, out, *tables)
    return out.reshape(tiles.shape)


def _lattice_py(pixels, out, lut, base, frac):
    i0, f = base[pixels].astype(np.int64), frac[pixels]
    acc = np.zeros((len(pixels), 3), np.float32)
    for dr in (0, 1):
        for dg in (0, 1):
            for db in (0, 1):
                w = ((f[:, 0] if dr else 1 - f[:, 0]) * (f[:, 1] if dg else 1 - f[:, 1])
                     * (f[:, 2] if db else 1 - f[:, 2]))
                acc += w[:, None] * lut[i0[:, 0] + dr, i0[:, 1] + dg, i0[:, 2] + db]
    out[...] = np.clip(np.rint(acc), 0, 255).astype(np.uint8)


def _lattice_kernel(pixels, out, lut, base, frac):  # pragma: no cover - compiled
    for i in range(pixels.shape[0]):
        r0 = base[pixels[i, 0]]
        g0 = base[pixels[i, 1]]
        b0 = base[pixels[i, 2]]
        fr = frac[pixels[i, 0]]
        fg = frac[pixels[i, 1]]
        fb = frac[pixels[i, 2]]
        w000 = (1 - fr) * (1 - fg) * (1 - fb)
        w001 = (1 - fr) * (1 - fg) * fb
        w010 = (1 - fr) * fg * (1 - fb)
        w011 = (1 - fr) * fg * fb
        w100 = fr * (1 - fg) * (1 - fb)
        w101 = fr * (1 - fg) * fb
        w110 = fr * fg * (1 - fb)
        w111 = fr * fg * fb
        for ch in range(3):
            v = (w000 * lut[r0, g0, b0, ch] + w001 * lut[r0, g0, b0 + 1, ch] + w010 * lut[r0, g0 + 1, b0, ch]
                 + w011 * lut[r0, g0 + 1, b0 + 1, ch] + w100 * lut[r0 + 1, g0, b0, ch]
                 + w101 * lut[r0 + 1, g0, b0 + 1, ch] + w110 * lut[r0 + 1, g0 + 1, b0, ch]
                 + w111 * lut[r0 + 1, g0 + 1, b0 + 1, ch] + np.float32(0.5))
            out[i, ch] = 0 if v < 0 else (255 if v > 255 else np.uint8(v))


_lattice = njit(_lattice_kernel) or _lattice_py


def colour_lattice(colour_map, nodes: int = LATTICE_NODES) -> np.ndarray:
    """(nodes, nodes, nodes, 3) float32: ``colour_map`` (RGB (..., 3) -> floats in 0-255) on an RGB lattice."""
    axis = np.linspace(0.0, 255.0, nodes)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1)
    return np.asarray(colour_map(grid), dtype=np.float32)


def apply_lattice(tiles: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """uint8 tiles (..., 3) through a colour lattice (trilinear interpolation)."""
    n = lut.shape[0] - 1
    position = np.arange(256) * (n / 255.0)
    base = np.minimum(position.astype(np.int64), n - 1)
    frac = (position - base).astype(np.float32)
    pixels = np.ascontiguousarray(tiles, dtype=np.uint8).reshape(-1, 3)
    out = np.empty_like(pixels)
    _lattice(pixels, out, np.ascontiguousarray(lut, dtype=np.float32), base, frac)
    return out.reshape(tiles.shape)


def apply_stain_transform(tiles: np.ndarray, transform: dict | None) -> np.ndarray:
    """Tiles (n, h, w, 3) uint8 with the slide's transform (from ``slide_transform``); unchanged when it is None."""
    if transform is None or len(tiles) == 0:
        return tiles
    if transform["method"] == "macenko":
        return apply_od_matrix(tiles, np.asarray(transform["od_matrix"]), transform["background"],
                               transform["target_background"])
    if transform["method"] == "reinhard":
        lut = colour_lattice(lambda rgb: reinhard_apply(rgb / 255.0, transform["source"], transform["target"]))
        return apply_lattice(tiles, lut)
    raise ValueError(f"unknown stain transform {transform['method']!r}")


def load_kernels(method: str) -> None:
    """Load the compiled kernel of ``method`` in this process (before local workers fork, so each need not)."""
    tiles = np.full((1, 2, 2, 3), 128, np.uint8)
    if method == "macenko":
        apply_od_matrix(tiles, np.eye(3), [240.0] * 3, [240.0] * 3)
    elif method == "reinhard":
        apply_lattice(tiles, colour_lattice(lambda rgb: rgb))
