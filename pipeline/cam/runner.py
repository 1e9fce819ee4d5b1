"""``cam_slides``: Grad-CAM for every slide with a feature map, with the model loaded once: the ``cam`` array in each
store (recomputed only when the model, the CAM settings or the map changed) and the files ``OUT/cam/<id>.png``
(overlay), ``.tiff`` (pyramidal heatmap), ``.geojson`` (hot regions) and the cohort contact sheet ``OUT/mosaic.png``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from ..core.artefacts import CAM_DIR, MODEL_DIR, MOSAIC_PNG, model_identity, read_model_info
from ..core.maps import FEATURE_MAP, has_feature_map, map_identity
from ..core.store import slide_id_of
from .annotations import write_annotation_agreement
from .gradients import default_cam_layer, split_model
from .views import slide_cam_with_models


def cam_hash(model_info: dict, cam_cfg, layer: str, map_attrs: dict | None) -> str:
    """What a slide's CAM depends on: the model, the CAM settings and layer, and the feature map."""

    payload = {"model": model_identity(model_info),
               "cam": cam_cfg.model_dump(mode="json"), "layer": layer,
               "map": map_identity(map_attrs), "map_config": (map_attrs or {}).get("config_hash")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def slide_outputs(out_dir, slide_id: str) -> dict:

    base = Path(out_dir) / CAM_DIR
    return {"png": base / f"{slide_id}.png", "tiff": base / f"{slide_id}.tiff", "geojson": base / f"{slide_id}.geojson"}


def update_store_cam(store, trained, cam_models, layer: str, cam_cfg, paths: dict):
    """The ``cam`` array of one store, recomputed only when stale (model, CAM settings, layer, map) or when one of
    the slide's CAM files is missing. Returns (cam, mean probabilities, class explained, skipped)."""
    from ..core.store import array_attrs, read_array, write_array

    digest = cam_hash(trained.info, cam_cfg, layer, array_attrs(store, FEATURE_MAP))
    old = array_attrs(store, "cam")
    if old and old.get("cam_hash") == digest and all(p.exists() for p in paths.values()):
        return (read_array(store, "cam"), np.asarray(old["probabilities"], dtype=np.float32),
                int(old["class_index"]), True)
    cam, probs, cls = slide_cam_with_models(cam_models, read_array(store, FEATURE_MAP), trained.train_config,
                                            cam_cfg, described=read_array(store, "tissue_mask"))
    write_array(store, "cam", cam, attrs={
        "cam_hash": digest, "layer": layer, "class_index": cls, "class_label": str(trained.mapping.values[cls]),
        "probabilities": [float(p) for p in probs], "fill_value": "NaN where no tissue"})
    return cam, probs, cls, False


def iter_store_cams(out_dir, model_dir, config, stores, labels: dict | None = None) -> Iterator[dict]:
    """The model half of the CAM stage: loads the model once and brings each store's ``cam`` array up to date.

    Yields one record per store: ``slide_id``, ``layer``, ``current`` (nothing recomputed) and either ``entry``
    (caption data) or ``error`` (a typed error's record). Keras runs here; the file rendering is the caller's.
    """
    from ..core.errors import PipelineError, error_record
    from ..core.parallel import where_am_i
    from ..model.trained import TrainedModel

    trained = TrainedModel(model_dir)
    tcfg = trained.train_config
    layer = config.cam.layer or default_cam_layer(trained.models[0], tcfg)
    cam_models = [split_model(m, layer) for m in trained.models]
    where = where_am_i()
    logging.getLogger("pipeline").info("cam: %d model(s) from %s, Grad-CAM at %s, on %s", len(cam_models), model_dir,
                                       layer, where["worker"] or f"pid {where['pid']}")
    # true labels: given, else those the model was trained with; and which split each slide was in
    labels = {**{k: str(v) for k, v in (trained.info.get("truth") or {}).items()}, **(labels or {})}
    splits = trained.info.get("splits") or []
    split_of = {sid: name for split in splits for name in ("train", "val", "test")
                for sid in split.get(name) or [] if len(splits) == 1}
    for store in stores:
        store = Path(store)
        slide_id = slide_id_of(store)
        record = {"slide_id": slide_id, "store": str(store), "layer": layer, "current": False, "computed_on": where}
        paths = slide_outputs(out_dir, slide_id)
        try:
            _, probs, cls, record["current"] = update_store_cam(store, trained, cam_models, layer, config.cam, paths)
        except PipelineError as err:
            record["error"] = error_record(err)
        else:
            record["entry"] = cam_entry(slide_id, paths, probs, cls, trained, labels, split_of.get(slide_id))
        yield record


def store_cams_task(out_dir: str, model_dir: str, config_json: dict, stores: list[str],
                    labels: dict | None) -> list[dict]:
    """Dask task: :func:`iter_store_cams` for a list of stores on the (GPU) worker it was placed on."""
    from ..core.config import PipelineConfig
    from ..core.outputs import log_file

    with log_file(out_dir, "cam-worker"):
        return list(iter_store_cams(out_dir, model_dir, PipelineConfig.model_validate(config_json), stores, labels))


def cam_slides(out_dir, config=None, model_dir=None, runner=None, labels: dict | None = None,
               progress: bool | None = None) -> dict:
    """Grad-CAM for every slide with a feature map: ``cam`` array in its store, and OUT/cam/<id>.png/.tiff/.geojson,
    plus the cohort contact sheet OUT/mosaic.png. Resumable: a slide is redone only when the model, the CAM
    settings or its map changed, or one of its files is missing.

    The model runs once for the cohort: as one task on a GPU worker when the cluster has one
    (``cluster.gpu_placement``), else in this process (on its GPU when there is one); the heavy file rendering is
    spread over the ``runner`` (one task per slide, Keras-free).
    """

    from ..core.config import PipelineConfig
    from ..core.errors import error_record
    from ..core.outputs import Manifest, output_lock
    from ..core.parallel import GPU_RESOURCES, LocalRunner, gpu_placement
    from ..core.progress import Progress
    from ..core.store import list_stores
    from .heatmaps import render_slide_outputs, save_contact_sheet

    log = logging.getLogger("pipeline")
    config = config or PipelineConfig()
    out_dir = Path(out_dir)
    model_dir = Path(model_dir) if model_dir else out_dir / MODEL_DIR
    t0 = time.monotonic()
    with output_lock(out_dir, command="cam"):
        manifest = Manifest(out_dir)
        runner = runner or LocalRunner()
        stores = [s for s in list_stores(out_dir) if has_feature_map(s)]
        if stores and gpu_placement(runner, config.cluster):
            records = runner.run_one(store_cams_task, str(out_dir), str(model_dir), config.model_dump(mode="json"),
                                     [str(s) for s in stores], labels, resources=GPU_RESOURCES)
        else:  # lazily: renders of finished slides start while the next CAMs are computed
            records = iter_store_cams(out_dir, model_dir, config, stores, labels)
        bar = Progress(total_slides=len(stores), enabled=progress)
        done = skipped = failed = 0
        layer = config.cam.layer
        entries = []
        pending = {}
        for record in records:
            slide_id, layer = record["slide_id"], record["layer"]
            if "error" in record:
                failed += 1
                manifest.update_stage(slide_id, "cam", status="failed", error=record["error"])
                bar.slide_done(failed=True)
                continue
            entry = record["entry"]
            if record["current"]:
                skipped += 1
                bar.slide_done()
                entries.append(entry)
                continue
            runner.submit(render_slide_outputs, record["store"], slide_outputs(out_dir, slide_id),
                          config.cam.hot_threshold, config.cam.tiff_tile_px, entry["title"], tag=slide_id)
            pending[slide_id] = {**entry, "computed_on": record["computed_on"]}
        while pending and runner.pending():
            result = runner.next_done()
            entry = pending.pop(result.tag)
            if result.error is not None:
                failed += 1
                manifest.update_stage(result.tag, "cam", status="failed", error=error_record(result.error))
                bar.slide_done(failed=True)
                log.warning("CAM outputs of %s failed: %s", result.tag, result.error)
                continue
            done += 1
            manifest.update_stage(result.tag, "cam", status="done", layer=layer, class_index=entry["class_index"],
                                  files=result.result, computed_on=entry["computed_on"])
            entries.append(entry)
            bar.slide_done()
        bar.close()
        entries.sort(key=lambda e: -e["score"])
        if entries:
            save_contact_sheet(out_dir / MOSAIC_PNG, [{"image": e["png"], "caption": e["caption"]} for e in entries])
        agreement = write_annotation_agreement(out_dir, stores, config.annotations.cam_classes,
                                               model_identity(read_model_info(model_dir)))
        for slide_id, scores in (agreement or {}).get("per_slide", {}).items():  # the report's per-slide column
            manifest.slides.setdefault(slide_id, {}).setdefault("stages", {}).setdefault("cam", {}).update(
                annotation_class=scores["class"], pointing_hit=scores["pointing_hit"],
                iou_top_decile=scores["iou_top_decile"])
        summary = {"slides": len(stores), "done": done, "skipped": skipped, "failed": failed, "layer": layer,
                   "seconds": round(time.monotonic() - t0, 2),
                   **({"annotation_agreement": agreement["overall"]} if agreement else {})}
        manifest.data["runs"].append({"command": "cam", "finished": time.time(), **summary})
        manifest.save()
    return summary


def cam_entry(slide_id, paths, probs, cls, trained, labels, split) -> dict:
    """Caption data of one slide: predicted label and its probability, true label and split when known."""
    predicted = str(trained.mapping.values[int(np.argmax(probs))])
    true = labels.get(slide_id)
    truth = f"true {true}" if true not in (None, "") else "true ?"
    where = f" [{split}]" if split else ""
    p = float(np.max(probs))
    title = (f"{slide_id}{where}: {truth} / predicted {predicted} (p={p:.2f}); "
             f"Grad-CAM of class {trained.mapping.values[cls]}")
    return {"slide_id": slide_id, "png": paths["png"], "score": float(probs[-1]), "class_index": cls,
            "predicted": predicted, "true": true, "split": split, "title": title,
            "caption": f"{slide_id}{where}\n{truth} / pred {predicted} p={p:.2f}", "probabilities": [float(x) for x in probs]}
