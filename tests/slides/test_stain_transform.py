"""The per-slide transforms: compiled kernels against their numpy forms, and their accuracy."""

from __future__ import annotations

import numpy as np

from pipeline.slides.stain import transform as stain_transform
from pipeline.slides.stain.reinhard import reinhard_apply
from pipeline.slides.stain.transform import apply_lattice, apply_od_matrix, apply_stain_transform, colour_lattice


def _tiles(seed: int = 0, n: int = 3, px: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, px, px, 3), dtype=np.uint8)


def test_od_map_kernel_matches_numpy():
    tiles = _tiles()
    pixels = tiles[:, ::2, 1:]  # a strided view, as a batch sliced from a strip can be
    matrix = np.array([[0.9, 0.1, 0.0], [0.05, 1.2, 0.1], [0.0, 0.2, 0.8]])
    tables = stain_transform._od_tables(matrix, [235.0, 230.0, 220.0], [240.0, 238.0, 241.0])
    fast, slow = np.empty_like(pixels), np.empty_like(pixels)
    stain_transform._od_map(pixels, fast, *tables)
    stain_transform._od_map_py(pixels, slow, *tables)
    assert np.abs(fast.astype(int) - slow).max() <= 1  # truncation vs floor below the table's first level

    # the tables against the direct formula: I_out = Io_out * exp(-M @ -ln((I + 1) / Io_in))
    od = -np.log((pixels + 1.0) / np.array([235.0, 230.0, 220.0]))
    assert apply_od_matrix(pixels, matrix, [235.0, 230.0, 220.0], [240.0, 238.0, 241.0]).tolist() == fast.tolist()
    direct = np.clip(np.rint(np.array([240.0, 238.0, 241.0]) * np.exp(-(od @ matrix.T))), 0, 255)
    assert np.abs(fast.astype(int) - direct).max() <= 1


def test_identity_od_map_keeps_pixels():
    tiles = _tiles(1)
    out = apply_od_matrix(tiles, np.eye(3), [240.0] * 3, [240.0] * 3)
    keep = tiles < 239  # brighter than the glass saturates at Io - 1
    assert np.abs(out.astype(int) - tiles)[keep].max() <= 1
    assert out.shape == tiles.shape and out.dtype == np.uint8


def test_od_map_is_beer_lambert():
    """Doubling the optical density squares the transmitted fraction: 120/240 -> 60/240 -> 30/240 (+1 offsets)."""
    tiles = np.full((1, 2, 2, 3), 119, np.uint8)  # (119 + 1) / 240 = 1/2
    out = apply_od_matrix(tiles, 2 * np.eye(3), [240.0] * 3, [240.0] * 3)
    assert np.all(out == 60)


def test_lattice_kernel_matches_numpy_and_is_accurate():
    tiles = _tiles(2)
    pixels = tiles.reshape(-1, 3)

    def curve(rgb):
        return 255.0 * (rgb / 255.0) ** 0.8

    lut = colour_lattice(curve)
    n = lut.shape[0] - 1
    position = np.arange(256) * (n / 255.0)
    base = np.minimum(position.astype(np.int64), n - 1)
    frac = (position - base).astype(np.float32)
    fast, slow = np.empty_like(pixels), np.empty_like(pixels)
    stain_transform._lattice(pixels, fast, lut, base, frac)
    stain_transform._lattice_py(pixels, slow, lut, base, frac)
    assert np.abs(fast.astype(int) - slow).max() <= 1
    exact = np.clip(np.rint(curve(tiles.astype(np.float64))), 0, 255)
    assert np.abs(apply_lattice(tiles, lut).astype(int) - exact).mean() < 0.6


def test_reinhard_lattice_is_close_to_the_direct_conversion():
    tiles = _tiles(3)
    source = {"lab_mean": [60.0, 25.0, -10.0], "lab_std": [15.0, 10.0, 8.0]}
    target = {"lab_mean": [65.0, 20.0, -5.0], "lab_std": [12.0, 9.0, 7.0]}
    out = apply_stain_transform(tiles, {"method": "reinhard", "source": source, "target": target})
    direct = np.clip(np.rint(reinhard_apply(tiles, source, target)), 0, 255)
    assert np.abs(out.astype(int) - direct).mean() < 1.5


def test_no_transform_returns_the_tiles():
    tiles = _tiles(4)
    assert apply_stain_transform(tiles, None) is tiles


def test_load_kernels_compiles_the_methods_kernel():
    stain_transform.load_kernels("macenko")
    stain_transform.load_kernels("reinhard")
    stain_transform.load_kernels("none")
    for kernel in (stain_transform._od_map, stain_transform._lattice):
        assert getattr(kernel, "signatures", [None])  # numba: compiled for at least one signature
