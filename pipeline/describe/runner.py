"""Stage 1-2: slides -> tissue mask -> tile grid -> per-tile descriptors in a Zarr store per slide.

Task functions that run on workers (each opens its own slide handle):

* ``plan_slide`` (``plan.py``): metadata, tile grid, tissue mask and thumbnail of one slide (``prepare_slide``), and
  its partial store created there (the thumbnail is written by the worker; small arrays come back);
* ``describe_block`` (``blocks.py``): descriptors of one block of ``chunk_tiles`` x ``chunk_tiles`` tiles (hundreds of
  tiles), written straight into that block's own Zarr chunk;
* ``plan_and_describe`` (``small_slides.py``): a slide with a single block is described in its plan task and its store
  written whole there; small slides go several to a task (``grouping.py``). The run's largest new slide runs it in a
  forked copy of the command while Dask is imported (``plan_ahead.py``).

``describe_slides`` is the thin runner: it decides what is stale, keeps a bounded number of tasks in flight,
finalises stores, and records each slide's outcome in the manifest. One failing slide never stops the others.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.artefacts import RUN_CONFIG_NAME
from ..core.config import PipelineConfig, dump_config
from ..core.errors import DuplicateSlideIdError, SlideError, error_record
from ..core.outputs import Manifest, atomic_write_text, output_lock
from ..core.local_workers import one_blas_thread, worker_start_method
from ..core.parallel import LocalRunner, Task, TaskRetry, in_flight_limit, run_bounded, runner_for
from ..core.progress import Progress
from ..core.store import finalize_store, read_attrs, store_is_current, store_path
from ..core.task_order import balanced_order
from ..slides.open import find_slides, read_slide_info, slide_id_from_path
from ..slides.tiling import tile_grid
from ..slides.annotations import described_fingerprints, unmatched_annotation_files
from ..slides.qc.slide import finalise_slide_qc
from .blocks import describe_block, encoded_on, slide_blocks
from .bookkeeping import ManifestRecords, load_kernels, record_from_store
from .encoders import encoder_info, validate_encoder
from .encoders.placement import block_resources
from .grouping import MAX_GROUP, PlanQueue, group_task, largest_first, outcomes
from .plan import completion_attrs, plan_slide, prepare_slide  # noqa: F401  (prepare_slide: the benchmarks' entry)
from .plan_ahead import PlanAhead, plan_ahead, take_planned, take_surveyed
from .small_slides import plan_and_describe, plan_and_describe_each
from .stain_cohort import discard_kept_thumbnails, plan_stain

log = logging.getLogger("pipeline")
BLOCK_TASK_TILES = 3  # a block task's fixed cost (scheduling, reader, chunk write) in tiles' time


# --- the runner -----------------------------------------------------------------------------------------------------


@dataclass
class _SlideJob:
    slide_id: str
    path: str
    fingerprint: str | None  # None: made by its plan task
    started: float = field(default_factory=time.monotonic)
    plan: dict | None = None
    store: str | None = None
    blocks_left: int = 0
    tiles: int = 0
    fallback_regions: int = 0
    delegated_regions: int = 0
    encoded_on: set = field(default_factory=set)  # "worker (device)" of its blocks
    scores: np.ndarray | None = None  # tile QC scores the blocks returned (all of them unless some were resumed)
    resumed: bool = False


def assign_slide_ids(paths: list[Path]) -> tuple[dict[str, Path], list[tuple[Path, str, str]]]:
    """Map slide id -> path; later paths (in sorted order) whose id collides are returned as failures."""
    ids: dict[str, Path] = {}
    collisions = []
    for path in sorted(paths, key=lambda p: str(p)):
        slide_id = slide_id_from_path(path)
        if slide_id in ids:
            collisions.append((path, slide_id, str(ids[slide_id])))
        else:
            ids[slide_id] = path
    return ids, collisions


def is_one_block_slide(paths: list[Path], config: PipelineConfig) -> bool:
    """``paths`` (``find_slides``') are one slide whose tile grid is a single block: its plan task describes it whole,
    so a local cluster would have nothing to run beside it, and starting one costs more than the slide
    (benchmarks/README.md)."""
    if len(paths) != 1:
        return False
    try:
        grid = tile_grid(read_slide_info(paths[0], config.tiling.mpp_override), config.tiling)
    except SlideError:
        return True  # it fails here as it would on a worker: typed and recorded, with no cluster to start
    except Exception:  # noqa: BLE001 - unexpected: left to a worker, where a crash is retried and recorded
        return False
    return len(grid.chunks(config.tiling.chunk_tiles)) <= 1


def _is_current(path: Path, fingerprint: str, config_hash: str, config: PipelineConfig) -> bool:
    if not store_is_current(path, fingerprint, config_hash):
        return False
    override = config.tiling.mpp_override
    return override is None or (read_attrs(path) or {}).get("mpp") == override


def _fingerprints_needed(ids: dict[str, Path], out_dir: Path, config: PipelineConfig) -> dict[str, str]:
    """``described_fingerprints`` needed before any task: every slide's for the stain pass, else those with a store (is
    it current?). Other slides' plan tasks make their own (``plan.own_fingerprint``): hashing 200 files here held the
    first task back by 0.2-1.1 s (benchmarks/README.md, seventeenth session)."""
    if config.stain.method == "none":
        ids = {slide_id: path for slide_id, path in ids.items() if store_path(out_dir, slide_id).is_dir()}
    return described_fingerprints(ids, config.annotations.dir)


def describe_slides(inputs: list[str | Path], out_dir: str | Path, config: PipelineConfig | None = None,
                    runner=None, progress: bool | None = None, errors: dict | None = None) -> dict:
    """Describe every slide in ``inputs`` (files and/or directories) into ``out_dir``.

    ``runner``: a TaskRunner (see ``pipeline.parallel``); by default the cluster from ``config.cluster``.
    ``errors``: if given, filled with slide id -> the exception that failed it.
    Returns a summary dict; per-slide outcomes are in ``out_dir/manifest.json``. BLAS runs on one thread meanwhile,
    here and in forked workers (``one_blas_thread``).
    """
    with one_blas_thread():
        return _describe_slides(inputs, out_dir, config, runner, progress, errors)


def _describe_slides(inputs: list[str | Path], out_dir: str | Path, config: PipelineConfig | None, runner,
                     progress: bool | None, errors: dict | None) -> dict:
    config = config or PipelineConfig()
    out_dir = Path(out_dir)
    # The encoder is built and tried on two blank tiles first: a bad model stops the run before any slide is read.
    encoder = validate_encoder(config)
    paths, ignored = find_slides(inputs)
    if runner is None and config.cluster.kind == "local" and config.cluster.one_block_in_process \
            and is_one_block_slide(paths, config):
        log.info("one slide of one block: described in this process, no cluster started")
        runner = LocalRunner()
    if isinstance(runner, LocalRunner) or (runner is None and config.cluster.kind == "local"
                                           and worker_start_method(config.cluster) == "fork"):
        load_kernels(config)  # for tasks run here, and forked workers inherit them: once per command, not per worker
    with output_lock(out_dir, command="describe"):
        # the largest new slide planned here while Dask is imported, when a local cluster is about to start
        ahead = plan_ahead(assign_slide_ids(paths)[0], out_dir, config, encoder) if runner is None else None
        try:
            # the child works on while the cluster starts; it is collected when the run begins (``_describe``)
            with runner_for(runner, config.cluster) as active:
                return _describe(paths, ignored, out_dir, config, active, progress, errors, encoder, ahead)
        finally:
            if ahead is not None:
                ahead.wait()  # the cluster failed to start: its store is written before the lock is let go


def _describe(paths: list[Path], ignored: list[dict], out_dir: Path, config: PipelineConfig, runner,
              progress: bool | None, errors: dict | None, encoder, ahead: PlanAhead | None = None) -> dict:
    errors = {} if errors is None else errors
    t_start = time.monotonic()
    manifest = Manifest(out_dir)
    manifest.data["ignored"] = ignored
    ids, collisions = assign_slide_ids(paths)
    # What each store is current for (slide file, annotations): not for the slide planned ahead (its store is new)
    surveyed_ahead = take_surveyed(ahead)  # the new slides surveyed while Dask started
    known = {**(ahead.new_fingerprints() if ahead else {}),
             **{slide_id: survey["fingerprint"] for slide_id, survey in surveyed_ahead.items()}}
    planned_id = ahead.slide_id if ahead is not None and ahead.kind == "plan" else None
    unknown = {k: p for k, p in ids.items() if k != planned_id and k not in known}
    fingerprints = {**known, **_fingerprints_needed(unknown, out_dir, config)}
    # every slide's stain and the target, before blocks
    stain = plan_stain(ids, out_dir, config, runner, fingerprints, surveyed_ahead)
    config = stain.config
    collision_keys: set[str] = set()
    for path, slide_id, other in collisions:
        err = DuplicateSlideIdError(f"its slide id '{slide_id}' is already used by {other}", path=path)
        key = f"{slide_id}@{Path(path).name}"
        if key in collision_keys:
            # the same file name in several folders (e.g. DICOM instances): each needs its own manifest record
            key = f"{slide_id}@{path}"
        collision_keys.add(key)
        errors[key] = err
        manifest.slides[key] = {"status": "failed", "error": err.to_record(), "path": str(path), "mpp": None,
                                "mpp_source": None, "tiles": 0, "seconds": 0.0}
    saved: list[bool] = []

    def save_settings() -> None:  # this run's settings (for `retry` and later stages) and manifest, once
        if not saved:
            atomic_write_text(out_dir / RUN_CONFIG_NAME, dump_config(config))
            manifest.save()
            saved.append(True)

    if runner.dashboard_link:
        log.info("Dask dashboard: %s", runner.dashboard_link)
        print(f"Dask dashboard: {runner.dashboard_link}", flush=True)

    manifest.data["annotation_warnings"] = [f"{p}: no slide with this id in the run; the file is not used"
                                            for p in unmatched_annotation_files(config.annotations.dir, ids)]
    for warning in manifest.data["annotation_warnings"]:
        log.warning("annotations: %s", warning)
    todo: list[_SlideJob] = []
    skipped = 0
    config_hash = config.stage_hash("describe")
    for slide_id, path in ids.items():
        fingerprint = fingerprints.get(slide_id)  # None: no store yet, the plan task makes it
        if fingerprint is not None and _is_current(store_path(out_dir, slide_id), fingerprint, config_hash, config):
            skipped += 1
            if (manifest.slides.get(slide_id) or {}).get("status") != "done":  # finished just before a crash
                manifest.slides[slide_id] = record_from_store(out_dir, slide_id, path)
            continue
        todo.append(_SlideJob(slide_id, str(path), fingerprint))
    planned_here = take_planned(ahead, todo)  # (job, its plan task's outcome), taken out of ``todo``

    bar = Progress(total_slides=len(ids), done_slides=skipped, enabled=progress)
    plan_encoder = encoder_info(encoder)
    resources = block_resources(encoder, runner, config.cluster)  # GPU workers for a learned encoder, if any
    # Slides are planned ahead while few blocks wait, so the next slides' plan tasks (thumbnail, tissue mask, partial
    # store) run beside the current slides' blocks: a directory of small slides keeps the workers busy.
    max_slides_open = max(4, 4 * runner.capacity) * MAX_GROUP  # slides, a group's counted whole
    plan_ahead_blocks = 2 * runner.capacity
    jobs: dict[str, _SlideJob] = {}
    block_queue: list[tuple] = []  # (slide_id, block) waiting to be submitted
    pending = PlanQueue(largest_first(todo, lambda job: job.path), runner.capacity)
    pending.expect([stain.surveyed[job.slide_id]["tissue_tiles"] for job in todo
                    if "tissue_tiles" in stain.surveyed.get(job.slide_id, {})])
    done_count = failed_count = 0
    record_slide = ManifestRecords(manifest)  # saved at intervals, and by record_run at the end

    def fail(job: _SlideJob, err: BaseException) -> None:
        nonlocal failed_count
        errors[job.slide_id] = err
        jobs.pop(job.slide_id, None)
        record = error_record(err)
        info = (job.plan or {}).get("info", {})
        record_slide(job.slide_id, status="failed", error=record, path=job.path, mpp=info.get("mpp"),
                     mpp_source=info.get("mpp_source"), tiles=0, seconds=round(time.monotonic() - job.started, 3))
        failed_count += 1
        bar.slide_done(failed=True)
        level = logging.WARNING if isinstance(err, SlideError) else logging.ERROR
        log.log(level, "slide %s failed: %s", job.slide_id, record["message"])

    def finish(job: _SlideJob) -> None:
        seconds = round(time.monotonic() - job.started, 3)
        reader = job.plan["reader"]["kind"]
        scores = None if job.resumed else job.scores
        qc_counts, blurred = finalise_slide_qc(job.store, config, config.tiling.chunk_tiles, job.plan, scores)
        job.tiles -= blurred  # tile detectors decide at the end: those tiles' descriptors are cleared
        completed = completion_attrs(job.tiles, seconds, reader, qc_counts, sorted(job.encoded_on),
                                     job.fallback_regions, job.delegated_regions, stain.store_attrs(job.slide_id))
        finalize_store(out_dir, job.slide_id, completed)
        recorded(job, completed)

    def recorded(job: _SlideJob, completed: dict) -> None:
        """A slide's store is complete: its manifest record, from the store's ``completion_attrs``."""
        nonlocal done_count
        info = job.plan["info"]
        jobs.pop(job.slide_id, None)
        record_slide(job.slide_id, status="done", error=None, path=job.path, mpp=info["mpp"],
                     mpp_source=info["mpp_source"], tiles=completed["tiles"], seconds=completed["seconds"],
                     reader=completed["reader"], store=str(store_path(out_dir, job.slide_id)),
                     reader_fallback_regions=completed["reader_fallback_regions"], qc=completed["qc"],
                     stain=stain.manifest_record(job.slide_id))
        done_count += 1
        bar.slide_done()
        log.info("slide %s done: %d tiles in %.1f s", job.slide_id, completed["tiles"], completed["seconds"])

    def block_done(job: _SlideJob, result: dict) -> None:
        job.tiles += int(result["tiles"])
        job.fallback_regions += int(result["fallback_regions"])
        job.delegated_regions += int(result["delegated_regions"])
        job.encoded_on.add(encoded_on(result))
        bar.tiles_done(int(result["tiles"]))
        r0, r1, c0, c1 = result["block"]
        if result["qc_scores"].shape[-1]:
            if job.scores is None:
                job.scores = np.full((*job.plan["tissue_tiles"].shape, result["qc_scores"].shape[-1]), np.nan,
                                     np.float32)
            job.scores[r0:r1, c0:c1] = result["qc_scores"]

    def may_plan() -> bool:
        """Slides wait and few are open; while no slide's size is known, at most two unplanned per worker: those go
        one to a task, the slides after them in groups (20 -> 17 tasks for 50 small slides, ~6 ms of CPU each)."""
        if not pending or len(jobs) >= max_slides_open:
            return False
        return pending.sizes_known() or sum(job.plan is None for job in jobs.values()) < 2 * runner.capacity

    def next_task() -> Task | None:
        """Blocks of already-planned slides first (finish what is open), new slides when few blocks wait."""
        if may_plan() and len(block_queue) < plan_ahead_blocks:
            return plan_task()
        while block_queue:
            slide_id, block, block_tiles = block_queue.pop()
            job = jobs.get(slide_id)
            if job is None:  # its slide failed meanwhile
                continue
            return Task(describe_block, (job.path, job.store, str(out_dir), slide_id, job.plan["grid"], block,
                                         block_tiles, config, len(job.plan["descriptor_names"]), job.plan["reader"],
                                         stain.transforms.get(slide_id)),
                        ("block", slide_id), resources)
        if may_plan():  # the blocks waiting were all of slides that failed
            return plan_task()
        return None

    def plan_task() -> Task:
        group = pending.take(grouped=not resources)  # blocks go to the GPU workers: plan alone
        jobs.update((job.slide_id, job) for job in group)
        args = [(job.path, config, str(out_dir), job.slide_id, job.fingerprint, plan_encoder,
                 stain.surveyed.get(job.slide_id)) for job in group]
        tag = ("prepare", tuple(job.slide_id for job in group))
        if resources:
            return Task(plan_slide, args[0], tag)
        args = [(*a, stain.transforms.get(job.slide_id), stain.store_attrs(job.slide_id))
                for a, job in zip(args, group)]
        return group_task(plan_and_describe, args, tag, each=plan_and_describe_each)

    def results():
        """(kind, job, Done) per slide of each finished task; slides to run again alone go back to ``pending``."""
        for job, done in planned_here:
            jobs[job.slide_id] = job
            yield "prepare", job, done
        # the settings are written while the first tasks run: the workers do not wait for them
        for done in run_bounded(runner, next_task, in_flight_limit(runner, config.cluster), save_settings):
            kind, key = done.tag
            for slide_id, one in zip(key, outcomes(done, len(key))) if kind == "prepare" else [(key, done)]:
                job = jobs.get(slide_id)
                if job is not None and isinstance(one.result, TaskRetry):
                    log.info("slide %s: run again alone (%s)", slide_id, one.result.message)
                    jobs.pop(slide_id)
                    pending.again(job)
                elif job is not None:
                    yield kind, job, one

    for kind, job, done in results():
        if done.error is not None:
            fail(job, done.error)
            continue
        if kind == "prepare":
            job.plan = done.result
            job.store = job.plan["store"]
            already = {tuple(origin) for origin in job.plan["already"]}
            described = job.plan.pop("described", None)
            tissue = job.plan["tissue_tiles"]
            bar.add_tiles(int(tissue.sum()))
            pending.planned(int(tissue.sum()))
            if "completed" in job.plan:  # described and its store written whole by its plan task
                bar.tiles_done(job.plan["completed"]["described_tiles"])
                recorded(job, job.plan["completed"])
                continue
            todo_blocks = []
            for b in slide_blocks(job.plan, config.tiling.chunk_tiles):
                n = int(tissue[b[0]:b[1], b[2]:b[3]].sum())
                if (b[0], b[2]) in already:
                    job.tiles += n
                    bar.tiles_done(n)
                    job.resumed = True
                elif described is not None and tuple(described["block"]) == b:
                    block_done(job, described)
                else:
                    todo_blocks.append((n, b))
            # Largest blocks first, the last ones ordered so that the workers finish together (the queue pops from
            # its end); a block costs about its tiles plus a task's fixed cost.
            for i in reversed(balanced_order([n + BLOCK_TASK_TILES for n, _ in todo_blocks], runner.capacity)):
                b = todo_blocks[i][1]
                block_queue.append((job.slide_id, b, tissue[b[0]:b[1], b[2]:b[3]].copy()))
                job.blocks_left += 1
        else:
            block_done(job, done.result)
            job.blocks_left -= 1
        if job.blocks_left == 0:
            finish(job)

    save_settings()  # when there was nothing to run
    bar.close()
    discard_kept_thumbnails(out_dir)  # those of slides that failed before their plan
    seconds = time.monotonic() - t_start
    summary = {"slides": len(ids) + len(collisions), "done": done_count, "skipped": skipped,
               "failed": failed_count + len(collisions), "ignored": len(ignored), "seconds": round(seconds, 2)}
    ahead_tiles = sum(int(done.result["completed"]["described_tiles"]) for _, done in planned_here
                      if done.error is None and "completed" in done.result)
    manifest.record_run("describe", {**summary, "tiles_described_before_run": ahead_tiles})  # not in ``seconds``
    return summary


def describe_slide(path: str | Path, out: str | Path, config: PipelineConfig | None = None) -> Path:
    """Describe one slide in this process (no cluster) and return its store path; raises the slide's typed error."""
    errors: dict = {}
    describe_slides([path], out, config, runner=LocalRunner(), progress=False, errors=errors)
    slide_id = slide_id_from_path(path)
    if slide_id in errors:
        raise errors[slide_id]
    return store_path(out, slide_id)
