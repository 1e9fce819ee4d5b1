"""The stain pass of ``describe``: before any block is described, every slide's stain is estimated once (one task
per slide: its thumbnail and tissue mask at the mask resolution), the cohort target is fixed, and each slide gets its
fixed transform.

The target is, in this order: ``stain.target`` when given (``predict`` passes the training cohort's), the estimate of
``stain.reference_slide``, the target an earlier run fitted into this output directory with the same settings, or the
median of this cohort's estimates. It goes into the run's config (so into the describe hash, ``OUT/config.yaml`` and
the store attrs): stores normalised to another target are stale. Estimates and the target are cached in
``OUT/stain.json`` (keyed by slide fingerprint and settings), so a rerun reads no thumbnail twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.config import PipelineConfig
from ..core.errors import ConfigError, error_record
from ..core.outputs import atomic_write_json
from ..core.parallel import Task, TaskRetry, in_flight_limit, run_bounded
from ..core.store import slides_dir
from ..slides.annotations import (annotation_file, described_fingerprint, described_fingerprints, file_fingerprint,
                                  inside_classes, read_annotations)
from ..slides.open import read_slide_info, slide_id_from_path
from ..slides.pixels import read_thumbnail
from ..slides.qc import active_detectors
from ..slides.reader_choice import choose_reader, open_reader
from ..slides.stain import estimate_stain, fit_target, slide_transform
from ..slides.stain.macenko import ESTIMATE_REVISION
from ..slides.tiling import tile_grid
from ..slides.tissue import mask_downsample_for, tile_tissue_fraction, tissue_mask, tissue_tiles
from .grouping import PlanQueue, group_task, outcomes

log = logging.getLogger("pipeline")

STAIN_JSON = "stain.json"
# under OUT/slides/: the surveyed slides' thumbnails (the stain pass's, the plan-ahead child's), taken by their plans
KEPT_THUMBNAILS = ".stain-thumbnails"
FLAG_PREFIX = "flag_"  # kept arrays of the thumbnail QC detectors' pixels: flag_<detector>
SURVEY_GROUP_TILES = 1024  # grid tiles of the slides one survey task takes (small slides several to a task)


def _kept_path(out_dir: str | Path, slide_id: str, fingerprint: str, config: PipelineConfig) -> Path:
    return slides_dir(out_dir) / KEPT_THUMBNAILS / f"{slide_id}-{fingerprint}-{estimation_hash(config)}.npz"


def survey_new_slide(path: str, config: PipelineConfig, out_dir: str, slide_id: str,
                     fingerprint: str | None = None) -> dict:
    """``survey_slide`` of a new slide in the plan-ahead child (``plan_ahead.py``), its thumbnail kept where the stain
    pass keeps it: {"fingerprint", "record", "slide"}. ``fingerprint``: its ``described_fingerprint``, None = made
    here."""
    fingerprint = fingerprint or described_fingerprint(path, config.annotations.dir, slide_id)
    return {"fingerprint": fingerprint,
            **survey_slide(path, config, str(_kept_path(out_dir, slide_id, fingerprint, config)), fingerprint)}


def survey_slide(path: str, config: PipelineConfig, keep: str | None = None, fingerprint: str | None = None) -> dict:
    """Worker task of the stain pass: {"record": the slide's stain record (``estimate_stain``; None without a stain
    pass), "slide": {"info": its ``SlideInfo``, "reader": its ``ReaderChoice``, "kept": ``keep``, "tissue_tiles": its
    tissue tiles before QC}}. ``plan_slide`` takes "slide" instead of reading the metadata and probing the reader
    again.

    ``keep``: a path to leave the thumbnail and tissue mask at, so that ``plan_slide`` does not make them again.
    ``fingerprint``: the client's ``described_fingerprint`` of the slide (None: hashed here).
    """
    info = read_slide_info(path, mpp_override=config.tiling.mpp_override, fingerprint=file_fingerprint(fingerprint))
    grid = tile_grid(info, config.tiling)
    mask_ds = mask_downsample_for(grid.slide_mpp, config.tissue)
    reader = slide_reader(info, grid, config)
    thumbnail, mask = tissue_image(path, reader, grid, mask_ds, config)
    flags = thumbnail_flags(thumbnail, mask, config)
    if keep:
        tmp = Path(f"{keep}.tmp-{os.getpid()}.npz")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, thumbnail=thumbnail, mask=mask, **{FLAG_PREFIX + name: px for name, px in flags.items()})
        os.replace(tmp, keep)
    # its tissue tiles before QC: the runner sizes its groups of small slides by them before any slide is planned
    tiles = int(tissue_tiles(tile_tissue_fraction(mask, mask_ds, grid), config.tissue.fraction_min).sum())
    slide = {"info": info, "reader": reader, "kept": keep, "tissue_tiles": tiles}
    if config.stain.method == "none":  # surveyed ahead of its plan (``plan_ahead.py``): nothing to estimate
        return {"record": None, "slide": slide}
    # Ink, debris and what the slide's annotations exclude are not stain: a pen stroke alone pulled the Macenko
    # vectors of pen-marked slides far off (docs/design/classifier.md, "Artefacts and QC holes").
    stained = mask & ~excluded_pixels(thumbnail, mask, mask_ds, info, config, slide_id_from_path(path), flags)
    return {"record": estimate_stain(thumbnail, stained, config.stain), "slide": slide}


def thumbnail_flags(thumbnail: np.ndarray, mask: np.ndarray, config: PipelineConfig) -> dict[str, np.ndarray]:
    """The pixels each thumbnail QC detector (``pen``, ``debris``) flags, by name; kept for the plan's QC codes."""
    return {detector.name: np.asarray(detector.pixels(thumbnail, mask, config.qc), bool)
            for detector in active_detectors(config.qc.detectors) if detector.where == "thumbnail"}


