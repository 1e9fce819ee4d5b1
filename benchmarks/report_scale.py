"""The report at cohort scale: time to write ``report.html`` for a generated run of N slides, its size per slide,
and its first paint in headless Chromium.

The run is written directly (``tests/report/fake_run.py``: manifest, a small store per slide with a thumbnail and a
tissue mask, map and CAM pictures, predictions for half the slides, metrics and plots; one slide in 17 failed),
cached in ``--work-dir`` (default ``/tmp/wsi-bench-report``). Then:

* ``cold_seconds``: ``build_report`` with no thumbnails yet (``OUT/report_files/`` removed first): every slide's
  three pictures are made;
* ``warm_seconds``: ``build_report`` again (thumbnails current, nothing is remade): what a rerun costs;
* ``html_bytes`` and ``html_bytes_per_slide``; ``report_files_mb`` (the linked thumbnails);
* ``first_contentful_paint_ms``: Chromium's ``first-contentful-paint`` of the page opened from disk (Playwright
  driving ``/usr/bin/chromium``), median of ``--paints`` fresh pages, plus ``table_ready_ms`` (the first page of the
  slide table rendered, from navigation start).

Targets (issue 16), for >= 1,000 slides on 2 cores: report written in <= 60 s, HTML <= 20 KB per slide, first paint
<= 2 s. ``ok`` is true when all three are met.

    python benchmarks/report_scale.py                  # 1,000 slides
    python benchmarks/report_scale.py --slides 10000   # a TCGA-sized cohort: ten copies of the 1,000-slide run

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import cpu_model  # noqa: E402

from pipeline.report.html import build_report  # noqa: E402
from pipeline.report.thumbs import REPORT_FILES_DIR  # noqa: E402
from tests.report.browser import CHROMIUM_ARGS, find_chromium  # noqa: E402
from tests.report.fake_run import write_fake_run  # noqa: E402


def replicate_run(src: Path, out: Path, copies: int) -> None:
    """``copies`` copies of every slide of the run ``src`` (store, pictures, manifest record, prediction) under new
    ids ``c<k>-<id>``: a large cohort at file-copy speed."""
    import csv

    from pipeline.core.outputs import atomic_write_json

    manifest = json.loads((src / "manifest.json").read_text())
    with open(src / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    slides, predictions = {}, []
    for k in range(copies):
        for sid, record in manifest["slides"].items():
            new = f"c{k}-{sid}"
            slides[new] = record
            if (src / "slides" / f"{sid}.zarr").is_dir():
                shutil.copytree(src / "slides" / f"{sid}.zarr", out / "slides" / f"{new}.zarr")
            for folder in ("maps", "cam"):
                if (src / folder / f"{sid}.png").exists():
                    (out / folder).mkdir(parents=True, exist_ok=True)
                    shutil.copy(src / folder / f"{sid}.png", out / folder / f"{new}.png")
        predictions += [{**row, "slide_id": f"c{k}-{row['slide_id']}"} for row in rows]
    atomic_write_json(out / "manifest.json", {"slides": slides, "ignored": [], "runs": []})
    with open(out / "predictions.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(predictions)
    for name in ("metrics.json", "config.yaml", "plots"):
        (shutil.copytree if (src / name).is_dir() else shutil.copy)(src / name, out / name)


def cached_run(work_dir: Path, n_slides: int) -> tuple[Path, float | None]:
    """The generated run of ``n_slides`` (made once per size; above 1,000 slides, copies of the 1,000-slide run);
    (its path, seconds to make it or None if cached)."""
    out = work_dir / f"run-{n_slides}"
    if (out / ".complete").exists():
        return out, None
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    if n_slides > 1000 and n_slides % 1000 == 0:
        base, _ = cached_run(work_dir, 1000)
        replicate_run(base, out, n_slides // 1000)
    else:
        write_fake_run(out, n_slides)
    (out / ".complete").touch()
    return out, time.perf_counter() - start


def paint_times(report: Path, repeats: int) -> dict:
    from playwright.sync_api import sync_playwright

    chromium = find_chromium()
    if chromium is None:
        return {"error": "no chromium"}
    fcp, ready = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        for _ in range(repeats):
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(report.as_uri(), wait_until="load")
            page.wait_for_function("document.querySelectorAll('#slides tbody tr').length > 0")
            fcp.append(page.evaluate("performance.getEntriesByName('first-contentful-paint')[0].startTime"))
            ready.append(page.evaluate("performance.now()"))
            page.close()
        browser.close()
    return {"first_contentful_paint_ms": round(statistics.median(fcp), 1),
            "first_contentful_paint_runs_ms": [round(v, 1) for v in fcp],
            "table_ready_ms": round(statistics.median(ready), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=1000)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/wsi-bench-report"))
    parser.add_argument("--paints", type=int, default=3, help="fresh pages whose first paint is measured")
    args = parser.parse_args()

    out, generate_seconds = cached_run(args.work_dir, args.slides)
    shutil.rmtree(out / REPORT_FILES_DIR, ignore_errors=True)
    start = time.perf_counter()
    report = build_report(out)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    build_report(out)
    warm = time.perf_counter() - start
    html_bytes = report.stat().st_size
    files = list((out / REPORT_FILES_DIR).iterdir())
    paints = paint_times(report, args.paints)
    result = {
        "slides": args.slides, "generate_seconds": None if generate_seconds is None else round(generate_seconds, 1),
        "cold_seconds": round(cold, 2), "warm_seconds": round(warm, 2),
        "html_bytes": html_bytes, "html_bytes_per_slide": round(html_bytes / args.slides, 1),
        "report_files": len(files), "report_files_mb": round(sum(f.stat().st_size for f in files) / 2**20, 1),
        **paints,
        "targets": {"seconds": 60, "html_bytes_per_slide": 20_000, "first_contentful_paint_ms": 2000},
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average": [round(v, 2) for v in os.getloadavg()]},
    }
    result["ok"] = bool(args.slides >= 1000 and cold <= 60 and html_bytes / args.slides <= 20_000
                        and paints.get("first_contentful_paint_ms", 1e9) <= 2000)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
