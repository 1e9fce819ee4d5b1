"""The per-slide Zarr store contract (pipeline/store.py): layout, partial -> final, resume markers, atomic arrays."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.store import (PARTIAL_SUFFIX, array_attrs, create_partial_store, finalize_store, list_stores,
                                 open_store, package_versions, partial_path, progress_dir, read_array, read_attrs,
                                 slides_dir, store_is_current, store_path, write_array, write_complete_store,
                                 write_descriptor_chunk)

GRID = (5, 7)  # rows, cols of tiles
DIMS = 3
CHUNK = 4  # chunk edge in tiles: blocks start at rows 0, 4 and cols 0, 4
BLOCKS = [(0, 4, 0, 4), (0, 4, 4, 7), (4, 5, 0, 4), (4, 5, 4, 7)]


def _inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    fraction = rng.random(GRID).astype(np.float64)
    return fraction, fraction >= 0.5, rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)


def _attrs(slide_id: str = "s1", fingerprint: str = "fp-1", config_hash: str = "h-1") -> dict:
    return {"slide_id": slide_id, "fingerprint": fingerprint, "config_hash": config_hash, "mpp": 0.25,
            "tile_grid": {"rows": GRID[0], "cols": GRID[1]}}


def _create(out, slide_id="s1", **attrs):
    fraction, mask, thumb = _inputs()
    return create_partial_store(out, slide_id, _attrs(slide_id, **attrs), GRID, DIMS, CHUNK, fraction, mask, thumb)


def _block_values(block, value: float) -> np.ndarray:
    r0, r1, c0, c1 = block
    return np.full((r1 - r0, c1 - c0, DIMS), value, np.float32)


def _hidden(path):
    """Entries a reader should never see: temporary or replaced arrays and stores."""
    return sorted(p.name for p in path.iterdir() if p.name.startswith("."))


def test_layout(tmp_path):
    assert slides_dir(tmp_path) == tmp_path / "slides"
    assert store_path(tmp_path, "a-1") == tmp_path / "slides" / "a-1.zarr"
    assert partial_path(tmp_path, "a-1") == tmp_path / "slides" / f"a-1.zarr{PARTIAL_SUFFIX}"
    assert progress_dir(tmp_path, "a-1") == tmp_path / "slides" / ".progress" / "a-1"


def test_partial_store_holds_the_arrays_and_is_not_listed(tmp_path):
    path, done = _create(tmp_path)
    assert path == partial_path(tmp_path, "s1") and done == set()
    assert not store_path(tmp_path, "s1").exists() and progress_dir(tmp_path, "s1").is_dir()
    fraction, mask, thumb = _inputs()
    descriptors = read_array(path, "descriptors")
    assert descriptors.shape == (*GRID, DIMS) and descriptors.dtype == np.float32 and np.isnan(descriptors).all()
    assert open_store(path)["descriptors"].chunks == (CHUNK, CHUNK, DIMS)
    assert read_array(path, "tissue_fraction").dtype == np.float32
    np.testing.assert_array_equal(read_array(path, "tissue_fraction"), fraction.astype(np.float32))
    np.testing.assert_array_equal(read_array(path, "tissue_mask"), mask)
    assert read_array(path, "tissue_mask").dtype == bool
    np.testing.assert_array_equal(read_array(path, "thumbnail"), thumb)
    attrs = read_attrs(path)
    assert attrs == {**_attrs(), "grid_shape": list(GRID), "complete": False}
    assert list_stores(tmp_path) == []
    assert not store_is_current(path, "fp-1", "h-1")  # incomplete


def test_further_arrays_are_made_with_the_partial_store(tmp_path):
    """``arrays``: made with the store (data or empty, attributes); a store missing one of them is made again."""
    codes = np.arange(np.prod(GRID), dtype=np.uint8).reshape(GRID)
    arrays = {"qc_code": {"data": codes, "attributes": {"codes": {"pen": 1}}},
              "qc_scores": {"shape": (*GRID, 2), "dtype": np.float32, "fill_value": np.nan,
                            "chunks": (CHUNK, CHUNK, 2), "attributes": {"detectors": ["a", "b"]}}}
    fraction, mask, thumb = _inputs()
    path, _ = create_partial_store(tmp_path, "s1", _attrs(), GRID, DIMS, CHUNK, fraction, mask, thumb, arrays)
    np.testing.assert_array_equal(read_array(path, "qc_code"), codes)
    assert array_attrs(path, "qc_code") == {"codes": {"pen": 1}}
    scores = read_array(path, "qc_scores")
    assert scores.shape == (*GRID, 2) and np.isnan(scores).all()
    assert array_attrs(path, "qc_scores") == {"detectors": ["a", "b"]}
    assert read_attrs(path) == {**_attrs(), "grid_shape": list(GRID), "complete": False}
    write_descriptor_chunk(path, tmp_path, "s1", BLOCKS[0], _block_values(BLOCKS[0], 1.0))
    _, done = create_partial_store(tmp_path, "s1", _attrs(), GRID, DIMS, CHUNK, fraction, mask, thumb, arrays)
    assert done == {(0, 0)}  # reused with its arrays
    more = {**arrays, "tile_annotation": {"data": np.zeros(GRID, np.uint16)}}
    _, done = create_partial_store(tmp_path, "s1", _attrs(), GRID, DIMS, CHUNK, fraction, mask, thumb, more)
    assert done == set() and np.isnan(read_array(path, "descriptors")).all()  # made again: it lacked one
    np.testing.assert_array_equal(read_array(path, "tile_annotation"), np.zeros(GRID, np.uint16))


def test_chunks_written_are_marked_and_kept_on_resume(tmp_path):
    path, _ = _create(tmp_path)
    write_descriptor_chunk(path, tmp_path, "s1", BLOCKS[1], _block_values(BLOCKS[1], 1.5))
    write_descriptor_chunk(path, tmp_path, "s1", BLOCKS[2], _block_values(BLOCKS[2], 2.5))
    assert sorted(p.name for p in progress_dir(tmp_path, "s1").iterdir()) == ["0_4", "4_0"]
    # an interrupted run, started again with the same slide and settings, skips the written chunks
    again, done = _create(tmp_path)
    assert again == path and done == {(0, 4), (4, 0)}
    values = read_array(path, "descriptors")
    assert (values[0:4, 4:7] == 1.5).all() and (values[4:5, 0:4] == 2.5).all()
    assert np.isnan(values[0:4, 0:4]).all() and np.isnan(values[4:5, 4:7]).all()


@pytest.mark.parametrize("changed", [{"fingerprint": "fp-2"}, {"config_hash": "h-2"}])
def test_partial_store_of_other_settings_or_slide_bytes_starts_over(tmp_path, changed):
    path, _ = _create(tmp_path)
    write_descriptor_chunk(path, tmp_path, "s1", BLOCKS[0], _block_values(BLOCKS[0], 1.0))
    again, done = _create(tmp_path, **changed)
    assert again == path and done == set()
    assert np.isnan(read_array(path, "descriptors")).all()
    assert list(progress_dir(tmp_path, "s1").iterdir()) == []
    assert {k: read_attrs(path)[k] for k in changed} == changed


def test_finalize_moves_the_store_into_place(tmp_path):
    path, _ = _create(tmp_path)
    for i, block in enumerate(BLOCKS):
        write_descriptor_chunk(path, tmp_path, "s1", block, _block_values(block, float(i)))
    final = finalize_store(tmp_path, "s1", {"tiles": 12, "seconds": 0.5})
    assert final == store_path(tmp_path, "s1") and final.is_dir()
    assert not path.exists() and not progress_dir(tmp_path, "s1").exists()
    attrs = read_attrs(final)
    assert attrs["complete"] is True and attrs["tiles"] == 12 and attrs["fingerprint"] == "fp-1"
    assert np.isfinite(read_array(final, "descriptors")).all()
    assert list_stores(tmp_path) == [final]
    assert store_is_current(final, "fp-1", "h-1")
    assert not store_is_current(final, "fp-2", "h-1") and not store_is_current(final, "fp-1", "h-2")


def test_finalize_replaces_a_stale_store_and_leaves_nothing_behind(tmp_path):
    _create(tmp_path)
    old = finalize_store(tmp_path, "s1", {})
    write_array(old, "feature_map", np.zeros((*GRID, 3), np.float32))
    _create(tmp_path, config_hash="h-2")
    assert list_stores(tmp_path) == [old]  # the old store is still served while the new one is built
    new = finalize_store(tmp_path, "s1", {})
    assert new == old and read_attrs(new)["config_hash"] == "h-2"
    assert not (new / "feature_map").exists()  # the stale store's arrays went with it
    # no .s1.zarr.old-*, no s1.zarr.partial, no markers (the shared .progress folder itself may stay)
    assert sorted(p.name for p in slides_dir(tmp_path).iterdir() if p.name != ".progress") == ["s1.zarr"]
    assert not progress_dir(tmp_path, "s1").exists()


def test_a_store_written_whole_equals_one_built_block_by_block(tmp_path):
    """``write_complete_store`` (a one-task slide): the same arrays and attributes as a partial store filled block by
    block and finalised, complete at once, replacing a stale store, with no partial store or markers left."""
    fraction, mask, thumb = _inputs()
    values = np.full((*GRID, DIMS), np.nan, np.float32)
    path, _ = _create(tmp_path / "blocks")
    for i, block in enumerate(BLOCKS[:3]):  # the last block holds no tile: its chunk is left out
        r0, r1, c0, c1 = block
        values[r0:r1, c0:c1] = _block_values(block, float(i))
        write_descriptor_chunk(path, tmp_path / "blocks", "s1", block, values[r0:r1, c0:c1])
    built = finalize_store(tmp_path / "blocks", "s1", {"tiles": 12})
    stale, _ = _create(tmp_path / "whole", config_hash="h-0")
    finalize_store(tmp_path / "whole", "s1", {})
    whole = write_complete_store(tmp_path / "whole", "s1", {**_attrs(), "tiles": 12}, CHUNK, values, fraction, mask,
                                 thumb)
    assert whole == store_path(tmp_path / "whole", "s1") and read_attrs(whole) == read_attrs(built)
    assert read_attrs(whole)["complete"] is True and store_is_current(whole, "fp-1", "h-1")
    for name in ("descriptors", "tissue_fraction", "tissue_mask", "thumbnail"):
        np.testing.assert_array_equal(read_array(whole, name), read_array(built, name))
    assert open_store(whole)["descriptors"].chunks == (CHUNK, CHUNK, DIMS)
    assert sorted(p.relative_to(whole) for p in (whole / "descriptors").rglob("*")) == \
        sorted(p.relative_to(built) for p in (built / "descriptors").rglob("*"))  # the same chunk files
    # no s1.zarr.partial, no .s1.zarr.old-*, no markers (the shared .progress folder itself may stay)
    assert sorted(p.name for p in slides_dir(tmp_path / "whole").iterdir() if p.name != ".progress") == ["s1.zarr"]
    assert not progress_dir(tmp_path / "whole", "s1").exists()


def test_list_stores_only_complete_stores_sorted(tmp_path):
    assert list_stores(tmp_path / "missing") == []
    for slide_id in ("c", "a"):
        _create(tmp_path, slide_id)
        finalize_store(tmp_path, slide_id, {})
    _create(tmp_path, "b")  # still partial
    damaged = store_path(tmp_path, "d")
    damaged.mkdir()
    (damaged / "zarr.json").write_text("{not json")
    (slides_dir(tmp_path) / "e.zarr").mkdir()  # no zarr.json at all
    assert read_attrs(damaged) is None and read_attrs(slides_dir(tmp_path) / "e.zarr") is None
    assert [p.name for p in list_stores(tmp_path)] == ["a.zarr", "c.zarr"]


def test_write_array_adds_and_replaces_atomically(tmp_path):
    _create(tmp_path)
    store = finalize_store(tmp_path, "s1", {})
    first = np.arange(np.prod(GRID) * 3, dtype=np.float32).reshape(*GRID, 3)
    write_array(store, "feature_map", first, attrs={"method": "pca", "components": 3}, fill_value=-1.0)
    np.testing.assert_array_equal(read_array(store, "feature_map"), first)
    assert array_attrs(store, "feature_map") == {"method": "pca", "components": 3}
    # replaced by an array of another shape and dtype; the old attrs go with the old array
    second = np.ones(GRID, np.float64)
    write_array(store, "feature_map", second, chunks=(2, 2))
    got = read_array(store, "feature_map")
    assert got.shape == GRID and got.dtype == np.float64 and (got == 1).all()
    assert open_store(store)["feature_map"].chunks == (2, 2)
    assert array_attrs(store, "feature_map") == {}
    assert _hidden(store) == []  # no .feature_map.tmp-* or .feature_map.old-* left
    assert array_attrs(store, "cam") is None
    # the group's own attributes are untouched
    assert read_attrs(store)["complete"] is True


def test_package_versions_names_the_installed_ones():
    versions = package_versions()
    assert {"numpy", "zarr", "dask"} <= set(versions)
    assert versions["numpy"] == np.__version__
    assert versions["zarr"].startswith("3.")