def excluded_pixels(thumbnail: np.ndarray, mask: np.ndarray, mask_ds: float, info, config: PipelineConfig,
                    slide_id: str, flags: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Tissue pixels of the thumbnail that describe leaves out: flagged by a thumbnail QC detector (``pen``,
    ``debris``; ``flags``: ``thumbnail_flags``, None = computed here) or inside an annotation of an
    ``annotations.exclude`` class (pixel centres, level-0 geometry)."""
    out = np.zeros(mask.shape, bool)
    for px in (thumbnail_flags(thumbnail, mask, config) if flags is None else flags).values():
        out |= px
    source = annotation_file(config.annotations.dir, slide_id)
    if source is None:
        return out & mask
    rows, cols = np.nonzero(mask & ~out)  # the tests describe makes on tile centres (annotation_qc), on pixel centres
    out[rows, cols] = inside_classes(read_annotations(source, info.width_px, info.height_px),
                                     config.annotations.exclude, (cols + 0.5) * mask_ds, (rows + 0.5) * mask_ds)
    return out & mask


def estimate_slide_stain(path: str, config: PipelineConfig, keep: str | None = None) -> dict:
    """The stain record of one slide (``survey_slide``'s)."""
    return survey_slide(path, config, keep)["record"]


def slide_reader(info, grid, config: PipelineConfig):
    """The reader a slide's tiles are read with (``choose_reader`` for these settings)."""
    return choose_reader(info, config.reader.kind, grid.read_level, grid.tile_l0_px / grid.read_downsample / grid.tile_px,
                         scaled_decode=config.reader.scaled_decode,
                         thumbnail_downsample=mask_downsample_for(grid.slide_mpp, config.tissue))


def tissue_image(path: str, reader, grid, mask_ds: int, config: PipelineConfig) -> tuple[np.ndarray, np.ndarray]:
    """(thumbnail, tissue mask) of a slide at ``mask_ds`` (the thumbnail is OpenSlide's pixels with either reader;
    its tiles decoded on two threads: every block of the slide waits for its mask)."""
    with open_reader(path, reader, decode_threads=True) as handle:
        thumbnail = read_thumbnail(handle, mask_ds, path=path)
    return thumbnail, tissue_mask(thumbnail, config.tissue, grid.slide_mpp * mask_ds)


def take_kept_thumbnail(path: str | Path) -> dict | None:
    """{"thumbnail", "mask", "flags"} the stain pass left at ``path`` (the file is removed), or None; "flags": the
    thumbnail QC detectors' pixels (``thumbnail_flags``)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as kept:
            out = {"thumbnail": kept["thumbnail"], "mask": kept["mask"],
                   "flags": {k[len(FLAG_PREFIX):]: kept[k] for k in kept.files if k.startswith(FLAG_PREFIX)}}
    except (OSError, ValueError, KeyError):
        return None
    path.unlink(missing_ok=True)
    return out


def discard_kept_thumbnails(out_dir: str | Path, keep: set[str] | frozenset = frozenset()) -> None:
    """Remove the thumbnails the stain pass kept, but those at the paths in ``keep``."""
    folder = slides_dir(out_dir) / KEPT_THUMBNAILS
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for path in folder.glob("*") if folder.is_dir() else []:
        if str(path) not in keep:
            path.unlink(missing_ok=True)


def estimation_hash(config: PipelineConfig) -> str:
    """Hash of what a slide's estimate depends on (not the target)."""
    data = config.model_dump(mode="json", include={"tiling", "tissue", "stain", "qc", "annotations"})
    data["annotations"].pop("dir")  # the files enter each slide's fingerprint (plan_stain)
    data["annotations"].pop("cam_classes")
    data["stain"].pop("target")
    data["stain"].pop("reference_slide")
    data["tiling"].pop("chunk_tiles")
    data["estimate_revision"] = ESTIMATE_REVISION  # an estimate cached by an older fit is made again
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class StainPlan:
    """The run's config (with the target) and, per slide id, its record and its transform (None: left as is), and
    what the pass read of the slides it surveyed (``survey_slide``'s "slide": metadata, reader, kept thumbnail)."""

    config: PipelineConfig
    records: dict[str, dict] = field(default_factory=dict)
    transforms: dict[str, dict | None] = field(default_factory=dict)
    target_source: str = "none"
    surveyed: dict[str, dict] = field(default_factory=dict)

    def store_attrs(self, slide_id: str) -> dict | None:
        """What a store records about its stain (None when the run does not normalise)."""
        if self.config.stain.method == "none":
            return None
        record = self.records.get(slide_id) or {"status": "not_estimated", "reason": "no estimate"}
        normalised = self.transforms.get(slide_id) is not None
        reason = record.get("reason") if not normalised else None
        if not normalised and reason is None:
            reason = "no cohort target (no slide's stain could be estimated)"
        return {"method": self.config.stain.method, "normalised": normalised, "warning": reason,
                "estimate": record.get("estimate"), "target_source": self.target_source}

    def manifest_record(self, slide_id: str) -> dict | None:
        """The manifest's short form: method, normalised, warning, target source."""
        attrs = self.store_attrs(slide_id)
        return None if attrs is None else {k: v for k, v in attrs.items() if k != "estimate"}


def _load_cache(out_dir: Path) -> dict:
    try:
        data = json.loads((out_dir / STAIN_JSON).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _estimate_all(todo: dict[str, tuple[str, str]], config: PipelineConfig, runner, out_dir: Path | None = None
                  ) -> tuple[dict[str, dict], dict[str, dict]]:
    """(slide id -> record, slide id -> what was read of it) for ``todo`` (slide id -> (path, fingerprint)),
    ``survey_slide`` on each (small slides several to a task, ``grouping.PlanQueue``); with ``out_dir`` each slide's
    survey leaves its thumbnail for ``plan_slide``."""
    keep = {sid: str(_kept_path(out_dir, sid, fp, config)) if out_dir else None for sid, (_, fp) in todo.items()}
    pending = PlanQueue(list(todo), runner.capacity, SURVEY_GROUP_TILES)

    def next_task() -> Task | None:
        if not pending:
            return None
        ids = pending.take()
        return group_task(survey_slide, [(todo[sid][0], config, keep[sid], todo[sid][1]) for sid in ids], tuple(ids))

    records, surveyed = {}, {}
    for done in run_bounded(runner, next_task, in_flight_limit(runner, config.cluster)):
        for sid, one in zip(done.tag, outcomes(done, len(done.tag))):
            if isinstance(one.result, TaskRetry):
                pending.again(sid)
            elif one.error is not None:  # the slide fails again, with its typed error, when it is planned
                records[sid] = {"method": config.stain.method, "status": "failed", "estimate": None,
                                "reason": error_record(one.error)["message"], "tissue_pixels": 0}
            else:
                records[sid], surveyed[sid] = one.result["record"], one.result["slide"]
                grid = tile_grid(one.result["slide"]["info"], config.tiling)
                pending.planned(grid.rows * grid.cols)
    return records, surveyed


def _reference_target(config: PipelineConfig, runner) -> dict:
    path = Path(config.stain.reference_slide)
    if not path.is_file():
        raise ConfigError("stain.reference_slide does not exist", path=path,
                          fix="Give an existing slide file, or leave stain.reference_slide empty to fit the target "
                              "on the cohort.")
    record = _estimate_all({"reference": (str(path), "")}, config, runner)[0]["reference"]
    if record["status"] != "estimated":
        raise ConfigError(f"the stain of stain.reference_slide cannot be estimated: {record['reason']}", path=path,
                          fix="Choose an H&E slide with enough tissue as the reference.")
    return record["estimate"]


def plan_stain(ids: dict[str, Path], out_dir: Path, config: PipelineConfig, runner,
               fingerprints: dict[str, str] | None = None, ahead: dict[str, dict] | None = None) -> StainPlan:
    """Estimate every slide's stain (cached), fix the target, and return the run's config and transforms.
    ``fingerprints``: each slide's ``described_fingerprint`` when the caller has made them (made here otherwise);
    ``ahead``: slide id -> ``survey_new_slide`` of the slides surveyed before the run (not surveyed again)."""
    settings = config.stain
    ahead = ahead or {}
    if settings.method == "none":  # what the plan-ahead child surveyed still spares the slides' plans
        return StainPlan(config, surveyed={slide_id: survey["slide"] for slide_id, survey in ahead.items()})
    key = estimation_hash(config)
    cache = _load_cache(out_dir)
    cached = cache.get("slides", {}) if cache.get("settings") == key else {}
    if fingerprints is None:
        fingerprints = described_fingerprints(ids, config.annotations.dir)
    records, todo = {}, {}
    for slide_id, path in ids.items():
        entry = cached.get(slide_id) or {}
        if entry.get("fingerprint") == fingerprints[slide_id] and entry.get("record", {}).get("status") != "failed":
            records[slide_id] = entry["record"]
        else:
            todo[slide_id] = (str(path), fingerprints[slide_id])
    discard_kept_thumbnails(out_dir, keep={survey["slide"]["kept"] for survey in ahead.values()})
    estimated, surveyed = _estimate_all({k: v for k, v in todo.items() if k not in ahead}, config, runner, out_dir)
    estimated.update({sid: survey["record"] for sid, survey in ahead.items() if sid in todo})
    surveyed.update({sid: survey["slide"] for sid, survey in ahead.items()})
    records.update(estimated)
    saved = cache.get("target") if cache.get("settings") == key else None
    if settings.target is not None:
        target, source = settings.target, "given"
    elif settings.reference_slide:
        target, source = _reference_target(config, runner), "reference_slide"
    elif saved and saved.get("value") is not None:
        target, source = saved["value"], "cohort"  # fitted by an earlier run here: new slides map to the same target
    else:
        target, source = fit_target(list(records.values()), settings.method), "cohort"
    if source == "cohort" and target is not None and not saved:
        saved = {"value": target, "slides": sorted(s for s, r in records.items() if r.get("status") == "estimated")}
    entries = {**cached, **{sid: {"fingerprint": fingerprints[sid], "record": rec} for sid, rec in records.items()}}
    atomic_write_json(out_dir / STAIN_JSON, {"settings": key, "slides": entries,
                                             "target": saved if source == "cohort" else None})
    run_config = config.with_overrides(stain__target=target) if target is not None else config
    plan = StainPlan(run_config, records, target_source=source if target is not None else "none", surveyed=surveyed)
    for slide_id, record in records.items():
        plan.transforms[slide_id] = slide_transform(record, target, settings)
        if record["status"] == "not_estimated" or (target is None and record["status"] == "estimated"):
            log.warning("slide %s: stain left as it is: %s", slide_id, plan.store_attrs(slide_id)["warning"])
    return plan
