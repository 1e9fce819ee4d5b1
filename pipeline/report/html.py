"""``OUT/report.html``: one self-contained static page (images inlined as data URIs, opens from disk, no server).

Sections: run summary and settings, test metrics with ROC / confusion-matrix / training-curve plots, a gallery with
one card per slide (thumbnail, feature map, CAM overlay, true and predicted label), and the failed slides with their
reasons. A small inline script counts the images that decoded and writes the count on ``<body>``
(``data-images-loaded`` / ``data-images-total``), so a headless browser test can check the page rendered whole.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.artefacts import (CAM_DIR, EXPLAINED_VARIANCE_PNG, MAPS_DIR, METRICS_JSON, MODEL_DIR, MODEL_INFO,
                              MOSAIC_PNG, PLOTS_DIR, PREDICTIONS_CSV, REPORT_HTML, RUN_CONFIG_NAME)
from ..core.outputs import Manifest, atomic_write_text
from ..core.store import list_stores, read_array, slide_id_of

GALLERY_THUMB_PX = 260

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:1.6em} h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;font-size:.9em}
th{background:#f4f4f4} .plots img{max-width:420px;margin:4px;border:1px solid #eee}
.gallery{display:flex;flex-wrap:wrap;gap:12px} .card{border:1px solid #ddd;border-radius:6px;padding:8px;width:820px}
.card .imgs{display:flex;gap:6px;align-items:flex-start} .card img{max-width:260px;max-height:260px;border:1px solid #eee}
.ok{color:#1a7f37} .bad{color:#b42318} pre{background:#f7f7f7;padding:8px;overflow:auto;max-height:320px;font-size:.8em}
.muted{color:#777;font-size:.85em}
.warning{color:#a40000;font-weight:600}
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-total', String(imgs.length));
  document.body.setAttribute('data-images-loaded', String(ok));
});
"""


