"""The report's sections, one function each, every one returning an HTML fragment (all text escaped).

``slide_table``: the slides as JSON in the page plus a small script that sorts, filters and pages them (50 rows a
page, so the page stays light at 10,000 slides and only the shown rows' thumbnails load). ``cam_sheet``: a capped
sheet of CAMs, the most confident slides of each predicted class and every misclassified slide, with captions in
HTML text (readable at any size).
"""

from __future__ import annotations

import html
import json

from .records import COLUMNS, is_misclassified

SHEET_PER_CLASS = 4
PAGE_ROWS = 50


def esc(value) -> str:
    return html.escape("" if value is None else str(value))


def metrics_table(metrics: dict) -> str:
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
        rows.append(f"<tr><th>test slides</th><td>{esc(n)}</td>{'<td></td>' if baseline else ''}</tr>")
    if not rows:
        return '<p class="muted">no metrics yet</p>'
    head = "<tr><th></th><th>network</th><th>baseline</th></tr>" if baseline else ""
    table = "<table>" + head + "".join(rows) + "</table>"
    versus = metrics.get("network_vs_baseline") or {}
    if versus.get("network_below_baseline"):
        table += (f'<p class="warning">The network ({esc(versus["metric"])} {versus["network"]:.3f}) does worse than '
                  f'the map-statistics baseline ({versus["baseline"]:.3f}): per-slide percentiles of the maps and a '
                  'logistic regression already do better on the same slides.</p>')
    elif versus.get("metric"):
        table += (f'<p class="muted">Baseline: per-slide percentiles and histograms of each map component, logistic '
                  f'regression, same training and test slides ({esc(versus["metric"])} margin '
                  f'{versus["margin"]:+.3f}).</p>')
    agreement = (metrics.get("cam_annotations") or {}).get("overall") or {}
    if agreement.get("slides"):
        table += (f'<p>CAM against the annotations of the class it explains ({agreement["slides"]} annotated slides): '
                  f'pointing game {agreement["pointing_game"]:.2f}, IoU of the top-decile CAM '
                  f'{agreement["iou_top_decile_mean"]:.2f} (per slide: the table\'s cam_annotation column).</p>')
    return table


def model_summary(model_info: dict) -> str:
    """One line on the model: weights, head block, backend, classes (from ``model_info.json``)."""
    train = (model_info.get("config") or {}).get("train") or {}
    classes = ", ".join(map(str, (model_info.get("labels") or {}).get("values", [])))
    return (f"InceptionV3, weights {train.get('weights') or 'random init'}, recipe {train.get('recipe', 'finetune')}"
            f", head on {train.get('head_block', 'mixed10')}"
            f", {(model_info.get('versions') or {}).get('backend', '?')} backend · classes {classes}")


def linked_pictures(pictures: list[tuple[str, str]]) -> str:
    """Plots as linked files (relative paths from ``OUT/``), each opening full size."""
    return '<div class="plots">' + "".join(f'<a href="{esc(p)}"><img src="{esc(p)}" alt="{esc(alt)}"></a>'
                                            for alt, p in pictures) + "</div>"


def sheet_selection(rows: list[dict], per_class: int = SHEET_PER_CLASS) -> list[tuple[str, list[dict]]]:
    """(heading, rows) groups of the CAM sheet: per predicted class its ``per_class`` most confident correct slides,
    then every misclassified slide (most confident first). Only slides with a prediction and a CAM picture."""
    shown = [r for r in rows if r.get("prediction") is not None and r.get("probability") is not None
             and "cam" in (r.get("pictures") or {})]
    by_confidence = sorted(shown, key=lambda r: (-r["probability"], r["slide_id"]))
    groups = []
    for cls in sorted({r["prediction"] for r in shown}, key=lambda c: (len(c), c)):
        best = [r for r in by_confidence if r["prediction"] == cls and not is_misclassified(r)][:per_class]
        if best:
            groups.append((f"most confident correct predictions of class {cls}", best))
    wrong = [r for r in by_confidence if is_misclassified(r)]
    groups.append((f"misclassified slides ({len(wrong)})", wrong))
    return groups


def cam_sheet(rows: list[dict], per_class: int = SHEET_PER_CLASS) -> str:
    parts = []
    for heading, group in sheet_selection(rows, per_class):
        parts.append(f"<h3>{esc(heading)}</h3>")
        if not group:
            parts.append('<p class="muted">none</p>')
            continue
        parts.append('<div class="sheet">')
        for r in group:
            cam_png = f"cam/{r['slide_id']}.png"
            parts.append(f'<figure><a href="{esc(cam_png)}"><img src="{esc(r["pictures"]["cam"])}" '
                         f'alt="CAM of {esc(r["slide_id"])}"></a><figcaption><b>{esc(r["slide_id"])}</b><br>true '
                         f'{esc(r["label"])} · predicted {esc(r["prediction"])} ({r["probability"]:.3f})'
                         "</figcaption></figure>")
        parts.append("</div>")
    return "".join(parts)


def failures_table(failures: list[tuple[str, dict]]) -> str:
    if not failures:
        return '<p class="ok">none</p>'
    rows = "".join(f"<tr><td>{esc(sid)}</td><td>{esc(f['stage'])}</td><td>{esc(f['code'])}</td>"
                   f"<td>{esc(f['message'])}</td></tr>" for sid, f in failures)
    return f"<table><tr><th>slide</th><th>stage</th><th>code</th><th>reason and fix</th></tr>{rows}</table>"


