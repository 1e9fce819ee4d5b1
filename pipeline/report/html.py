"""``OUT/report.html``: one static page that opens from disk (no server, no network) and stays light at 10,000 slides.

Pictures are linked files, not inlined: plots where the stages wrote them, and per slide small thumbnails in
``OUT/report_files/`` (``thumbs``: made once, remade only when their source changes). Sections (``sections``): run
summary and settings, test metrics with the plots, a capped CAM sheet (most confident slides per class and every
misclassified one), the slide table (sortable, filterable, 50 rows a page, from JSON in the page), the failed slides
with their reasons. A small script counts the images that decoded and writes the count on ``<body>``
(``data-images-loaded`` / ``data-images-total``), so a headless browser test can check the page rendered whole.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

from ..core.artefacts import (CAM_DIR, EXPLAINED_VARIANCE_PNG, MAPS_DIR, METRICS_JSON, MODEL_DIR, MODEL_INFO,
                              MOSAIC_PNG, PLOTS_DIR, REPORT_HTML, RUN_CONFIG_NAME)
from ..core.outputs import Manifest, atomic_write_text
from ..core.store import slide_id_of, slides_dir
from .records import failures_of, read_predictions, slide_row
from .sections import (TABLE_SCRIPT, cam_sheet, esc, failures_table, linked_pictures, metrics_table, model_summary,
                       slide_table)
from .thumbs import make_thumbs

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:1.6em} h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px} h3{font-size:1em}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;font-size:.9em}
th{background:#f4f4f4} .plots img{max-width:420px;margin:4px;border:1px solid #eee}
#slides th[data-key]{cursor:pointer} #slides th.asc::after{content:" \\25B2"} #slides th.desc::after{content:" \\25BC"}
#slides td.pics{white-space:nowrap} #slides td.pics img{max-height:90px;max-width:120px;margin-right:4px;
vertical-align:middle;border:1px solid #eee} .controls{margin:8px 0} #filter{width:320px}
.sheet{display:flex;flex-wrap:wrap;gap:12px} .sheet figure{margin:0;width:260px}
.sheet img{max-width:260px;border:1px solid #eee} .sheet figcaption{font-size:.9em;line-height:1.3}
.ok{color:#1a7f37} .bad{color:#b42318} pre{background:#f7f7f7;padding:8px;overflow:auto;max-height:320px;font-size:.8em}
.muted{color:#777;font-size:.85em}
.warning{color:#a40000;font-weight:600}
"""


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def slide_rows(out_dir: Path, manifest: Manifest) -> list[dict]:
    """One row per slide (the manifest's, and any store the manifest lacks) with its pictures and CAM files."""
    predictions = read_predictions(out_dir)
    # store names, not their attributes: finished stores are the only ``<id>.zarr`` (builds are ``.zarr.partial``)
    ids = sorted(set(manifest.slides) | {slide_id_of(p) for p in slides_dir(out_dir).glob("*.zarr")})
    pictures = make_thumbs(out_dir, ids)
    rows = []
    for slide_id in ids:
        row = slide_row(slide_id, manifest.slides.get(slide_id, {}), predictions.get(slide_id, {}))
        row["pictures"] = pictures.get(slide_id, {})
        rows.append(row)
    return rows


def summary_section(out_dir: Path, manifest: Manifest, failures: list, title: str) -> str:
    slides = manifest.slides
    n_done = sum(1 for r in slides.values() if r.get("status") == "done")
    model_info = _read_json(out_dir / MODEL_DIR / MODEL_INFO)
    parts = [f"<h1>{esc(title)}</h1>",
             f'<p class="muted">{esc(out_dir.resolve())} · written {time.strftime("%Y-%m-%d %H:%M")} · '
             f'zoom into every slide with its overlays: <code>wsi-pipeline view {esc(out_dir)}</code></p>',
             "<h2>Run summary</h2><table>",
             f"<tr><th>slides</th><td>{len(slides)}</td></tr>",
             f'<tr><th>described</th><td class="ok">{n_done}</td></tr>',
             f'<tr><th>failed (any stage)</th><td class="{"bad" if failures else "ok"}">{len(failures)}</td></tr>']
    if model_info:
        parts.append(f"<tr><th>model</th><td>{esc(model_summary(model_info))}</td></tr>")
    parts.append("</table>")
    config_path = out_dir / RUN_CONFIG_NAME
    if config_path.exists():
        parts.append(f"<details><summary>settings (config.yaml)</summary><pre>{esc(config_path.read_text())}</pre>"
                     "</details>")
    return "".join(parts)


def metrics_section(out_dir: Path) -> str:
    plots = [("ROC", f"{PLOTS_DIR}/roc.png"), ("confusion matrix", f"{PLOTS_DIR}/confusion_matrix.png"),
             ("training curves", f"{PLOTS_DIR}/training_curves.png"),
             ("explained variance", f"{MAPS_DIR}/{EXPLAINED_VARIANCE_PNG}")]
    present = [(alt, p) for alt, p in plots if (out_dir / p).exists()]
    return "<h2>Test metrics</h2>" + metrics_table(_read_json(out_dir / METRICS_JSON)) + linked_pictures(present)


def sheet_section(out_dir: Path, rows: list[dict]) -> str:
    if not any("cam" in r["pictures"] for r in rows):
        return ""
    mosaic = (f' The contact sheet of every slide: <a href="{MOSAIC_PNG}">{MOSAIC_PNG}</a>.'
              if (out_dir / MOSAIC_PNG).exists() else "")
    return ("<h2>CAM sheet</h2><p class='muted'>Grad-CAM of the class each slide was predicted as; click a picture "
            f"for the full overlay, filter the table below for the rest.{mosaic}</p>" + cam_sheet(rows))


def build_report(out_dir: str | Path, title: str = "wsi-pipeline report") -> Path:
    """Write ``OUT/report.html`` (and its thumbnails) from whatever the stages have produced so far; its path."""
    out_dir = Path(out_dir)
    manifest = Manifest(out_dir)
    rows = slide_rows(out_dir, manifest)
    failures = [(sid, f) for sid, rec in sorted(manifest.slides.items()) for f in failures_of(rec)]
    parts = [summary_section(out_dir, manifest, failures, title), metrics_section(out_dir),
             sheet_section(out_dir, rows),
             f"<h2>Slides</h2><p class='muted'>{len(rows)} slides; click a column to sort; the CAM and feature-map "
             f"files of each slide are in {CAM_DIR}/ and {MAPS_DIR}/.</p>", slide_table(rows),
             "<h2>Failed slides</h2>", failures_table(failures)]
    ignored = manifest.data.get("ignored") or []
    if ignored:
        parts.append("<details><summary>files ignored in the slide directory</summary><ul>"
                     + "".join(f"<li>{esc(i['path'])}: {esc(i['reason'])}</li>" for i in ignored)
                     + "</ul></details>")
    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
            f"<body>{''.join(parts)}<script>{TABLE_SCRIPT}</script></body></html>")
    path = out_dir / REPORT_HTML
    atomic_write_text(path, page)
    return path
