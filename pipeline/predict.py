"""``predict``: new slides end to end with a trained model. Each slide is described with the settings the model's
training slides were described with, mapped with the reducer saved next to the model, and predicted; the stage
writes ``OUT/predict/predictions.csv`` and ``OUT/predict/summary.json``.

Import rule: ``pipeline.predict`` imports the stages before it (describe, reduce, model, evaluate) and the core.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .core.artefacts import PREDICT_DIR, PREDICTIONS_CSV, REDUCER_DIR
from .core.config import PipelineConfig
from .core.errors import MissingInputError, ModelError, PipelineError, error_record
from .core.maps import read_feature_maps
from .core.outputs import Manifest, atomic_write_json, atomic_write_text, output_lock
from .core.store import store_path
from .evaluate.files import predictions_table
from .model.trained import TrainedModel, saved_train_settings


def describe_config_for(info: dict, config: PipelineConfig | None) -> PipelineConfig:
    """The settings to describe new slides with: the training slides' tiling/tissue/descriptor/stain/QC settings (as
    their stores recorded them; the stain target too), with the caller's cluster, reader, annotations (they are
    about the new slides) and mpp override."""
    config = config or PipelineConfig()
    data = config.model_dump(mode="python")
    described = info.get("describe_config") or {}
    for section, values in described.items():
        if section in ("tiling", "tissue", "descriptor", "stain", "qc"):
            data[section] = values
    if described and "stain" not in described:  # trained on slides described before stain normalisation existed
        data["stain"] = {"method": "none"}
    if described and "qc" not in described:  # trained before artifact QC existed, or with it off (not hashed then)
        data["qc"] = {"detectors": []}
    if config.tiling.mpp_override is not None:  # about the new slides' files, not the model
        data["tiling"] = {**data["tiling"], "mpp_override": config.tiling.mpp_override}
    data["reduce"] = info["config"].get("reduce", data["reduce"])
    data["train"] = saved_train_settings(info)
    return PipelineConfig.model_validate(data)


def with_reducer_stain(config: PipelineConfig, stain: dict | None) -> PipelineConfig:
    """``config`` with the stain settings and target saved with the reducer (new slides map to the cohort's target)."""
    if not stain:
        return config
    data = config.model_dump(mode="python")
    data["stain"] = stain
    return PipelineConfig.model_validate(data)


def predict_slides(slides: Sequence[str | Path], model_dir: str | Path, out_dir: str | Path,
                   config: PipelineConfig | None = None, runner=None, progress: bool | None = None,
                   errors: dict | None = None) -> dict:
    """Describe new slides into ``out_dir``, map them with the model's reducer, predict.

    Writes ``OUT/predict/predictions.csv`` and returns {"predictions": [{"slide_id", "predicted_label",
    "probabilities"}], "failed": {slide_id: error record}}. ``errors``, if given, is filled with slide id -> the
    exception that failed it. A failing slide never stops the others.
    """
    from .describe.runner import assign_slide_ids, describe_slides
    from .reduce.maps import map_slide
    from .reduce.reducers import load_reducer
    from .slides.open import find_slides

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    t0 = time.monotonic()
    trained = TrainedModel(model_dir)  # fail on a bad model before describing anything
    reducer_dir = model_dir / REDUCER_DIR
    if not reducer_dir.is_dir():
        raise ModelError(f"no {REDUCER_DIR}/ saved with the model", path=model_dir,
                         fix="Retrain with `wsi-pipeline train` after `reduce` (it copies OUT/reducer/ into the model).")
    reducer = load_reducer(reducer_dir)
    dcfg = with_reducer_stain(describe_config_for(trained.info, config), reducer.fit_info.get("stain"))
    errors = {} if errors is None else errors
    describe_slides(list(slides), out_dir, dcfg, runner=runner, progress=progress, errors=errors)
    paths, _ = find_slides(slides)
    ids, _ = assign_slide_ids(paths)
    failed = {sid: error_record(err) for sid, err in errors.items()}
    rows: list[dict] = []
    with output_lock(out_dir, command="predict"):
        manifest = Manifest(out_dir)
        ok_ids, maps = [], []
        for slide_id in sorted(ids):
            if slide_id in failed:
                continue
            try:
                map_slide(store_path(out_dir, slide_id), reducer)
                maps.extend(read_feature_maps(out_dir, [slide_id]))
                ok_ids.append(slide_id)
            except PipelineError as err:
                errors[slide_id] = err
                failed[slide_id] = error_record(err)
        proba = trained.predict(maps) if maps else np.zeros((0, trained.mapping.num_classes), np.float32)
        predicted = trained.mapping.to_label(proba.argmax(axis=1)) if len(proba) else []
        for i, slide_id in enumerate(ok_ids):
            probs = {name: float(p) for name, p in zip(trained.mapping.names(), proba[i])}
            rows.append({"slide_id": slide_id, "predicted_label": predicted[i], "probabilities": probs})
            manifest.set_stage(slide_id, "predict", {"status": "done", "predicted_label": predicted[i],
                                                     "model": str(model_dir.resolve())})
        for slide_id, record in failed.items():
            manifest.set_stage(slide_id, "predict", {"status": "failed", "error": record})
        manifest.save()
        text = predictions_table(ok_ids, proba, trained.mapping)
        atomic_write_text(out_dir / PREDICT_DIR / PREDICTIONS_CSV, text)
        atomic_write_json(out_dir / PREDICT_DIR / "summary.json", {
            "model": str(model_dir.resolve()), "slides": len(ids), "predicted": len(ok_ids), "failed": failed,
            "seconds": round(time.monotonic() - t0, 2)})
    return {"predictions": rows, "failed": failed}


def predict_slide(path: str | Path, model_dir: str | Path, out: str | Path | None = None,
                  config: PipelineConfig | None = None) -> dict:
    """One slide, in this process: {"slide_id", "predicted_label", "probabilities": {label: p}}.

    ``out`` keeps the slide's store (descriptors, feature map) there; without it a temporary directory is used.
    Raises the slide's typed error when it cannot be described or mapped.
    """
    from .core.parallel import LocalRunner

    tmp = tempfile.mkdtemp(prefix="wsi-predict-") if out is None else None
    errors: dict = {}
    try:
        result = predict_slides([path], model_dir, out or tmp, config, runner=LocalRunner(), progress=False,
                                errors=errors)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if errors:
        raise next(iter(errors.values()))
    if not result["predictions"]:
        raise MissingInputError("no slide found at this path", path=path,
                                fix="Pass a whole-slide image file (SVS, TIFF, NDPI, ...).")
    return result["predictions"][0]
