"""The Python API for lab scripts: one slide at a time, in this process, with a saved reducer and model.

=====================================================  ==============================================================
``model_describe_config(model_dir)``                    the describe settings a saved model's slides need (here)
``describe_slide(path, out, config)``                   slide -> ``OUT/slides/<id>.zarr`` (pipeline.describe)
``map_slide(store, reducer)``                           descriptors -> ``feature_map`` (pipeline.reduce)
``predict_slide(path, model_dir, out, config)``         slide -> predicted label and probabilities (pipeline.predict)
``cam_slide(store_or_slide, model_dir, out, config)``   Grad-CAM of one slide: ``cam`` array + PNG/TIFF/GeoJSON (here)
=====================================================  ==============================================================

``cam_slide`` is the one-slide form of ``pipeline.cam.runner.cam_slides``: the same layer choice, the same per-slide
CAM (``slide_cam``, averaged over the fold models of a k-fold model), the same ``cam`` array attributes and the same
files (``render_slide_outputs``), so a later ``wsi-pipeline cam`` on the same output directory finds the slide current.
See ``workflows/lab_script.py`` for a runnable example.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from .core.config import PipelineConfig

log = logging.getLogger("pipeline")


def model_describe_config(model_dir: str | Path, config: PipelineConfig | None = None) -> PipelineConfig:
    """The config to describe new slides for a saved model: the tiling/tissue/descriptor settings its training slides
    were described with, and the model's reduce/train settings, with ``config``'s cluster, reader and mpp override."""
    from .core.artefacts import read_model_info
    from .predict import describe_config_for

    return describe_config_for(read_model_info(model_dir), config)


def _is_store(path: Path) -> bool:
    return path.is_dir() and (path / "zarr.json").is_file()


def _describe_for_model(slide: Path, out_dir: Path, trained, config: PipelineConfig) -> Path:
    """Describe ``slide`` with the settings the model's training slides were described with; its store path."""
    from .core.parallel import LocalRunner
    from .core.store import store_path
    from .describe.runner import describe_slides
    from .predict import describe_config_for
    from .slides.open import slide_id_from_path

    errors: dict = {}
    describe_slides([slide], out_dir, describe_config_for(trained.info, config), runner=LocalRunner(),
                    progress=False, errors=errors)
    slide_id = slide_id_from_path(slide)
    if slide_id in errors:
        raise errors[slide_id]
    return store_path(out_dir, slide_id)


def _ensure_feature_map(store: Path, model_dir: Path) -> None:
    """Map the slide with the reducer saved with the model (unless its map is already from that reducer)."""
    from .core.artefacts import REDUCER_DIR
    from .core.errors import MissingInputError
    from .core.maps import has_feature_map
    from .reduce.maps import map_is_current, map_slide
    from .reduce.reducers import load_reducer

    reducer_dir = model_dir / REDUCER_DIR
    if (reducer_dir / "reducer.json").is_file():
        reducer = load_reducer(reducer_dir)
        if not map_is_current(store, reducer.hash):
            map_slide(store, reducer)
        return
    if not has_feature_map(store):
        raise MissingInputError("the slide has no feature map and the model has no reducer/ to make one", path=store,
                                fix="Run `wsi-pipeline reduce --out OUT` first, or use a model directory written by "
                                    "`wsi-pipeline train` after `reduce` (it carries reducer/).")


def cam_slide(store_or_slide_path: str | Path, model_dir: str | Path, out: str | Path | None = None,
              config: PipelineConfig | None = None) -> dict:
    """Grad-CAM of one slide with a saved model, in this process.

    ``store_or_slide_path``: a slide store (``OUT/slides/<id>.zarr``) or a slide file. A slide file is described
    first (with the model's training describe settings) into ``out``; a slide without a feature map from the model's
    reducer is mapped with ``model_dir/reducer``. The ``cam`` array is written into the store and
    ``<out>/cam/<id>.png`` (overlay), ``.tiff`` (pyramidal heatmap) and ``.geojson`` (hot regions for QuPath) next
    to it; ``out`` defaults to the store's output directory, or for a slide file to a new temporary directory that is
    kept (its paths are returned). ``config`` gives the ``cam`` settings (layer, class, overlap, hot threshold).

    Returns {"slide_id", "store", "layer", "class_index", "class_label", "predicted_label", "probabilities":
    {label: p}, "cam": (rows, cols) float32 array in [0, 1] (NaN off tissue), "png", "tiff", "geojson",
    "skipped": True when the CAM and its files were already current}. Raises the slide's typed error.
    """
    from .cam.gradients import default_cam_layer, split_model
    from .cam.heatmaps import render_slide_outputs
    from .cam.runner import cam_entry, slide_outputs, update_store_cam
    from .core.outputs import Manifest, output_lock
    from .core.store import read_attrs
    from .model.trained import TrainedModel

    config = config or PipelineConfig()
    model_dir = Path(model_dir)
    source = Path(store_or_slide_path)
    trained = TrainedModel(model_dir)  # a bad model fails before any work
    if _is_store(source):
        store = source
        home = store.parent.parent  # OUT of OUT/slides/<id>.zarr: its manifest records the stage
        out_dir = Path(out) if out is not None else home
    else:
        out_dir = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="wsi-cam-"))
        home = out_dir
        store = None
    with output_lock(home, command="cam"):
        if store is None:
            store = _describe_for_model(source, out_dir, trained, config)
        _ensure_feature_map(store, model_dir)
        slide_id = (read_attrs(store) or {}).get("slide_id") or store.name[: -len(".zarr")]
        tcfg = trained.train_config
        layer = config.cam.layer or default_cam_layer(trained.models[0], tcfg)
        paths = slide_outputs(out_dir, slide_id)
        cam_models = [split_model(m, layer) for m in trained.models]
        cam, probs, cls, skipped = update_store_cam(store, trained, cam_models, layer, config.cam, paths)
        if not skipped:
            truth = {k: str(v) for k, v in (trained.info.get("truth") or {}).items()}
            entry = cam_entry(slide_id, paths, probs, cls, trained, truth, None)
            render_slide_outputs(str(store), paths, config.cam.hot_threshold, config.cam.tiff_tile_px, entry["title"])
            Manifest(home).update_stage(slide_id, "cam", status="done", layer=layer, class_index=cls,
                                        files={k: str(v) for k, v in paths.items()})
    predicted = trained.mapping.values[int(np.argmax(probs))]
    log.info("cam_slide %s: predicted %s, Grad-CAM of class %s at %s", slide_id, predicted,
             trained.mapping.values[cls], layer)
    return {"slide_id": slide_id, "store": str(store), "layer": layer, "class_index": cls,
            "class_label": trained.mapping.values[cls], "predicted_label": predicted,
            "probabilities": {name: float(p) for name, p in zip(trained.mapping.names(), probs)},
            "cam": cam, **{k: str(v) for k, v in paths.items()}, "skipped": skipped}