def data_uri_png(image: np.ndarray | Image.Image | None = None, path: str | Path | None = None,
                 max_px: int | None = None) -> str | None:
    """A PNG data URI from an array, a PIL image or a PNG file (shrunk to ``max_px`` when given)."""
    if path is not None:
        path = Path(path)
        if not path.exists():
            return None
        if max_px is None:
            return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        image = Image.open(path)
    if image is None:
        return None
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    img = img.convert("RGB")
    if max_px:
        img.thumbnail((max_px, max_px))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(uri: str | None, alt: str) -> str:
    if not uri:
        return f'<span class="muted">no {html.escape(alt)}</span>'
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def _read_csv_by_id(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    with open(path, newline="", encoding="utf-8") as fh:
        return {row["slide_id"]: row for row in csv.DictReader(fh)}


def _metrics_table(metrics: dict) -> str:
    """Network metrics, with the map-statistics baseline beside them and a warning when the network is below it."""
    keys = ["accuracy", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro", "roc_auc", "mae",
            "quadratic_weighted_kappa"]
    baseline = metrics.get("baseline") or {}
    cell = lambda v: f"<td>{v:.3f}</td>" if isinstance(v, (int, float)) else "<td>–</td>"  # noqa: E731
    rows = []
    for key in keys:
        value = metrics.get(key)
        if isinstance(value, (int, float)):
            rows.append(f"<tr><th>{key}</th>{cell(value)}{cell(baseline.get(key)) if baseline else ''}</tr>")
    n = metrics.get("n") or metrics.get("n_slides")
    if n is not None:
        rows.append(f"<tr><th>test slides</th><td>{n}</td>{'<td></td>' if baseline else ''}</tr>")
    if not rows:
        return '<p class="muted">no metrics yet</p>'
    head = "<tr><th></th><th>network</th><th>baseline</th></tr>" if baseline else ""
    table = "<table>" + head + "".join(rows) + "</table>"
    versus = metrics.get("network_vs_baseline") or {}
    if versus.get("network_below_baseline"):
        table += (f'<p class="warning">The network ({versus["metric"]} {versus["network"]:.3f}) does worse than '
                  f'the map-statistics baseline ({versus["baseline"]:.3f}): per-slide percentiles of the maps and a '
                  'logistic regression already do better on the same slides.</p>')
    elif versus.get("metric"):
        table += (f'<p class="muted">Baseline: per-slide percentiles and histograms of each map component, logistic '
                  f'regression, same training and test slides ({versus["metric"]} margin '
                  f'{versus["margin"]:+.3f}).</p>')
    return table


def _model_summary(model_info: dict) -> str:
    """One line on the model: weights, head block, backend, classes (from ``model_info.json``)."""
    train = (model_info.get("config") or {}).get("train") or {}
    classes = ", ".join(map(str, (model_info.get("labels") or {}).get("values", [])))
    return (f"InceptionV3, weights {train.get('weights') or 'random init'}, recipe {train.get('recipe', 'finetune')}"
            f", head on {train.get('head_block', 'mixed10')}"
            f", {(model_info.get('versions') or {}).get('backend', '?')} backend · classes {classes}")


def _failures(manifest: Manifest) -> list[tuple[str, str, str, str]]:
    out = []
    for slide_id, rec in sorted(manifest.slides.items()):
        if rec.get("status") == "failed":
            err = rec.get("error") or {}
            out.append((slide_id, "describe", err.get("code", ""), err.get("message", "")))
        for stage, srec in sorted((rec.get("stages") or {}).items()):
            if srec.get("status") == "failed":
                err = srec.get("error") or {}
                out.append((slide_id, stage, err.get("code", ""), err.get("message", "")))
    return out


def build_report(out_dir: str | Path, title: str = "wsi-pipeline report") -> Path:
    """Write ``OUT/report.html`` from whatever the stages have produced so far; returns its path."""
    out_dir = Path(out_dir)
    manifest = Manifest(out_dir)
    metrics_path = out_dir / METRICS_JSON
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    predictions = _read_csv_by_id(out_dir / PREDICTIONS_CSV)
    config_text = (out_dir / RUN_CONFIG_NAME).read_text() if (out_dir / RUN_CONFIG_NAME).exists() else ""
    model_info_path = out_dir / MODEL_DIR / MODEL_INFO
    model_info = json.loads(model_info_path.read_text()) if model_info_path.exists() else {}

    slides = manifest.slides
    n_done = sum(1 for r in slides.values() if r.get("status") == "done")
    failures = _failures(manifest)
    parts = [f"<h1>{html.escape(title)}</h1>",
             f'<p class="muted">{html.escape(str(out_dir.resolve()))} · written {time.strftime("%Y-%m-%d %H:%M")}</p>',
             "<h2>Run summary</h2><table>",
             f"<tr><th>slides</th><td>{len(slides)}</td></tr>",
             f'<tr><th>described</th><td class="ok">{n_done}</td></tr>',
             f'<tr><th>failed (any stage)</th><td class="{"bad" if failures else "ok"}">{len(failures)}</td></tr>']
    if model_info:
        parts.append(f"<tr><th>model</th><td>{html.escape(_model_summary(model_info))}</td></tr>")
    parts.append("</table>")
    if config_text:
        parts.append(f"<details><summary>settings (config.yaml)</summary><pre>{html.escape(config_text)}</pre></details>")

    parts.append("<h2>Test metrics</h2>")
    parts.append(_metrics_table(metrics))
    plots = [("ROC", out_dir / PLOTS_DIR / "roc.png"),
             ("confusion matrix", out_dir / PLOTS_DIR / "confusion_matrix.png"),
             ("training curves", out_dir / PLOTS_DIR / "training_curves.png"),
             ("explained variance", out_dir / MAPS_DIR / EXPLAINED_VARIANCE_PNG)]
    parts.append('<div class="plots">' + "".join(_img(data_uri_png(path=p), alt) for alt, p in plots if p.exists())
                 + "</div>")
    if (out_dir / MOSAIC_PNG).exists():
        parts.append("<h2>Cohort CAM mosaic</h2><p class='muted'>sorted by predicted probability</p>")
        parts.append(_img(data_uri_png(path=out_dir / MOSAIC_PNG, max_px=1400), "CAM mosaic"))

    parts.append("<h2>Slides</h2><div class='gallery'>")
    for store in list_stores(out_dir):
        slide_id = slide_id_of(store)
        rec = slides.get(slide_id, {})
        pred = predictions.get(slide_id, {})
        cam_stage = (rec.get("stages") or {}).get("cam", {})
        label_line = []
        if pred:
            label_line.append(f"true <b>{html.escape(pred.get('true_label', '?'))}</b>")
            label_line.append(f"predicted <b>{html.escape(pred.get('predicted_label', '?'))}</b>")
        elif cam_stage.get("status") == "done":
            label_line.append("not in the test split")
        thumb = data_uri_png(read_array(store, "thumbnail"), max_px=GALLERY_THUMB_PX)
        fmap = data_uri_png(path=out_dir / MAPS_DIR / f"{slide_id}.png", max_px=GALLERY_THUMB_PX)
        cam = data_uri_png(path=out_dir / CAM_DIR / f"{slide_id}.png", max_px=GALLERY_THUMB_PX)
        links = " · ".join(f'<a href="{CAM_DIR}/{html.escape(slide_id)}.{ext}">{ext}</a>'
                           for ext in ("tiff", "geojson") if (out_dir / CAM_DIR / f"{slide_id}.{ext}").exists())
        parts.append(
            f"<div class='card'><b>{html.escape(slide_id)}</b> · {rec.get('tiles', '?')} tiles at "
            f"{rec.get('mpp', '?')} µm/px ({html.escape(str(rec.get('mpp_source', '')))}) · {' · '.join(label_line)}"
            f"<div class='imgs'>{_img(thumb, 'thumbnail')}{_img(fmap, 'feature map')}{_img(cam, 'CAM')}</div>"
            f"<span class='muted'>{links}</span></div>")
    parts.append("</div>")

    parts.append("<h2>Failed slides</h2>")
    if failures:
        parts.append("<table><tr><th>slide</th><th>stage</th><th>code</th><th>reason and fix</th></tr>")
        parts.extend(f"<tr><td>{html.escape(s)}</td><td>{html.escape(st)}</td><td>{html.escape(c)}</td>"
                     f"<td>{html.escape(m)}</td></tr>" for s, st, c, m in failures)
        parts.append("</table>")
    else:
        parts.append('<p class="ok">none</p>')
    ignored = manifest.data.get("ignored") or []
    if ignored:
        parts.append("<details><summary>files ignored in the slide directory</summary><ul>"
                     + "".join(f"<li>{html.escape(i['path'])}: {html.escape(i['reason'])}</li>" for i in ignored)
                     + "</ul></details>")

    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style><script>{_SCRIPT}</script></head>"
            f"<body>{''.join(parts)}</body></html>")
    path = out_dir / REPORT_HTML
    atomic_write_text(path, page)
    return path
