"""The HTML report: pictures linked as cached files, a capped CAM sheet, and a slide table that sorts, filters and
pages in a real (headless) browser."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from pipeline.cam.heatmaps import save_overlay_png
from pipeline.core.outputs import atomic_write_json
from pipeline.core.parallel import LocalRunner
from pipeline.core.store import read_array, read_attrs, store_path
from pipeline.describe.runner import describe_slides
from pipeline.reduce.runner import reduce_slides
from pipeline.report.html import build_report
from pipeline.report.sections import PAGE_ROWS
from pipeline.slides.tiling import TileGrid

from .browser import browser  # noqa: F401  (module-scoped Chromium fixture)
from .fake_run import write_fake_run


@pytest.fixture(scope="module")
def report_out(small_slides, small_config, tmp_path_factory, fixtures_dir):
    """A real describe + reduce of two generated slides (plus an unopenable file), CAM overlays as the cam stage
    writes them, metrics and one prediction."""
    out = tmp_path_factory.mktemp("report")
    describe_slides([small_slides, fixtures_dir / "unopenable.tiff"], out, small_config, runner=LocalRunner(),
                    progress=False)
    reduce_slides(out, small_config, runner=LocalRunner(), progress=False)
    for slide_id in ("slide-a", "slide-b"):
        store = store_path(out, slide_id)
        attrs = read_attrs(store)
        grid = TileGrid.from_dict(attrs["tile_grid"])
        cam = np.where(read_array(store, "tissue_mask"), np.linspace(0, 1, grid.rows * grid.cols).reshape(grid.shape),
                       np.nan)
        save_overlay_png(out / "cam" / f"{slide_id}.png", read_array(store, "thumbnail"), cam, grid,
                         attrs["mask_downsample"], f"{slide_id}: true 1 / predicted 1")
    atomic_write_json(out / "metrics.json", {"accuracy": 0.875, "roc_auc": 0.9375, "n_slides": 8})
    (out / "predictions.csv").write_text("slide_id,true_label,predicted_label,prob_0,prob_1\n"
                                         "slide-b,1,1,0.1,0.9\n")
    return out, build_report(out)


def slide_data(page: str) -> list[dict]:
    return json.loads(re.search(r'<script type="application/json" id="slide-data">(.*?)</script>', page,
                                re.S).group(1))


def test_report_links_its_pictures_as_files(report_out):
    out, path = report_out
    page = path.read_text()
    assert path == out / "report.html"
    assert "<h2>Test metrics</h2>" in page and "0.938" in page  # roc_auc, 3 decimals
    assert "data:image" not in page and "base64" not in page  # nothing inlined
    assert "unsupported_format" in page and "unopenable" in page  # the failed slide and its reason
    rows = {r["slide_id"]: r for r in slide_data(page)}
    assert set(rows) == {"slide-a", "slide-b", "unopenable"}
    assert rows["slide-b"]["prediction"] == "1" and rows["slide-b"]["probability"] == 0.9
    assert rows["unopenable"]["status"] == "failed" and rows["unopenable"]["pictures"] == {}
    assert set(rows["slide-a"]["pictures"]) == {"slide", "map", "cam"}
    linked = re.findall(r'<img src="([^"]+)"', page) + [p for r in rows.values() for p in r["pictures"].values()]
    assert any(p.startswith("plots/") or p.startswith("maps/") for p in linked)
    for rel in linked:  # every linked picture is a real image file inside OUT; the per-slide ones are small
        with Image.open(out / rel) as img:
            assert img.size[0] > 10 and (max(img.size) <= 320 or not rel.startswith("report_files/")), rel
    with Image.open(out / rows["slide-a"]["pictures"]["slide"]) as img:  # the store's thumbnail, shrunk
        thumb = read_array(store_path(out, "slide-a"), "thumbnail")
        assert img.format == "JPEG" and abs(img.size[0] / img.size[1] - thumb.shape[1] / thumb.shape[0]) < 0.05
    assert "http://" not in page and "https://" not in page  # opens from disk, no network


@pytest.fixture(scope="module")
def big_report(tmp_path_factory):
    return build_report(write_fake_run(tmp_path_factory.mktemp("big") / "run", 110, cam_px=(240, 180)))


def test_report_stays_small_per_slide(big_report):
    page = big_report.read_text()
    assert len(page.encode()) / 110 < 2_000  # the bound is 20 KB per slide
    assert len(slide_data(page)) == 110
    n_wrong = sum(1 for r in slide_data(page) if r["prediction"] not in (None, r["label"]))
    assert n_wrong > 0 and f"misclassified slides ({n_wrong})" in page


def _table(page) -> list[list[str]]:
    return page.eval_on_selector_all("#slides tbody tr", "rows => rows.map(r => "
                                     "Array.from(r.cells).slice(1).map(c => c.textContent))")


def test_report_table_sorts_filters_and_pages_in_chromium(browser, big_report):  # noqa: F811
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(big_report.as_uri())
    header = page.eval_on_selector_all("#slides th[data-key]", "hs => hs.map(h => h.dataset.key)")
    prob_col = header.index("probability")
    rows = _table(page)
    assert len(rows) == PAGE_ROWS and rows[0][0] == "s00000"
    assert "page 1 of 3" in page.inner_text("#page")
    page.click("#next")
    assert _table(page)[0][0] == f"s{PAGE_ROWS:05d}"
    page.click("#slides th[data-key=probability]")
    page.click("#slides th[data-key=probability]")  # descending
    probs = [float(r[prob_col]) for r in _table(page) if r[prob_col]]
    assert len(probs) == PAGE_ROWS and probs == sorted(probs, reverse=True) and probs[0] > 0.9
    page.select_option("#status-filter", "failed")
    failed = _table(page)
    assert len(failed) == 6 and all(r[header.index("status")] == "failed" for r in failed)
    page.select_option("#status-filter", "")
    page.fill("#filter", "s0001")
    assert sorted(r[0] for r in _table(page)) == [f"s{i:05d}" for i in range(10, 20)]
    page.fill("#filter", "")
    page.select_option("#status-filter", "misclassified")
    assert all(r[header.index("prediction")] != r[header.index("label")] for r in _table(page))
    page.wait_for_function("document.body.dataset.imagesLoaded === document.body.dataset.imagesTotal")
    assert int(page.get_attribute("body", "data-images-total")) > 10
    page.close()


def test_report_renders_whole_in_chromium(browser, report_out):  # noqa: F811
    _, path = report_out
    page = browser.new_page(viewport={"width": 1280, "height": 1600})
    page.goto(path.as_uri())
    page.wait_for_function("document.body.dataset.imagesTotal && "
                           "document.body.dataset.imagesLoaded === document.body.dataset.imagesTotal")
    assert int(page.get_attribute("body", "data-images-total")) >= 8  # plots, sheet, 3 pictures x 2 slides
    pixels = np.asarray(Image.open(__import__("io").BytesIO(page.screenshot(full_page=True))).convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200  # text, plots and images, not a blank page
    page.close()