def slide_table(rows: list[dict]) -> str:
    """The slide table: controls, an empty table the script fills, and the rows as JSON."""
    head = "".join(f'<th data-key="{k}">{k}</th>' for k in ("slide_id", *COLUMNS))
    data = json.dumps(rows, separators=(",", ":"), default=str).replace("</", "<\\/")
    return ('<div class="controls"><input id="filter" type="search" placeholder="filter: id, label, prediction, '
            'status, failure" aria-label="filter slides"> <select id="status-filter" aria-label="status">'
            '<option value="">all slides</option><option value="done">done</option><option value="failed">failed'
            '</option><option value="misclassified">misclassified</option><option value="test">test split</option>'
            '</select> <button id="prev">&larr; previous</button> <span id="page"></span> '
            '<button id="next">next &rarr;</button></div>'
            f'<table id="slides"><thead><tr><th>pictures</th>{head}</tr></thead><tbody></tbody></table>'
            f'<script type="application/json" id="slide-data">{data}</script>')


TABLE_SCRIPT = """
(function () {
  var rows = JSON.parse(document.getElementById('slide-data').textContent);
  var sortKey = 'slide_id', sortDir = 1, page = 0, PAGE = %(page_rows)d;
  function wrong(r) { return r.prediction !== null && r.label !== null && r.prediction !== r.label; }
  function cmp(a, b) {
    var x = a[sortKey], y = b[sortKey];
    if (x === null || x === undefined) return 1;
    if (y === null || y === undefined) return -1;
    if (typeof x === 'number' && typeof y === 'number') return (x - y) * sortDir;
    return String(x).localeCompare(String(y), undefined, {numeric: true}) * sortDir;
  }
  function cell(tr, text, cls) {
    var td = document.createElement('td'); td.textContent = text === null || text === undefined ? '' : text;
    if (cls) td.className = cls; tr.appendChild(td); return td;
  }
  function countImages() {
    var imgs = Array.prototype.slice.call(document.images), pending = imgs.filter(function (i) { return !i.complete; });
    document.body.setAttribute('data-images-total', String(imgs.length));
    document.body.setAttribute('data-images-loaded',
      String(imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length));
    pending.forEach(function (i) { i.addEventListener('load', countImages, {once: true});
                                   i.addEventListener('error', countImages, {once: true}); });
  }
  function render() {
    var text = document.getElementById('filter').value.trim().toLowerCase();
    var status = document.getElementById('status-filter').value;
    var shown = rows.filter(function (r) {
      if (status === 'misclassified' ? !wrong(r) : status === 'test' ? r.split !== 'test' : (status && r.status !== status)) return false;
      return !text || ['slide_id', 'status', 'label', 'prediction', 'failure'].some(function (k) {
        return r[k] !== null && r[k] !== undefined && String(r[k]).toLowerCase().indexOf(text) >= 0; });
    }).sort(cmp);
    var pages = Math.max(1, Math.ceil(shown.length / PAGE));
    page = Math.min(page, pages - 1);
    var body = document.querySelector('#slides tbody'); body.textContent = '';
    shown.slice(page * PAGE, (page + 1) * PAGE).forEach(function (r) {
      var tr = document.createElement('tr'); tr.dataset.slide = r.slide_id;
      var pics = cell(tr, ''); pics.className = 'pics';
      ['slide', 'map', 'cam'].forEach(function (k) {
        if (!r.pictures[k]) return;
        var a = document.createElement('a'); a.href = k === 'cam' ? 'cam/' + r.slide_id + '.png' : r.pictures[k];
        var img = document.createElement('img'); img.src = r.pictures[k]; img.alt = k + ' of ' + r.slide_id;
        a.appendChild(img); pics.appendChild(a);
      });
      cell(tr, r.slide_id);
      %(columns)s.forEach(function (k) {
        var v = r[k];
        cell(tr, k === 'probability' && v !== null ? v.toFixed(3) : v,
             k === 'status' && v === 'failed' ? 'bad' : k === 'prediction' && wrong(r) ? 'bad' : '');
      });
      body.appendChild(tr);
    });
    document.getElementById('page').textContent = 'page ' + (page + 1) + ' of ' + pages + ' · ' + shown.length +
      ' of ' + rows.length + ' slides';
    document.querySelectorAll('#slides th[data-key]').forEach(function (th) {
      th.className = th.dataset.key === sortKey ? (sortDir > 0 ? 'asc' : 'desc') : ''; });
    countImages();
  }
  document.querySelectorAll('#slides th[data-key]').forEach(function (th) {
    th.addEventListener('click', function () {
      sortDir = sortKey === th.dataset.key ? -sortDir : 1; sortKey = th.dataset.key; page = 0; render(); });
  });
  document.getElementById('filter').addEventListener('input', function () { page = 0; render(); });
  document.getElementById('status-filter').addEventListener('change', function () { page = 0; render(); });
  document.getElementById('prev').addEventListener('click', function () { page = Math.max(0, page - 1); render(); });
  document.getElementById('next').addEventListener('click', function () { page += 1; render(); });
  render();
  window.addEventListener('load', countImages);
})();
""" % {"page_rows": PAGE_ROWS, "columns": json.dumps(list(COLUMNS))}
