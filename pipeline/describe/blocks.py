"""The block task of ``describe``: the descriptors of one block of ``chunk_tiles`` x ``chunk_tiles`` tiles (hundreds of
tiles), described in memory (``describe_tiles``) and written straight into that block's own Zarr chunk
(``describe_block``). Each task opens its own slide reader."""

from __future__ import annotations

import numpy as np

from ..core.config import PipelineConfig
from ..core.parallel import where_am_i
from ..core.store import write_descriptor_chunk
from ..slides.qc.slide import block_scores, write_block_scores
from ..slides.reader_choice import open_reader
from ..slides.stain import apply_stain_transform
from ..slides.tiling import TileGrid, iter_tile_batches
from .descriptors import compute_descriptors
from .encoders import get_encoder
from .encoders.placement import block_batch_tiles, prefetched


def describe_tiles(path: str, grid_dict: dict, block: tuple[int, int, int, int], block_tiles: np.ndarray,
                   config: PipelineConfig, dims: int, reader: dict | None = None, stain: dict | None = None) -> dict:
    """Descriptors of the tissue tiles of one block, in memory.

    ``reader``: the slide's ``ReaderChoice`` as a dict (None = OpenSlide); ``stain``: the slide's fixed stain
    transform (``pipeline.slides.stain.slide_transform``; None = tiles as read), applied before descriptors.
    Returns {"block", "values": (r1 - r0, c1 - c0, dims) NaN where no tile was described, "tiles": number of tiles,
    "fallback_regions" / "delegated_regions": regions the direct reader read through OpenSlide after a decode failure
    / because they lie at sub-pixel positions of the level, "encoded_on": the worker (None in-process) and device,
    "qc_scores": the block's tile QC scores}. On an accelerator, tiles are read a few batches ahead of the encoder
    (``encoders/placement.py``).
    """
    encoder = get_encoder(config.descriptor)
    grid = TileGrid.from_dict(grid_dict)
    r0, r1, c0, c1 = block
    values = np.full((r1 - r0, c1 - c0, dims), np.nan, dtype=np.float32)
    scores = np.full((r1 - r0, c1 - c0, 0), np.nan, dtype=np.float32)  # QC scores of the pixels as scanned
    count = 0
    with open_reader(path, reader) as handle:
        batch_tiles = block_batch_tiles(encoder, config.descriptor)
        batches = iter_tile_batches(handle, grid, block_tiles, block, batch_tiles, path)
        for positions, tiles in (prefetched(batches) if encoder.on_accelerator else batches):
            batch_scores = block_scores(tiles, config)
            if batch_scores.shape[1] != scores.shape[2]:
                scores = np.full((r1 - r0, c1 - c0, batch_scores.shape[1]), np.nan, dtype=np.float32)
            scores[positions[:, 0] - r0, positions[:, 1] - c0] = batch_scores
            tiles = apply_stain_transform(tiles, stain)
            values[positions[:, 0] - r0, positions[:, 1] - c0] = compute_descriptors(tiles, config.descriptor)
            count += len(positions)
        fallbacks, delegated = handle.fallback_regions, handle.delegated_regions
    return {"block": list(block), "values": values, "tiles": count, "fallback_regions": fallbacks,
            "delegated_regions": delegated, "encoded_on": where_am_i()["worker"],
            "device": f"{encoder.spec.device}, {encoder.spec.precision}", "qc_scores": scores}


def describe_block(path: str, store: str, out_dir: str, slide_id: str, grid_dict: dict,
                   block: tuple[int, int, int, int], block_tiles: np.ndarray, config: PipelineConfig,
                   dims: int, reader: dict | None = None, stain: dict | None = None) -> dict:
    """``describe_tiles``, written to the block's Zarr chunk of the slide's partial store (its QC scores first, then
    the descriptors and the chunk's done marker); returns its result without the values."""
    described = describe_tiles(path, grid_dict, block, block_tiles, config, dims, reader, stain)
    values = described.pop("values")
    write_block_scores(store, block, described["qc_scores"])  # before the chunk's done marker
    write_descriptor_chunk(store, out_dir, slide_id, block, values)
    return described


def slide_blocks(plan: dict, chunk_tiles: int) -> list[tuple[int, int, int, int]]:
    """The blocks (Zarr chunks) of a planned slide that hold tiles to describe."""
    tissue = plan["tissue_tiles"]
    return [b for b in TileGrid.from_dict(plan["grid"]).chunks(chunk_tiles) if tissue[b[0]:b[1], b[2]:b[3]].any()]


def encoded_on(described: dict) -> str:
    """Where a block was described, as the store records it: "worker (device, precision)"."""
    return f"{described.get('encoded_on') or 'client'} ({described.get('device', 'cpu')})"
