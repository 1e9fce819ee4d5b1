"""``reduce_slides``: fit (or reuse, or load) the cohort's reducer, then map every stale slide in parallel (one task
per slide) and write ``OUT/maps/<slide_id>.png`` (+ ``explained_variance.png`` for PCA).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..core.artefacts import EXPLAINED_VARIANCE_PNG, MAPS_DIR, REDUCER_DIR
from ..core.config import PipelineConfig
from ..core.errors import ReducerError, SlideError, error_record
from ..core.outputs import Manifest, output_lock
from ..core.parallel import Task, in_flight_limit, run_bounded, runner_for
from ..core.progress import Progress
from ..core.store import list_stores, slide_id_of, slides_dir
from .fitting import fit_reducer
from .maps import map_is_current, map_picture_path, map_store_task
from .reducers import REDUCER_JSON, PCAReducer, Reducer, load_reducer, remember_reducer, resolve_reducer_dir
from .sampling import fit_inputs

log = logging.getLogger("pipeline")


def _saved_reducer(directory: Path) -> Reducer | None:
    if not (directory / REDUCER_JSON).is_file():
        return None
    try:
        return load_reducer(directory)
    except ReducerError as err:
        log.warning("reduce: the saved reducer cannot be used and is fitted again: %s", err)
        return None


def reduce_slides(out_dir: str | Path, config: PipelineConfig | None = None, reducer_path: str | Path | None = None,
                  runner=None, progress: bool | None = None, errors: dict | None = None) -> dict:
    """Fit (or reuse / load) the reducer and map every described slide in ``out_dir``.

    ``reducer_path``: map with this saved reducer instead of fitting (copied to ``OUT/reducer/``); its method and
    component count win over ``config.reduce``. ``runner``: a TaskRunner (default: the cluster of
    ``config.cluster``). ``errors``: if given, filled with slide id -> the exception that failed it.
    Returns a summary dict; per-slide outcomes are in the manifest under ``stages.reduce``.
    """
    config = config or PipelineConfig()
    out_dir = Path(out_dir)
    with output_lock(out_dir, command="reduce"), runner_for(runner, config.cluster) as active:
        return _reduce(out_dir, config, reducer_path, active, progress, errors)


def _obtain_reducer(out_dir: Path, stores: list[Path], config: PipelineConfig, reducer_path, runner
                    ) -> tuple[Reducer, str]:
    target = out_dir / REDUCER_DIR
    if reducer_path is not None:
        reducer = load_reducer(reducer_path)
        source = resolve_reducer_dir(reducer_path).resolve()
        if source != target.resolve():
            saved = _saved_reducer(target)
            if saved is None or saved.hash != reducer.hash:
                reducer.save(target)
        return reducer, "loaded"
    inputs = fit_inputs(stores, config)
    saved = _saved_reducer(target)
    if saved is not None and saved.fit_inputs_match(inputs):
        return saved, "reused"
    reducer = fit_reducer(stores, config, runner)
    reducer.save(target)
    return reducer, "fitted"


def _reduce(out_dir: Path, config: PipelineConfig, reducer_path, runner, progress: bool | None,
            errors: dict | None) -> dict:
    from ..core.pictures import save_explained_variance_png

    errors = {} if errors is None else errors
    t_start = time.monotonic()
    stores = list_stores(out_dir)
    if not stores:
        raise ReducerError("no described slides (complete stores) in this output directory",
                           path=slides_dir(out_dir), fix="Run `wsi-pipeline describe --slides ... --out OUT` first.")
    if runner.dashboard_link:
        log.info("Dask dashboard: %s", runner.dashboard_link)
    reducer, source = _obtain_reducer(out_dir, stores, config, reducer_path, runner)
    reducer_dir = out_dir / REDUCER_DIR
    remember_reducer((str(reducer_dir.resolve()), reducer.hash), reducer)  # in-process tasks reuse this object
    log.info("reduce: %s reducer %s (%s, %d components)", source, reducer.hash, reducer.method, reducer.components)
    ev_png = out_dir / MAPS_DIR / EXPLAINED_VARIANCE_PNG
    if isinstance(reducer, PCAReducer) and (source != "reused" or not ev_png.exists()):
        save_explained_variance_png(ev_png, reducer.explained_variance_ratio, reducer.components,
                                    title=f"PCA explained variance ({reducer.descriptor['name']} descriptors, "
                                          f"{reducer.fit_info.get('sample_rows', '?')} tiles)")
    elif not isinstance(reducer, PCAReducer):
        ev_png.unlink(missing_ok=True)  # from an earlier PCA run: it would describe another reducer

    manifest = Manifest(out_dir)
    todo, skipped = [], 0
    for store in stores:
        slide_id = slide_id_of(store)
        if map_is_current(store, reducer.hash) and map_picture_path(out_dir, slide_id).exists():
            skipped += 1
            continue
        todo.append((slide_id, store))

    bar = Progress(total_slides=len(stores), done_slides=skipped, enabled=progress)
    tasks = iter([Task(map_store_task, (str(store), str(reducer_dir), reducer.hash,
                                        str(map_picture_path(out_dir, slide_id))), slide_id)
                  for slide_id, store in todo])
    done_count = failed_count = 0
    for done in run_bounded(runner, lambda: next(tasks, None), in_flight_limit(runner, config.cluster)):
        slide_id = done.tag
        if done.error is not None:
            errors[slide_id] = done.error
            record = error_record(done.error)
            manifest.update_stage(slide_id, "reduce", status="failed", error=record, reducer_hash=reducer.hash)
            failed_count += 1
            bar.slide_done(failed=True)
            level = logging.WARNING if isinstance(done.error, SlideError) else logging.ERROR
            log.log(level, "reduce: slide %s failed: %s", slide_id, record["message"])
            continue
        result = done.result
        manifest.update_stage(slide_id, "reduce", status="done", error=None, method=reducer.method,
                              components=reducer.components, reducer_hash=reducer.hash,
                              tissue_cells=result["tissue_cells"], map_shape=result["shape"],
                              picture=str(map_picture_path(out_dir, slide_id)), seconds=result["seconds"])
        done_count += 1
        bar.add_tiles(result["tissue_cells"])
        bar.tiles_done(result["tissue_cells"])
        bar.slide_done()
    bar.close()
    summary = {"slides": len(stores), "done": done_count, "skipped": skipped, "failed": failed_count,
               "method": reducer.method, "components": reducer.components, "reducer": source,
               "reducer_hash": reducer.hash, "seconds": round(time.monotonic() - t_start, 2)}
    manifest.record_run("reduce", summary)
    return summary
