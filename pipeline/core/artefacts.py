"""Names of what the stages write in an output directory, and reading the trained-model artefact.

``OUT/`` holds ``config.yaml`` and ``slides/`` (describe; the stores, ``pipeline.core.store``), ``reducer/`` and
``maps/`` (reduce), ``model/`` (train: the model files, ``model_info.json``, ``labels.json``, ``baseline.json`` and a
copy of ``reducer/``), ``metrics.json``, ``predictions.csv`` and ``plots/`` (evaluate), ``predict/`` (predict),
``cam/`` and ``mosaic.png`` (CAM) and ``report.html``. The writer of each artefact and its readers import the names
from here.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ModelError

RUN_CONFIG_NAME = "config.yaml"  # the settings of the last describe run (retry and later stages reuse them)
REDUCER_DIR = "reducer"
MAPS_DIR = "maps"
EXPLAINED_VARIANCE_PNG = "explained_variance.png"
MODEL_DIR = "model"
MODEL_INFO = "model_info.json"
LABELS_JSON = "labels.json"
BASELINE_JSON = "baseline.json"  # the map-statistics baseline of each model (pipeline.model.baseline)
METRICS_JSON = "metrics.json"
PREDICTIONS_CSV = "predictions.csv"
PLOTS_DIR = "plots"
PREDICT_DIR = "predict"
CAM_DIR = "cam"
MOSAIC_PNG = "mosaic.png"
ANNOTATION_METRICS_JSON = "annotation_metrics.json"  # under CAM_DIR: the CAMs against annotations
REPORT_HTML = "report.html"


def model_identity(info: dict) -> str:
    """What names a trained model in the files derived from it (CAM hashes, the CAM-annotation metrics): its hash
    and when it was trained (a model trained again on the same inputs, e.g. ``--force``, has other weights)."""
    name = str(info.get("hash") or info.get("model_hash") or info.get("models"))
    return f"{name}@{info['created']}" if info.get("created") is not None else name


def read_model_info(model_dir: str | Path) -> dict:
    """``model_info.json`` of a model directory written by ``train`` (a ``ModelError`` when missing or damaged)."""
    model_dir = Path(model_dir)
    path = model_dir / MODEL_INFO
    if not path.is_file():
        raise ModelError(f"no {MODEL_INFO} in the model directory", path=model_dir,
                         fix="Pass the directory `wsi-pipeline train` wrote (OUT/model), after training finished.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelError(f"{MODEL_INFO} is not valid JSON ({err})", path=path, fix="Retrain the model.") from None
