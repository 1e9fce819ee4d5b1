"""The report's thumbnails: files in OUT/report_files/, made once, remade when their source changes."""

import os

import numpy as np
from PIL import Image

from pipeline.report.html import build_report

from .fake_run import write_fake_run


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


def test_slide_thumbnail_tints_the_tiles_qc_excluded(tmp_path):
    from pipeline.core.qc_codes import QC_CODES, QC_COLOURS
    from pipeline.core.store import read_array, write_array
    from pipeline.report.thumbs import qc_overlay
    from tests.conftest import planted_map, write_map_store

    store = write_map_store(tmp_path, "s", planted_map(np.random.default_rng(0), False, 8, 8))
    codes = np.zeros((8, 8), np.uint8)
    codes[2, 3] = QC_CODES["pen"]
    write_array(store, "qc_code", codes)
    plain, tinted = read_array(store, "thumbnail"), qc_overlay(store)  # 16 thumbnail px per tile here
    changed = np.any(tinted != plain, axis=-1)
    assert changed[32:48, 48:64].all() and changed.sum() == 16 * 16
    assert np.allclose(tinted[40, 56], 0.55 * np.array(QC_COLOURS[QC_CODES["pen"]]), atol=1)
