"""The plan task of ``describe``: one slide's metadata, tile grid, tissue mask, thumbnail and QC plan
(``prepare_slide``), and its partial store (``plan_slide``), made on a worker. The stain pass, when it ran, has
already read the metadata, chosen the reader and made the thumbnail and tissue mask: the plan takes them over
(``survey_slide``) instead of reading the slide again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.config import PipelineConfig
from ..core.errors import NoTissueError, SlideTooSmallError
from ..core.store import create_partial_store, package_versions
from ..slides.annotations import described_fingerprint, file_fingerprint
from ..slides.open import read_slide_info, slide_id_from_path
from ..slides.qc.slide import plan_slide_qc, slide_qc_arrays
from ..slides.reader_choice import ReaderChoice
from ..slides.tiling import tile_grid
from ..slides.tissue import mask_downsample_for, tile_tissue_fraction, tissue_tiles
from .encoders import encoder_info, get_encoder
from .stain_cohort import slide_reader, take_kept_thumbnail, tissue_image


def prepare_slide(path: str, config: PipelineConfig, encoder: dict | None = None, slide_id: str | None = None,
                  kept: dict | None = None, surveyed: dict | None = None, fingerprint: str | None = None) -> dict:
    """Everything about a slide needed to plan its tasks. Runs on a worker; returns plain data only.

    ``encoder``: ``encoder_info`` from the client (so a CPU worker never loads a model); None = built here.
    ``kept``: {"thumbnail", "mask", "flags"} when the stain pass already made them (``take_kept_thumbnail``); None =
    made here.
    ``surveyed``: the stain pass's {"info": SlideInfo, "reader": ReaderChoice} of this slide; None = read here.
    ``fingerprint``: the slide's fingerprint as the client made it (``described_fingerprint``); None = made here.
    """
    info = surveyed["info"] if surveyed else read_slide_info(path, mpp_override=config.tiling.mpp_override,
                                                             fingerprint=file_fingerprint(fingerprint))
    grid = tile_grid(info, config.tiling)
    if grid.rows == 0 or grid.cols == 0:
        raise SlideTooSmallError(
            f"the slide ({info.width_px}x{info.height_px} px at {grid.slide_mpp:.4g} µm/px) is smaller than one "
            f"{config.tiling.tile_px}-px tile at {config.tiling.mpp:.4g} µm/px", path=path)
    mask_ds = mask_downsample_for(grid.slide_mpp, config.tissue)
    reader = surveyed["reader"] if surveyed else slide_reader(info, grid, config)
    thumbnail, mask = (kept["thumbnail"], kept["mask"]) if kept else tissue_image(path, reader, grid, mask_ds, config)
    fraction = tile_tissue_fraction(mask, mask_ds, grid)
    tiles = tissue_tiles(fraction, config.tissue.fraction_min)
    if not tiles.any():
        raise NoTissueError(
            f"no tile of the {grid.rows}x{grid.cols} grid has >= {config.tissue.fraction_min:.0%} tissue "
            f"(tissue covers {mask.mean():.1%} of the slide)", path=path)
    qc = plan_slide_qc(thumbnail, mask, mask_ds, grid, tiles, config, slide_id or slide_id_from_path(path),
                       kept["flags"] if kept else None)
    encoder = encoder or encoder_info(get_encoder(config.descriptor))
    if not (tiles & (qc["qc_code"] == 0)).any():
        raise NoTissueError(f"QC excluded all {int(tiles.sum())} tissue tiles (codes {np.unique(qc['qc_code'])})",
                            path=path, fix="Check the slide and its annotations; loosen or drop detectors in qc.")
    return {
        "info": info.to_dict(),
        "grid": grid.to_dict(),
        "mask_downsample": mask_ds,
        "tissue_fraction": fraction,
        "tissue_tiles": tiles & (qc["qc_code"] == 0),  # the tiles to describe
        "qc": qc,
        "thumbnail": thumbnail,
        "descriptor_names": encoder["feature_names"],
        "encoder": encoder["identity"],
        "reader": reader.to_dict(),
    }


def own_fingerprint(fingerprint: str | None, path: str, config: PipelineConfig, slide_id: str) -> str:
    """The slide's ``described_fingerprint``: the client's, or made here (None: the client had no store to check)."""
    return fingerprint or described_fingerprint(path, config.annotations.dir, slide_id)


def plan_slide(path: str, config: PipelineConfig, out_dir: str, slide_id: str, fingerprint: str | None,
               encoder: dict | None = None, surveyed: dict | None = None) -> dict:
    """``prepare_slide`` plus the slide's partial store (thumbnail, tissue mask, QC arrays, empty descriptor array),
    made on the worker: the thumbnail never travels to the client, and the slide's blocks can start as soon as this
    returns. ``surveyed``: what the stain pass read of the slide (``survey_slide``'s "slide"), or None;
    ``fingerprint``: the client's ``described_fingerprint``, or None (made here).

    Returns the plan without the thumbnail, with ``qc_code`` (the planned codes), ``store`` and ``already`` (chunk
    origins an interrupted run wrote).
    """
    fingerprint = own_fingerprint(fingerprint, path, config, slide_id)
    return open_partial_store(surveyed_plan(path, config, slide_id, fingerprint, encoder, surveyed), config, out_dir,
                              slide_id, path, fingerprint)


def surveyed_plan(path: str, config: PipelineConfig, slide_id: str, fingerprint: str, encoder: dict | None = None,
                  surveyed: dict | None = None) -> dict:
    """``prepare_slide``, taking over what the stain pass made of the slide (``surveyed``: its "slide", or None)."""
    kept = take_kept_thumbnail(surveyed["kept"]) if surveyed and surveyed.get("kept") else None
    return prepare_slide(path, config, encoder, slide_id, kept, surveyed, fingerprint)


def open_partial_store(plan: dict, config: PipelineConfig, out_dir: str, slide_id: str, path: str,
                       fingerprint: str) -> dict:
    """The second half of ``plan_slide``: the partial store of a prepared slide (``plan`` is consumed)."""
    grid, qc = plan["grid"], plan.pop("qc")
    attrs = describe_store_attrs(slide_id, path, fingerprint, plan, config)
    store, already = create_partial_store(
        out_dir, slide_id, attrs, (grid["rows"], grid["cols"]),
        len(plan["descriptor_names"]), config.tiling.chunk_tiles, plan["tissue_fraction"], plan["tissue_tiles"],
        plan.pop("thumbnail"), slide_qc_arrays(qc, config, config.tiling.chunk_tiles))
    return {**plan, "qc_code": qc["qc_code"], "store": str(store), "already": sorted(already)}


def completion_attrs(tiles: int, seconds: float, reader: str, qc_counts: dict, encoded_on: list[str],
                     fallback_regions: int, delegated_regions: int, stain: dict | None) -> dict:
    """The store attributes of a slide once every block is described (beside ``describe_store_attrs``)."""
    return {"tiles": tiles, "seconds": seconds, "reader": reader, "qc": qc_counts, "encoded_on": encoded_on,
            "reader_fallback_regions": fallback_regions, "reader_delegated_regions": delegated_regions,
            "stain": stain}


def describe_store_attrs(slide_id: str, path: str, fingerprint: str, plan: dict, config: PipelineConfig) -> dict:
    info = plan["info"]
    return {
        "stage": "describe",
        "slide_id": slide_id,
        "slide_path": str(Path(path).resolve()),
        "fingerprint": fingerprint,
        "mpp": info["mpp"],
        "mpp_source": info["mpp_source"],
        "slide_info": info,
        "tile_grid": plan["grid"],
        "mask_downsample": plan["mask_downsample"],
        "tissue_fraction_min": config.tissue.fraction_min,
        "descriptor": {"name": config.descriptor.name, "dims": len(plan["descriptor_names"]),
                       "feature_names": plan["descriptor_names"], "encoder": plan["encoder"]},
        "reader": plan["reader"]["kind"],
        "reader_choice": {"requested": plan["reader"]["requested"], "reason": plan["reader"]["reason"]},
        "pixel_decode": ReaderChoice.from_dict(plan["reader"]).decode,
        "pixel_decode_reason": plan["reader"].get("decode_reason", ""),
        "config_hash": config.stage_hash("describe"),
        "config": config.model_dump(mode="json",
                                    include={"tiling", "tissue", "descriptor", "stain", "qc", "annotations"}),
        "versions": package_versions(),
    }
