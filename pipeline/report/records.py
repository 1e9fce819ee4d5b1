"""One row per slide of a run, from the files the stages wrote (manifest, predictions, stores): the report's slide
table and the viewer's slide list both read them through here. Each column is one small function of the slide's
manifest record and prediction row, so a stage that records something new adds one function and one entry to
``COLUMNS``.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable

from ..core.artefacts import PREDICTIONS_CSV


def read_predictions(out_dir: str | Path) -> dict[str, dict]:
    """``predictions.csv`` rows by slide id ({} when the run has none)."""
    path = Path(out_dir) / PREDICTIONS_CSV
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as fh:
        return {row["slide_id"]: row for row in csv.DictReader(fh)}


def predicted_probability(prediction: dict) -> float | None:
    """Probability of the predicted class in a ``predictions.csv`` row (None when absent)."""
    value = prediction.get(f"prob_{prediction.get('predicted_label')}")
    try:
        return round(float(value), 4) if value not in (None, "") else None
    except ValueError:
        return None


def failure_of(record: dict) -> dict | None:
    """The first failure of a slide's manifest record: {stage, code, message}, or None."""
    if record.get("status") == "failed":
        err = record.get("error") or {}
        return {"stage": "describe", "code": err.get("code", ""), "message": err.get("message", "")}
    for stage, srec in (record.get("stages") or {}).items():
        if isinstance(srec, dict) and srec.get("status") == "failed":
            err = srec.get("error") or {}
            return {"stage": stage, "code": err.get("code", ""), "message": err.get("message", "")}
    return None


def failures_of(record: dict) -> list[dict]:
    """Every failed stage of a slide's manifest record, as {stage, code, message}."""
    out = []
    if record.get("status") == "failed":
        err = record.get("error") or {}
        out.append({"stage": "describe", "code": err.get("code", ""), "message": err.get("message", "")})
    for stage, srec in sorted((record.get("stages") or {}).items()):
        if isinstance(srec, dict) and srec.get("status") == "failed":
            err = srec.get("error") or {}
            out.append({"stage": stage, "code": err.get("code", ""), "message": err.get("message", "")})
    return out


def status(record: dict, prediction: dict) -> str:
    return "failed" if failure_of(record) else str(record.get("status", "unknown"))


def true_label(record: dict, prediction: dict) -> str | None:
    if prediction.get("true_label") not in (None, ""):
        return prediction["true_label"]
    label = ((record.get("stages") or {}).get("train") or {}).get("label")
    return None if label is None else str(label)


def predicted_label(record: dict, prediction: dict) -> str | None:
    return prediction.get("predicted_label") or None


def probability(record: dict, prediction: dict) -> float | None:
    return predicted_probability(prediction)


def split(record: dict, prediction: dict) -> str | None:
    return ((record.get("stages") or {}).get("train") or {}).get("split")


def tiles(record: dict, prediction: dict) -> int | None:
    return record.get("tiles")


def mpp(record: dict, prediction: dict) -> float | None:
    return record.get("mpp")


def qc_excluded(record: dict, prediction: dict) -> int | None:
    """Tissue tiles QC left out (the manifest's ``qc`` counts by reason), None when the run recorded none."""
    counts = record.get("qc")
    return int(sum(counts.values())) if isinstance(counts, dict) else None


def qc_reasons(record: dict, prediction: dict) -> str | None:
    """The manifest's QC counts by reason, e.g. ``pen 12, blur 3`` (None when nothing was left out)."""
    counts = record.get("qc")
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) if isinstance(counts, dict) and counts else None


def cam_annotation(record: dict, prediction: dict) -> str | None:
    """The CAM against the slide's annotations, e.g. ``Tumor: hit, IoU 0.42`` (None when not annotated)."""
    cam = (record.get("stages") or {}).get("cam") or {}
    if "iou_top_decile" not in cam:
        return None
    return f"{cam['annotation_class']}: {'hit' if cam['pointing_hit'] else 'miss'}, IoU {cam['iou_top_decile']:.2f}"


def failure(record: dict, prediction: dict) -> str | None:
    fail = failure_of(record)
    return f"{fail['stage']}: {fail['code']}" if fail else None


# column name -> function of (manifest record, prediction row); the order is the table's
COLUMNS: dict[str, Callable[[dict, dict], object]] = {
    "status": status, "label": true_label, "prediction": predicted_label, "probability": probability,
    "split": split, "tiles": tiles, "qc_excluded": qc_excluded, "qc_reasons": qc_reasons, "cam_annotation": cam_annotation, "mpp": mpp, "failure": failure,
}


def slide_row(slide_id: str, record: dict, prediction: dict) -> dict:
    """The slide's values of every column in ``COLUMNS``, with its id."""
    return {"slide_id": slide_id, **{name: column(record, prediction) for name, column in COLUMNS.items()}}


def is_misclassified(row: dict) -> bool:
    return row.get("prediction") is not None and row.get("label") is not None and row["prediction"] != row["label"]
