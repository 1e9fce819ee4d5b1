"""The HTML report: self-contained, and it renders with its images in a real (headless) browser."""

import base64
import re
import shutil
import subprocess

import numpy as np
import pytest

from pipeline.cam.heatmaps import save_overlay_png
from pipeline.core.outputs import atomic_write_json
from pipeline.core.parallel import LocalRunner
from pipeline.core.store import read_array, read_attrs, store_path
from pipeline.describe.runner import describe_slides
from pipeline.reduce.runner import reduce_slides
from pipeline.report.html import build_report
from pipeline.slides.tiling import TileGrid


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def report_out(small_slides, small_config, tmp_path_factory, fixtures_dir):
    out = tmp_path_factory.mktemp("report")
    describe_slides([small_slides, fixtures_dir / "unopenable.tiff"], out, small_config, runner=LocalRunner(),
                    progress=False)
    reduce_slides(out, small_config, runner=LocalRunner(), progress=False)
    for slide_id in ("slide-a", "slide-b"):  # a CAM overlay per slide, as the cam stage writes them
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


def test_report_is_self_contained(report_out):
    out, path = report_out
    page = path.read_text()
    assert path == out / "report.html"
    assert "<h2>Test metrics</h2>" in page and "0.938" in page  # roc_auc, 3 decimals
    assert page.count("class='card'") == 2
    assert "unsupported_format" in page and "unopenable" in page  # the failed slide and its reason
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) >= 6 and all(s.startswith("data:image/png;base64,") for s in srcs)
    for s in srcs:  # every inlined image is a real PNG
        assert base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http://" not in page and "https://" not in page  # opens from disk, no network


def test_report_renders_in_headless_chromium(report_out, tmp_path):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (make test installs Debian's chromium package when it can)")
    _, path = report_out
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout).group(1)
    total = int(re.search(r'data-images-total="(\d+)"', body).group(1))
    loaded = int(re.search(r'data-images-loaded="(\d+)"', body).group(1))
    assert total >= 6 and loaded == total
    shot = tmp_path / "report.png"
    subprocess.run([chromium, *flags, "--window-size=1280,1600", f"--screenshot={shot}", path.as_uri()],
                   capture_output=True, text=True, timeout=120, check=True)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (1600, 1280)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200  # text, plots and images, not a blank page


def test_model_summary_names_weights_head_backend_and_classes():
    from pipeline.report.html import _model_summary

    info = {"config": {"train": {"weights": None, "recipe": "scratch", "head_block": "mixed2"}},
            "versions": {"backend": "jax"}, "labels": {"values": [0, 1]}}
    assert _model_summary(info) == ("InceptionV3, weights random init, recipe scratch, head on mixed2, jax backend"
                                    " · classes 0, 1")
    info["config"]["train"].update(weights="imagenet", recipe="finetune")
    assert _model_summary(info).startswith("InceptionV3, weights imagenet, recipe finetune, head on mixed2")
