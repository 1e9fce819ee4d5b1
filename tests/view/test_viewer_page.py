"""The viewer's page (static/viewer.js with the bundled OpenSeadragon) in headless Chromium: the slide list sorts and
filters, a slide opens and loads tiles at several zoom levels, the CAM overlay toggles and fades, and a screenshot
shows it on the lesion (its known position in level-0 pixels)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.cam.heatmaps import CMAP_NAME
from pipeline.core.pictures import colormap_lut
from pipeline.view.server import ViewerServer

from ..report.browser import browser  # noqa: F401  (module-scoped Chromium fixture)

LOADED = ("window.wsiViewer && window.viewerState.overlay && window.wsiViewer.world.getItemCount() === 2 && "
          "window.wsiViewer.world.getItemAt(0).getFullyLoaded() && window.viewerState.overlay.getFullyLoaded()")


@pytest.fixture(scope="module")
def page(view_run, browser):  # noqa: F811
    srv = ViewerServer(view_run["out"], port=0).start()
    tab = browser.new_page(viewport={"width": 1200, "height": 800})
    errors = []
    tab.on("pageerror", lambda err: errors.append(str(err)))
    tab.goto(srv.url)
    tab.wait_for_function("document.body.dataset.ready === '1'")
    yield tab
    tab.close()
    srv.stop()
    assert errors == []


def list_ids(page) -> list[str]:
    return page.eval_on_selector_all("#slides tbody tr", "rows => rows.map(r => r.dataset.slide)")


def screen_pixel(page, x_l0: float, y_l0: float) -> tuple[int, int, int]:
    """The screenshot's colour at a level-0 position of the slide."""
    pos = page.evaluate("([x, y]) => { const p = window.wsiViewer.viewport.imageToViewerElementCoordinates("
                        "new OpenSeadragon.Point(x, y)); const r = document.getElementById('osd')"
                        ".getBoundingClientRect(); return [r.left + p.x, r.top + p.y]; }", [x_l0, y_l0])
    shot = np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB"))
    return tuple(int(v) for v in shot[int(pos[1]), int(pos[0])])


def test_slide_list_sorts_and_filters(page):
    assert list_ids(page) == ["broken", "lesion", "moved"]
    page.click("#slides th[data-key=probability]")
    assert list_ids(page) == ["moved", "lesion", "broken"]  # ascending, slides without a probability last
    page.click("#slides th[data-key=slide_id]")
    page.select_option("#status-filter", "misclassified")
    assert list_ids(page) == ["moved"]
    page.select_option("#status-filter", "")
    page.fill("#filter", "fail")
    assert list_ids(page) == ["broken"]
    page.fill("#filter", "")
    assert len(list_ids(page)) == 3


def test_failed_and_moved_slides_say_why(page):
    page.click("#slides tr[data-slide=broken]")
    page.wait_for_function("document.body.dataset.slide === 'broken'")
    assert "corrupt_slide" in page.inner_text("#message") and "re-copy" in page.inner_text("#message")
    page.click("#slides tr[data-slide=moved]")
    page.wait_for_function("document.body.dataset.overlayReady === 'cam' && document.body.dataset.slide === 'moved'")
    assert "no longer where the run read it" in page.inner_text("#message")


def test_slide_opens_with_cam_tiles_at_several_zoom_levels(page, view_run):
    page.click("#slides tr[data-slide=lesion]")
    page.wait_for_function("document.body.dataset.slide === 'lesion' && " + LOADED)
    assert page.is_hidden("#message") and page.inner_text("#title").startswith("lesion")
    for zoom in (3, 9):
        page.evaluate(f"window.wsiViewer.viewport.zoomTo({zoom}, null, true)")
        page.wait_for_timeout(200)
        page.wait_for_function(LOADED)
    levels = page.evaluate("window.viewerState.stats.levels")
    slide_levels = {int(k.split(":")[1]) for k in levels if k.startswith("slide:")}
    overlay_levels = {int(k.split(":")[1]) for k in levels if k.startswith("overlay:")}
    assert len(slide_levels) >= 3 and len(overlay_levels) >= 3
    assert max(slide_levels) == 11  # full resolution of a 1536-px slide (Deep Zoom levels 0..11)
    assert page.inner_text("#legend").startswith("Grad-CAM of class 1")
    strokes = page.eval_on_selector_all("svg.regions path", "ps => ps.map(p => p.getAttribute('stroke'))")
    assert "rgb(0,200,0)" in strokes and len(strokes) >= 2  # the annotation in its class colour, the hot region
    page.evaluate("window.wsiViewer.viewport.goHome(true)")
    page.wait_for_function(LOADED)


def test_cam_overlay_lies_on_the_lesion_and_toggles_and_fades(page, view_run):
    grid, lesion, tissue = view_run["grid"], view_run["lesion"], view_run["tissue"]
    page.uncheck("#regions")
    page.fill("#opacity", "1")
    page.dispatch_event("#opacity", "input")
    assert page.evaluate("window.viewerState.overlay.getOpacity()") == 1
    page.wait_for_function(LOADED)
    inferno = colormap_lut(CMAP_NAME)
    # the centre of a lesion tile and of a tissue tile far from the lesion, in level-0 pixels
    r, c = np.argwhere(lesion)[len(np.argwhere(lesion)) // 2]
    on_lesion = ((c + 0.5) * grid.stride_l0_px, (r + 0.5) * grid.stride_l0_px)
    far = np.argwhere(tissue & ~lesion)
    fr, fc = far[np.argmax(np.hypot(far[:, 0] - r, far[:, 1] - c))]
    off_lesion = ((fc + 0.5) * grid.stride_l0_px, (fr + 0.5) * grid.stride_l0_px)
    hot, cold = screen_pixel(page, *on_lesion), screen_pixel(page, *off_lesion)
    assert np.abs(np.subtract(hot, inferno[255])).max() <= 12, hot  # CAM 1.0 drawn exactly on the lesion
    assert np.abs(np.subtract(cold, inferno[0])).max() <= 12, cold  # CAM 0.0 on the other tissue
    page.fill("#opacity", "0.5")
    page.dispatch_event("#opacity", "input")
    page.wait_for_timeout(300)
    half = screen_pixel(page, *on_lesion)
    page.check("input[name=layer][value=none]")  # toggled off: the slide alone
    page.wait_for_function("document.body.dataset.overlay === 'none' && window.wsiViewer.world.getItemCount() === 1")
    page.wait_for_timeout(300)
    bare = screen_pixel(page, *on_lesion)
    assert np.abs(np.subtract(bare, inferno[255])).max() > 60  # tissue colours, not the CAM's yellow
    for channel in range(3):  # half opacity: halfway between the slide and the CAM colour
        assert abs(half[channel] - (bare[channel] + int(inferno[255][channel])) / 2) <= 25, (half, bare)
    page.check("input[name=layer][value=tissue]")
    page.wait_for_function("document.body.dataset.overlayReady === 'tissue'")
    assert "excluded: pen" in page.inner_text("#legend")
    page.check("input[name=layer][value=cam]")
    page.wait_for_function("document.body.dataset.overlay === 'cam' && " + LOADED)


def test_screenshot_for_the_record(page, tmp_path):
    page.check("#regions")
    shot = Image.open(io.BytesIO(page.screenshot()))
    assert shot.size == (1200, 800)
    assert len(np.unique(np.asarray(shot.convert("RGB")).reshape(-1, 3), axis=0)) > 200  # a drawn page, not blank
