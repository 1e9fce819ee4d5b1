"""The HTML report: pictures linked as cached files, a capped CAM sheet, and a slide table that sorts, filters and
pages in a real (headless) browser."""

import json
import os
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
from pipeline.report.sections import PAGE_ROWS, model_summary, sheet_selection
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


def test_thumbnails_are_made_once_and_remade_when_their_source_changes(tmp_path):
    out = write_fake_run(tmp_path / "run", 6, cam_px=(240, 180))
    build_report(out)
    cam_thumb = out / "report_files" / "s00000.cam.jpg"
    slide_thumb = out / "report_files" / "s00000.slide.jpg"
    before = {p: p.stat().st_mtime_ns for p in (cam_thumb, slide_thumb)}
    os.utime(cam_thumb, ns=(before[cam_thumb] + 10**9,) * 2)  # newer than its source: kept as it is
    kept = cam_thumb.stat().st_mtime_ns
    build_report(out)
    assert cam_thumb.stat().st_mtime_ns == kept and slide_thumb.stat().st_mtime_ns == before[slide_thumb]
    source = out / "cam" / "s00000.png"
    Image.new("RGB", (100, 50), (0, 0, 255)).save(source)  # smaller than the thumbnail size: kept as it is
    os.utime(source, ns=(kept + 10**9,) * 2)
    build_report(out)
    with Image.open(cam_thumb) as img:  # remade from the new picture
        assert img.size == (100, 50) and np.asarray(img.convert("RGB"))[25, 50, 2] > 200


def test_sheet_holds_the_most_confident_per_class_and_every_misclassified_slide():
    pics = {"cam": "x"}
    rows = [{"slide_id": f"c{i}", "label": "0", "prediction": "0", "probability": p, "pictures": pics}
            for i, p in enumerate([0.6, 0.99, 0.7, 0.95, 0.8, 0.97])]
    rows += [{"slide_id": "w1", "label": "1", "prediction": "0", "probability": 0.51, "pictures": pics},
             {"slide_id": "w2", "label": "0", "prediction": "1", "probability": 0.9, "pictures": pics},
             {"slide_id": "p1", "label": "1", "prediction": "1", "probability": 0.8, "pictures": pics},
             {"slide_id": "nocam", "label": "1", "prediction": "0", "probability": 0.9, "pictures": {}},
             {"slide_id": "train", "label": "1", "prediction": None, "probability": None, "pictures": pics}]
    groups = {heading: [r["slide_id"] for r in group] for heading, group in sheet_selection(rows, per_class=3)}
    assert groups == {"most confident correct predictions of class 0": ["c1", "c5", "c3"],
                      "most confident correct predictions of class 1": ["p1"],
                      "misclassified slides (2)": ["w2", "w1"]}


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


def test_model_summary_names_weights_head_backend_and_classes():
    info = {"config": {"train": {"weights": None, "recipe": "scratch", "head_block": "mixed2"}},
            "versions": {"backend": "jax"}, "labels": {"values": [0, 1]}}
    assert model_summary(info) == ("InceptionV3, weights random init, recipe scratch, head on mixed2, jax backend"
                                   " · classes 0, 1")
    info["config"]["train"].update(weights="imagenet", recipe="finetune")
    assert model_summary(info).startswith("InceptionV3, weights imagenet, recipe finetune, head on mixed2")
