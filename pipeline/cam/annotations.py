"""How well each slide's CAM points at the pathologist's annotations of the class it explains.

For a slide whose ``tile_annotation`` holds tiles of that class (the model's label, or the class
``annotations.cam_classes`` maps it to): the **pointing game** (the CAM's hottest tissue tile lies in an annotation
of the class) and the **IoU of the top-decile CAM** (tissue tiles at or above the CAM's 90th percentile, against the
annotated tissue tiles). Written to ``OUT/cam/annotation_metrics.json`` and, under ``cam_annotations``, to
``OUT/metrics.json``; the report shows them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..core.artefacts import ANNOTATION_METRICS_JSON, CAM_DIR, METRICS_JSON
from ..core.outputs import atomic_write_json
from ..core.store import array_attrs, read_array, slide_id_of

TOP_FRACTION = 0.1


def cam_annotation_scores(cam: np.ndarray, target: np.ndarray) -> dict | None:
    """Pointing hit and top-decile IoU of a (rows, cols) CAM (NaN off tissue) against a bool target mask; None
    when no tissue tile is annotated."""
    tissue = np.isfinite(cam)
    target = target & tissue
    if not target.any():
        return None
    peak = np.unravel_index(np.nanargmax(np.where(tissue, cam, -np.inf)), cam.shape)
    top = tissue & (cam >= np.nanpercentile(cam[tissue], 100 * (1 - TOP_FRACTION)))
    iou = float((top & target).sum() / (top | target).sum())
    return {"pointing_hit": bool(target[peak]), "iou_top_decile": round(iou, 4), "annotated_tiles": int(target.sum()),
            "top_tiles": int(top.sum())}


def slide_agreement(store, cam_classes: dict[str, str]) -> dict | None:
    """The scores of one store against the annotation class its CAM's class maps to (None: not annotated)."""
    cam_attrs, labels_attrs = array_attrs(store, "cam"), array_attrs(store, "tile_annotation")
    if not cam_attrs or not labels_attrs or not labels_attrs.get("classes"):
        return None
    label = str(cam_attrs.get("class_label"))
    name = cam_classes.get(label, label)
    classes = list(labels_attrs["classes"])
    if name not in classes:
        return None
    target = read_array(store, "tile_annotation") == classes.index(name) + 1
    scores = cam_annotation_scores(read_array(store, "cam"), target)
    return None if scores is None else {"class": name, "model_label": label, **scores}


def annotation_agreement(stores, cam_classes: dict[str, str]) -> dict:
    """{"per_slide": {slide_id: scores}, "overall": {slides, pointing_game, iou_top_decile_mean}}."""
    per_slide = {}
    for store in stores:
        scores = slide_agreement(store, cam_classes)
        if scores is not None:
            per_slide[slide_id_of(store)] = scores
    overall = {"slides": len(per_slide)}
    if per_slide:
        overall["pointing_game"] = round(float(np.mean([s["pointing_hit"] for s in per_slide.values()])), 4)
        overall["iou_top_decile_mean"] = round(float(np.mean([s["iou_top_decile"] for s in per_slide.values()])), 4)
    return {"per_slide": per_slide, "overall": overall}


def write_annotation_agreement(out_dir, stores, cam_classes: dict[str, str], model: str) -> dict | None:
    """Compute, write ``OUT/cam/annotation_metrics.json`` (with the ``model`` identity the CAMs came from, so that
    ``evaluate`` can keep it) and merge into ``OUT/metrics.json``; None when no slide has annotations of its CAM's
    class."""
    result = annotation_agreement(stores, cam_classes)
    if not result["per_slide"]:
        return None
    result["model"] = model
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / CAM_DIR / ANNOTATION_METRICS_JSON, result)
    metrics_path = out_dir / METRICS_JSON
    if metrics_path.is_file():
        try:
            metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            metrics = None
        if isinstance(metrics, dict):
            atomic_write_json(metrics_path, {**metrics, "cam_annotations": result})
    return result
