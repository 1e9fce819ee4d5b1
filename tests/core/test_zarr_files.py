"""Zarr files written directly (pipeline/core/zarr_files.py) are the bytes zarr itself writes, and zarr reads them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.core import store as store_module
from pipeline.core import zarr_files
from pipeline.core.store import (create_partial_store, finalize_store, read_attrs, store_path, update_attrs,
                                 write_array, write_descriptor_chunk, write_tile_block)


def _tree(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under ``root`` (temporary names would show up here)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


RNG = np.random.default_rng(7)
ARRAYS = {  # create_array keywords: data of several dtypes, edge chunks, all-fill chunks, NaN, -0.0, no chunks given
    "floats": {"data": RNG.random((5, 7)).astype(np.float32), "chunks": (5, 7)},
    "nan_edges": {"data": np.where(RNG.random((70, 33)) > 0.3, RNG.random((70, 33)), np.nan).astype(np.float32),
                  "chunks": (32, 16), "fill_value": np.nan},
    "all_nan_chunk": {"data": np.pad(np.ones((4, 4), np.float32), ((0, 4), (0, 0)), constant_values=np.nan),
                      "chunks": (4, 4), "fill_value": np.nan},
    "negative_zero": {"data": np.array([[0.0, -0.0], [0.0, 0.0]], np.float64), "chunks": (1, 2), "fill_value": 0.0},
    "mask": {"data": RNG.random((9, 4)) > 0.5, "chunks": (9, 4)},
    "thumbnail": {"data": RNG.integers(0, 256, (1100, 40, 3), dtype=np.uint8), "chunks": (1024, 40, 3)},
    # over zarr_files.THREADED_BYTES: its 4 chunks are compressed on two threads
    "large_thumbnail": {"data": RNG.integers(0, 256, (1300, 700, 3), dtype=np.uint8) // 8 * 8,
                        "chunks": (1024, 512, 3)},
    "codes": {"data": np.where(RNG.random((6, 6)) > 0.8, 3, 0).astype(np.uint8), "attributes": {"codes": {"pen": 1}}},
    "zeros": {"data": np.zeros((6, 6), np.uint16), "attributes": {"classes": [], "file": None}},
    "guessed": {"data": RNG.integers(0, 9, (700, 300), dtype=np.int32)},
    "empty": {"shape": (5, 7, 3), "dtype": "float32", "fill_value": np.nan, "chunks": (4, 4, 3),
              "attributes": {"detectors": ["blur"], "nan": float("nan")}},
}


def test_a_store_written_directly_is_byte_for_byte_zarrs(tmp_path, monkeypatch):
    attrs = {"slide_id": "s", "mpp": 0.25, "nested": {"a": [1, 2.5, None]}, "complete": False}
    assert store_module._create_direct(tmp_path / "direct", attrs, ARRAYS)
    group = zarr.open_group(str(tmp_path / "zarr"), mode="w", attributes=attrs)
    for name, spec in ARRAYS.items():
        group.create_array(name, **spec, chunk_key_encoding=zarr_files.ZARR_CHUNK_KEYS)
    direct, reference = _tree(tmp_path / "direct"), _tree(tmp_path / "zarr")
    assert sorted(direct) == sorted(reference)
    assert "nan_edges/c.2.1" in direct and not any(key.count("/") > 1 for key in direct)  # chunks beside zarr.json
    assert "all_nan_chunk/c.1.0" not in direct and "zeros/c.0.0" not in direct  # left out, as zarr does
    for key in reference:
        assert direct[key] == reference[key], key
    back = zarr.open_group(str(tmp_path / "direct"), mode="r")
    assert dict(back.attrs) == attrs
    for name, spec in ARRAYS.items():
        if "data" in spec:
            np.testing.assert_array_equal(back[name][...], spec["data"])


def test_unsupported_codecs_go_through_zarr(tmp_path):
    document = zarr_files.array_document((4, 4), "float32", np.nan, (4, 4))
    document["codecs"][1] = {"name": "gzip", "configuration": {"level": 5}}
    assert zarr_files.chunk_codec(document) is None
    assert zarr_files.array_files(document, np.zeros((4, 4), np.float32)) is None
    assert zarr_files.array_files(document, None) is not None  # metadata alone needs no codec
    assert not store_module._create_direct(tmp_path / "x", {}, {"a": {"data": np.zeros(3), "compressors": None}})
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("block", [(0, 4, 0, 4), (4, 5, 4, 7), (0, 4, 4, 7)])
def test_chunks_and_attributes_are_zarrs(tmp_path, monkeypatch, block):
    """Descriptor and score blocks, the final attributes and a later stage's array, against zarr's own writes."""
    rng = np.random.default_rng(1)
    fraction, thumb = rng.random((5, 7)), rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    r0, r1, c0, c1 = block
    values = rng.random((r1 - r0, c1 - c0, 3)).astype(np.float32)
    scores = rng.random((r1 - r0, c1 - c0, 2)).astype(np.float32)
    cam = rng.random((5, 7)).astype(np.float32)
    arrays = {"qc_scores": {"shape": (5, 7, 2), "dtype": np.float32, "fill_value": np.nan, "chunks": (4, 4, 2)}}
    final = {"tiles": 3, "qc": {"pen": 1}, "stain": None}
    roots = {}
    for kind in ("direct", "zarr"):
        out = tmp_path / kind
        if kind == "zarr":  # the same store through zarr's API
            monkeypatch.setattr(store_module, "_create_direct", lambda *a: False)
        path, _ = create_partial_store(out, "s", {"fingerprint": "f", "config_hash": "h"}, (5, 7), 3, 4,
                                       fraction, fraction > 0.5, thumb, arrays)
        if kind == "direct":
            write_descriptor_chunk(path, out, "s", block, values)
            write_tile_block(path, "qc_scores", block, scores)
            finalize_store(out, "s", final)
            write_array(store_path(out, "s"), "cam", cam, attrs={"k": 1})
        else:
            zarr.open_array(str(path / "descriptors"), mode="r+")[r0:r1, c0:c1] = values
            zarr.open_array(str(path / "qc_scores"), mode="r+")[r0:r1, c0:c1] = scores
            zarr.open_group(str(path), mode="r+").update_attributes({**final, "complete": True})
            path.rename(store_path(out, "s"))
            arr = zarr.open_group(str(store_path(out, "s")), mode="r+").create_array(
                "cam", shape=(5, 7), dtype=np.float32, chunks=(5, 7), chunk_key_encoding=zarr_files.ZARR_CHUNK_KEYS)
            arr[...] = cam
            arr.update_attributes({"k": 1})
        roots[kind] = _tree(store_path(out, "s"))
    assert roots["direct"] == roots["zarr"]


def test_values_of_only_the_fill_value_remove_the_chunk(tmp_path):
    """(An array with zarr's default chunk keys, c/1/0: chunks written here follow the array's document.)"""
    zarr.create_array(str(tmp_path / "a"), shape=(4, 4), chunks=(2, 2), dtype="float32", fill_value=np.nan)
    assert zarr_files.write_chunk(tmp_path / "a", (2, 0), np.ones((2, 2), np.float32))
    assert (tmp_path / "a" / "c" / "1" / "0").is_file()
    assert zarr_files.write_chunk(tmp_path / "a", (2, 0), np.full((2, 2), np.nan, np.float32))
    assert not (tmp_path / "a" / "c" / "1" / "0").exists()
    assert not zarr_files.write_chunk(tmp_path / "a", (1, 0), np.ones((2, 2), np.float32))  # not a whole chunk
    assert not zarr_files.write_chunk(tmp_path / "a", (0, 0), np.ones((1, 2), np.float32))


def test_read_and_update_attrs_match_zarr(tmp_path):
    zarr.open_group(str(tmp_path / "g"), mode="w", attributes={"a": 1, "b": [1, 2]})
    update_attrs(tmp_path / "g", {"b": None, "c": {"d": 0.5}})
    assert read_attrs(tmp_path / "g") == dict(zarr.open_group(str(tmp_path / "g"), mode="r").attrs) \
        == {"a": 1, "b": None, "c": {"d": 0.5}}
    zarr.create_array(str(tmp_path / "arr"), shape=(2,), dtype="uint8")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "zarr.json").write_text("{not json")
    assert read_attrs(tmp_path / "arr") is None and read_attrs(tmp_path / "bad") is None
    assert read_attrs(tmp_path / "missing") is None


@pytest.mark.parametrize("dtype, fill", [("float32", np.nan), ("float32", None), ("float64", -0.0), ("float32", np.inf),
                                         ("float64", -np.inf), ("float32", 1.5), ("int8", -3), ("int16", None),
                                         ("int64", 2**40), ("uint8", 255), ("uint16", 0), ("uint32", 7),
                                         ("bool", None), ("bool", True)])
@pytest.mark.parametrize("shape, chunks", [((5,), (5,)), ((48, 78, 25), (16, 16, 25)), ((781, 1250, 3), (781, 1024, 3)),
                                           ((1, 1), (1, 1))])
def test_documents_written_here_are_zarrs(dtype, fill, shape, chunks):
    """The documents this module writes itself (explicit chunks) are, byte for byte, what zarr writes."""
    from zarr.storage import MemoryStore

    store: dict = {}
    zarr.create_array(MemoryStore(store), shape=shape, dtype=dtype, fill_value=fill, chunks=chunks,
                      chunk_key_encoding=zarr_files.ZARR_CHUNK_KEYS)
    assert zarr_files.dumps(zarr_files.array_document(shape, dtype, fill, chunks)) == store["zarr.json"].to_bytes()
    group: dict = {}
    zarr.open_group(MemoryStore(group), mode="w", attributes={"a": 1})
    assert zarr_files.dumps(zarr_files.group_document({"a": 1})) == group["zarr.json"].to_bytes()
    assert zarr_files.JSON_INDENT == zarr.config.get("json_indent")


def test_describe_imports_no_zarr():
    """``describe`` writes its stores without zarr's API, so its start-up does not import zarr (~0.09 s)."""
    import subprocess
    import sys

    code = "import sys, pipeline.cli, pipeline.describe.runner; print('zarr' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


def test_a_fresh_folder_is_written_in_place_with_the_same_files(tmp_path, monkeypatch):
    files = {"a/zarr.json": b"{}", "a/c/0/0": b"chunk", "a/c/1/0": None, "b/zarr.json": b"{}", "zarr.json": b"group"}
    zarr_files.write_files(tmp_path / "one", files)
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: renamed.append(Path(b).name) or real_replace(a, b))
    zarr_files.write_files(tmp_path / "two", files, fresh=True)
    assert _tree(tmp_path / "two") == _tree(tmp_path / "one") == {k: v for k, v in files.items() if v is not None}
    assert renamed == ["zarr.json"]  # only the last file, the group's, goes through a temporary name
    # a folder that is there after all is written file by file: a chunk of only the fill value is removed
    (tmp_path / "two" / "a" / "c" / "1").mkdir()
    (tmp_path / "two" / "a" / "c" / "1" / "0").write_bytes(b"stale")
    zarr_files.write_files(tmp_path / "two", files, fresh=True)
    assert _tree(tmp_path / "two") == _tree(tmp_path / "one")
