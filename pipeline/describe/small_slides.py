"""A small slide in one task: ``plan_and_describe`` plans a slide and, when its tiles fall in one block (Zarr chunk),
describes that block in the same task (a Dask task costs milliseconds of scheduling; a small slide's plan and block
tens of milliseconds). Such a slide's store is then written once, whole and complete (``write_complete_store``):
no partial store for a block task to fill, no chunk marker, no second write of its attributes, and the runner only
records it. A slide with several blocks, or with a partial store an interrupted run left, is planned as before.

Several small slides in one task (``plan_and_describe_each``) go step by step: every slide's plan, then every slide's
tiles, then every store. The same code then runs back to back, its instructions and data still in the caches: 3-5%
less CPU per tile than slide after slide (benchmarks/README.md, twentieth session). Each slide's outcome is its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..core.config import PipelineConfig
from ..core.parallel import item_outcome
from ..core.store import partial_path, write_complete_store
from ..slides.qc.slide import decide_slide_qc, slide_qc_arrays, slide_qc_counts
from .blocks import describe_block, describe_tiles, encoded_on, slide_blocks
from .plan import completion_attrs, describe_store_attrs, open_partial_store, own_fingerprint, surveyed_plan


@dataclass
class _WholeSlide:
    """A one-block slide between the steps of ``plan_and_describe``: written whole once its block is described."""

    plan: dict
    block: tuple[int, int, int, int]
    path: str
    config: PipelineConfig
    out_dir: str
    slide_id: str
    fingerprint: str
    stain: dict | None
    stain_attrs: dict | None
    seconds: float  # spent on it so far, by its own steps
    described: dict | None = None


def plan_and_describe(path: str, config: PipelineConfig, out_dir: str, slide_id: str, fingerprint: str | None,
                      encoder: dict | None = None, surveyed: dict | None = None, stain: dict | None = None,
                      stain_attrs: dict | None = None) -> dict:
    """The plan of a slide (``plan_slide``'s), and a one-block slide described: with ``described`` (the block's
    ``describe_block`` result) when it went into a partial store, or ``completed`` (its ``completion_attrs``, which the
    manifest records, and the tiles described) when its store was written whole. ``fingerprint``: as ``plan_slide``'s;
    ``stain``: the slide's transform; ``stain_attrs``: what its store records of it."""
    slide = _planned(path, config, out_dir, slide_id, fingerprint, encoder, surveyed, stain, stain_attrs)
    return _stored(_described(slide)) if isinstance(slide, _WholeSlide) else slide


def plan_and_describe_each(arg_list: list[tuple]) -> list:
    """``plan_and_describe`` of several slides (each one's arguments) in one task, step by step (every plan, then
    every block, then every store). One outcome per slide, in order, as ``core.parallel.call_each`` returns them: a
    slide's error stops that slide only."""
    slides = [item_outcome(_planned, *args) for args in arg_list]
    for step in (_described, _stored):
        slides = [item_outcome(step, slide) if isinstance(slide, _WholeSlide) else slide for slide in slides]
    return slides


def _planned(path: str, config: PipelineConfig, out_dir: str, slide_id: str, fingerprint: str | None,
             encoder: dict | None, surveyed: dict | None, stain: dict | None, stain_attrs: dict | None
             ) -> dict | _WholeSlide:
    """A slide's plan: finished here (``plan_and_describe``'s result) unless it is one block to describe whole."""
    started = time.monotonic()
    fingerprint = own_fingerprint(fingerprint, path, config, slide_id)
    plan = surveyed_plan(path, config, slide_id, fingerprint, encoder, surveyed)
    blocks = slide_blocks(plan, config.tiling.chunk_tiles)
    if len(blocks) == 1 and not partial_path(out_dir, slide_id).exists():
        return _WholeSlide(plan, blocks[0], path, config, out_dir, slide_id, fingerprint, stain, stain_attrs,
                           time.monotonic() - started)
    plan = open_partial_store(plan, config, out_dir, slide_id, path, fingerprint)
    if len(blocks) == 1 and [blocks[0][0], blocks[0][2]] not in [list(a) for a in plan["already"]]:
        r0, r1, c0, c1 = block = blocks[0]
        plan["described"] = describe_block(path, plan["store"], out_dir, slide_id, plan["grid"], block,
                                           plan["tissue_tiles"][r0:r1, c0:c1].copy(), config,
                                           len(plan["descriptor_names"]), plan["reader"], stain)
    return plan


def _described(slide: _WholeSlide) -> _WholeSlide:
    """The tiles of a one-block slide described."""
    started = time.monotonic()
    r0, r1, c0, c1 = slide.block
    plan = slide.plan
    slide.described = describe_tiles(slide.path, plan["grid"], slide.block, plan["tissue_tiles"][r0:r1, c0:c1].copy(),
                                     slide.config, len(plan["descriptor_names"]), plan["reader"], slide.stain)
    slide.seconds += time.monotonic() - started
    return slide


def _stored(slide: _WholeSlide) -> dict:
    """A described one-block slide's tile QC decided and its store written whole (its plan is consumed)."""
    started = time.monotonic()
    config, plan, described, (r0, r1, c0, c1) = slide.config, slide.plan, slide.described, slide.block
    tissue, qc = plan["tissue_tiles"], plan.pop("qc")
    dims = len(plan["descriptor_names"])
    values = np.full((*tissue.shape, dims), np.nan, np.float32)
    values[r0:r1, c0:c1] = described["values"]
    k = described["qc_scores"].shape[-1]
    scores = np.full((*tissue.shape, k), np.nan, np.float32)
    scores[r0:r1, c0:c1] = described["qc_scores"]
    codes, kept, flagged = decide_slide_qc(config, {**plan, "qc_code": qc["qc_code"]}, scores)
    values[flagged] = np.nan  # tiles the tile detectors exclude lose their descriptors
    tiles = described["tiles"] - int(flagged.sum())
    counts = slide_qc_counts(config, plan, codes)
    reader = plan["reader"]["kind"]
    seconds = round(slide.seconds + time.monotonic() - started, 3)
    completed = completion_attrs(tiles, seconds, reader, counts, [encoded_on(described)], described["fallback_regions"],
                                 described["delegated_regions"], slide.stain_attrs)
    attrs = {**describe_store_attrs(slide.slide_id, slide.path, slide.fingerprint, plan, config), **completed}
    store = write_complete_store(slide.out_dir, slide.slide_id, attrs, config.tiling.chunk_tiles, values,
                                 plan["tissue_fraction"], kept, plan.pop("thumbnail"),
                                 slide_qc_arrays({**qc, "qc_code": codes}, config, config.tiling.chunk_tiles,
                                                 scores if k else None))
    return {**plan, "qc_code": codes, "store": str(store), "already": [],
            "completed": {**completed, "described_tiles": described["tiles"]}}
