"""Zarr (format 3) groups, arrays and chunks written as files directly, byte for byte what zarr writes.

Why: zarr's own API costs 1-3 ms CPU per array or chunk write (metadata validation, a round trip to its event-loop
thread, a worker thread per file), and ``describe`` makes 4-7 small arrays per slide and writes 1-2 chunks per block:
on a directory of small slides that was the largest per-slide cost; and importing zarr costs ~0.09 s, which every
``describe`` paid before its first tile. How, without a second implementation of Zarr: the metadata documents are
the ones zarr 3 writes with its default codecs (``bytes``, little-endian for multi-byte types, then ``zstd`` level 0
without checksum) for a regular chunk grid given explicitly (``tests/core/test_zarr_files.py`` compares them with
zarr's, byte for byte); a document with zarr's own chunk guess is zarr's (``zarr.create_array`` on an in-memory
store). Chunks are encoded with the codecs the document names when they are those defaults, padded with the fill
value at the edges and left out when they hold only the fill value, as zarr does. Anything else (other codecs, data
types or fill values, chunks not aligned to the block) returns None: the caller goes through zarr. Every file is
written under a temporary name and renamed, as zarr's local store does.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .outputs import atomic_write_bytes
from .threads import map_threads

THREADED_BYTES = 1 << 20  # arrays from this size with several chunks compress them on two threads

ZARR_JSON = "zarr.json"
# Data types whose chunks this module encodes (the ``bytes`` codec's little-endian layout of numpy's dtypes).
DIRECT_DTYPES = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                           "float32", "float64"})
SPECIAL_FLOATS = {"NaN": np.nan, "Infinity": np.inf, "-Infinity": -np.inf}
JSON_INDENT = 2  # zarr's default ``json_indent``
ZSTD_LEVEL, ZSTD_CHECKSUM = 0, False  # zarr 3's default compressor for arrays of numbers
# Chunk files sit in their array's folder ("c.0.0"), not in a folder per grid axis ("c/0/0", zarr's default): a small
# slide's store makes 7 folders instead of 17, and creating files and folders is what varies most on a busy disk
# (benchmarks/README.md, seventeenth session). Zarr reads either from the array's document, and chunks written here
# follow the document (stores written before keep "/").
CHUNK_SEPARATOR = "."
CHUNK_KEY_ENCODING = {"name": "default", "configuration": {"separator": CHUNK_SEPARATOR}}
ZARR_CHUNK_KEYS = {"name": "default", "separator": CHUNK_SEPARATOR}  # the same, as zarr's ``create_array`` takes it
SEPARATORS = ("/", ".")


def dumps(document: dict) -> bytes:
    """A metadata document as zarr serialises it."""
    return json.dumps(document, indent=JSON_INDENT, allow_nan=True).encode()


def _fill_json(fill: Any, dtype: np.dtype) -> Any:
    """A fill value as zarr writes it in JSON (NaN and infinities by name; None: the type's zero)."""
    value = np.zeros((), dtype)[()] if fill is None else np.asarray(fill, dtype)[()]
    if dtype.kind == "b":
        return bool(value)
    if dtype.kind in "iu":
        return int(value)
    if np.isnan(value):
        return "NaN"
    if np.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return float(value)


@functools.lru_cache(maxsize=256)
def _array_template(shape: tuple[int, ...], dtype: str, fill: bytes | None, chunks: tuple[int, ...] | None) -> bytes:
    """The document of such an array (``fill``: the fill value's bytes, hashable even when it is NaN): written here
    for explicit chunks, zarr's when it guesses them."""
    kind = np.dtype(dtype)
    fill_value = None if fill is None else np.frombuffer(fill, kind)[0]
    if chunks is None:
        import zarr
        from zarr.storage import MemoryStore

        store: dict = {}
        zarr.create_array(MemoryStore(store), shape=shape, dtype=dtype, fill_value=fill_value, chunks="auto",
                          chunk_key_encoding=ZARR_CHUNK_KEYS)
        return store[ZARR_JSON].to_bytes()
    endian = {} if kind.itemsize == 1 else {"configuration": {"endian": "little"}}
    return dumps({"shape": list(shape), "data_type": kind.name,
                  "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
                  "chunk_key_encoding": CHUNK_KEY_ENCODING, "fill_value": _fill_json(fill_value, kind),
                  "codecs": [{"name": "bytes", **endian},
                             {"name": "zstd", "configuration": {"level": ZSTD_LEVEL, "checksum": ZSTD_CHECKSUM}}],
                  "attributes": {}, "zarr_format": 3, "node_type": "array", "storage_transformers": []})


def group_document(attributes: dict) -> dict:
    """The ``zarr.json`` of a group with these attributes, as ``zarr.open_group(..., attributes=)`` writes it."""
    return {"attributes": attributes, "zarr_format": 3, "node_type": "group"}


def load_codecs() -> None:
    """Import the chunk codec (numcodecs' zstd) now, e.g. before worker processes fork."""
    from numcodecs.zstd import Zstd  # noqa: F401


def array_document(shape: tuple[int, ...], dtype, fill_value: Any = None, chunks: tuple[int, ...] | None = None,
                   attributes: dict | None = None) -> dict:
    """The ``zarr.json`` of an array as ``zarr.create_array`` writes it (``chunks`` None: zarr's own guess)."""
    fill = None if fill_value is None else np.asarray(fill_value, dtype=dtype).tobytes()
    template = _array_template(tuple(int(n) for n in shape), np.dtype(dtype).name, fill,
                               None if chunks is None else tuple(int(n) for n in chunks))
    return {**json.loads(template), "attributes": dict(attributes or {})}


def chunk_codec(document: dict):
    """(dtype, fill value, chunk shape, zstd codec) of an array document whose chunks this module can encode; None
    for anything else."""
    from numcodecs.zstd import Zstd

    keys = document.get("chunk_key_encoding") or {}
    if keys.get("name") != "default" or (keys.get("configuration") or {}).get("separator") not in SEPARATORS \
            or document.get("chunk_grid", {}).get("name") != "regular" or document.get("storage_transformers") \
            or document.get("data_type") not in DIRECT_DTYPES:
        return None
    codecs = document.get("codecs", [])
    dtype = np.dtype(document["data_type"])
    endian = {} if dtype.itemsize == 1 else {"configuration": {"endian": "little"}}
    if len(codecs) != 2 or codecs[0] != {"name": "bytes", **endian} or codecs[1].get("name") != "zstd" \
            or set(codecs[1].get("configuration", {})) != {"level", "checksum"}:
        return None
    fill = document.get("fill_value")
    fill = SPECIAL_FLOATS.get(fill, fill) if dtype.kind == "f" else fill
    if isinstance(fill, str) or fill is None:
        return None
    level, checksum = codecs[1]["configuration"]["level"], codecs[1]["configuration"]["checksum"]
    return dtype, np.asarray(fill, dtype), tuple(document["chunk_grid"]["configuration"]["chunk_shape"]), \
        Zstd(level=level, checksum=checksum)


def chunk_key(document: dict, indices) -> str:
    """The file name, within its array's folder, of the chunk at grid ``indices`` (the document's separator)."""
    return document["chunk_key_encoding"]["configuration"]["separator"].join(["c", *map(str, indices)])


def _only_fill(chunk: np.ndarray, fill: np.ndarray) -> bool:
    """zarr's test for a chunk it does not write (``write_empty_chunks`` off): equal to the fill value, NaN equal to
    NaN, and a zero fill compared bit for bit (-0.0 is data)."""
    if chunk.dtype.kind == "f" and fill == 0:
        return bool(np.array_equal(chunk.view(f"V{chunk.dtype.itemsize}"),
                                   np.broadcast_to(fill, chunk.shape).view(f"V{chunk.dtype.itemsize}")))
    return bool(np.array_equal(chunk, np.broadcast_to(fill, chunk.shape), equal_nan=chunk.dtype.kind == "f"))


def encode_chunk(values: np.ndarray, codec) -> bytes | None:
    """One chunk's stored bytes (``values`` padded with the fill value to the chunk shape), or None when it holds only
    the fill value (zarr leaves such a chunk out)."""
    dtype, fill, chunk_shape, zstd = codec
    values = np.asarray(values, dtype)
    if values.shape != chunk_shape:
        padded = np.full(chunk_shape, fill, dtype)
        padded[tuple(slice(0, n) for n in values.shape)] = values
        values = padded
    if _only_fill(values, fill):
        return None
    return bytes(zstd.encode(np.ascontiguousarray(values, dtype.newbyteorder("<"))))


def array_files(document: dict, data: np.ndarray | None) -> dict[str, bytes | None] | None:
    """Relative path -> bytes of an array's files (its ``zarr.json`` and the chunks of ``data``; None for a chunk
    left out), or None when zarr must write it (``chunk_codec``)."""
    files: dict[str, bytes | None] = {ZARR_JSON: dumps(document)}
    if data is None:
        return files
    codec = chunk_codec(document)
    if codec is None:
        return None
    chunk_shape = codec[2]
    grid = [range(0, n, c) for n, c in zip(data.shape, chunk_shape)]
    origins = list(np.ndindex(*(len(g) for g in grid)))
    pieces = [data[tuple(slice(g[i], g[i] + c) for g, i, c in zip(grid, origin, chunk_shape))] for origin in origins]
    # a large array's chunks (a thumbnail's) are compressed on two threads: zstd releases the GIL
    encoded = (map_threads(lambda piece: encode_chunk(piece, codec), pieces) if data.nbytes >= THREADED_BYTES
               else [encode_chunk(piece, codec) for piece in pieces])
    for origin, stored in zip(origins, encoded):
        files[chunk_key(document, origin)] = stored
    return files


def write_file(path: Path, data: bytes | None) -> None:
    """Write ``data`` under a temporary name and rename it over ``path``, as zarr's local store does (no fsync;
    None: remove ``path``)."""
    if data is None:
        path.unlink(missing_ok=True)
    else:
        atomic_write_bytes(path, data, sync=False)


def write_files(root: Path, files: dict[str, bytes | None], fresh: bool = False) -> None:
    """Write relative path -> bytes under ``root`` (folders made as needed), in the order given.

    ``fresh``: ``root`` does not exist yet, and nothing reads it before its last file is in place (a group's
    ``zarr.json``, written last, says the store is there) or before it is renamed into place. Each folder is then made
    once and the files are written in place, only the last one under a temporary name: a small slide's store is ~15
    files in ~20 folders, and temporary names, renames and repeated folder checks were 10-25% of its cost
    (benchmarks/README.md, seventeenth session). A ``root`` that exists after all is written file by file.
    """
    if fresh:
        try:
            root.mkdir(parents=True)
        except FileExistsError:  # its removal failed
            fresh = False
    if not fresh:
        for key, data in files.items():
            write_file(root / key, data)
        return
    written = [(key, data) for key, data in files.items() if data is not None]
    made: set[str] = set()
    for index, (key, data) in enumerate(written):
        folder = key.rpartition("/")[0]
        if folder and folder not in made:
            os.makedirs(root / folder, exist_ok=True)
            made.add(folder)
        if index == len(written) - 1:
            write_file(root / key, data)
        else:
            with open(root / key, "wb") as fh:
                fh.write(data)


def read_document(path: str | Path) -> dict:
    """The ``zarr.json`` of the group or array at ``path`` (raises ``OSError`` / ``ValueError``)."""
    return json.loads((Path(path) / ZARR_JSON).read_bytes())


def write_chunk(array_path: str | Path, origin: tuple[int, ...], values: np.ndarray) -> bool:
    """Write ``values``, one whole chunk starting at ``origin`` (element indices), straight to its file; False (nothing
    written) when it is not a whole chunk or its codecs are not the defaults: then write it through zarr."""
    array_path = Path(array_path)
    document = read_document(array_path)
    codec = chunk_codec(document)
    if codec is None or len(origin) != values.ndim or values.ndim != len(codec[2]):
        return False
    shape, chunk_shape = document["shape"], codec[2]
    for o, n, size, c in zip(origin, values.shape, shape, chunk_shape):
        if o % c or n != min(c, size - o):
            return False
    key = chunk_key(document, [o // c for o, c in zip(origin, chunk_shape)])
    write_file(array_path / key, encode_chunk(values, codec))
    return True
