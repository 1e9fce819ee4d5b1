"""QuPath GeoJSON annotations: formats, the exact tile sets of include/exclude/hole regions, typed errors, staleness."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.core.config import config_from_dict
from pipeline.core.errors import AnnotationError, AnnotationGeometryError, AnnotationOutsideSlideError
from pipeline.core.parallel import LocalRunner
from pipeline.core.qc_codes import QC_CODES
from pipeline.core.store import array_attrs, read_array, read_attrs, store_path
from pipeline.describe.runner import describe_slides
from pipeline.slides.annotations import (annotation_qc, class_name, parse_annotations, tile_annotation,
                                         unmatched_annotation_files)
from pipeline.slides.tiling import TileGrid
from tests.conftest import write_test_slide

TILE = 100.0  # level-0 px per tile in the hand-made grid below: tile (r, c) has its centre at (100c + 50, 100r + 50)


def _grid(rows=10, cols=12) -> TileGrid:
    return TileGrid(slide_width_px=int(cols * TILE), slide_height_px=int(rows * TILE), slide_mpp=0.5, target_mpp=0.5,
                    tile_px=100, stride_px=100, rows=rows, cols=cols, tile_l0_px=TILE, stride_l0_px=TILE,
                    read_level=0, read_downsample=1.0)


def _box(c0, r0, c1, r1):
    """A ring around tiles r0..r1-1, c0..c1-1 (edges between tile centres, so which centres lie inside is exact)."""
    x0, y0, x1, y1 = c0 * TILE + 10, r0 * TILE + 10, c1 * TILE - 10, r1 * TILE - 10
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def _feature(rings, name, kind="Polygon", classification="v04"):
    props = {"objectType": "annotation"}
    if classification == "v04":
        props["classification"] = {"name": name, "color": [255, 0, 0]}
    elif classification == "string":
        props["classification"] = name
    coords = [rings] if kind == "MultiPolygon" else rings
    return {"type": "Feature", "geometry": {"type": kind, "coordinates": coords}, "properties": props}


def _qupath_doc():
    """Include region 'Tumor' (tiles r1-8, c1-10) with a hole (r3-4, c3-4), a second Tumor part as MultiPolygon
    (r1-2, c11), an 'Exclude' square inside the tumour (r6-7, c7-8), and an unclassified outline around everything."""
    return {"type": "FeatureCollection", "features": [
        _feature([_box(0, 0, 12, 10)], None),
        _feature([_box(1, 1, 11, 9), _box(3, 3, 5, 5)[::-1]], "Tumor"),
        _feature([_box(11, 1, 12, 3)], "Tumor", kind="MultiPolygon", classification="string"),
        _feature([_box(7, 6, 9, 8)], "Exclude"),
    ]}


def test_include_exclude_and_holes_give_exactly_the_expected_tiles():
    grid = _grid()
    annotations = parse_annotations(json.dumps(_qupath_doc()), 1200, 1000)
    codes = annotation_qc(annotations, grid, exclude=["Exclude"], include=["Tumor"])
    expected_kept = np.zeros(grid.shape, bool)
    expected_kept[1:9, 1:11] = True
    expected_kept[3:5, 3:5] = False     # the hole
    expected_kept[1:3, 11] = True       # the MultiPolygon part
    expected_kept[6:8, 7:9] = False     # excluded inside the tumour
    assert np.array_equal(codes == 0, expected_kept)
    assert (codes[6:8, 7:9] == QC_CODES["annotation_exclude"]).all()
    assert (codes[3:5, 3:5] == QC_CODES["annotation_outside"]).all()
    assert (codes[0] == QC_CODES["annotation_outside"]).all()

    labels, classes = tile_annotation(annotations, grid)
    assert classes == ["Exclude", "Tumor", "Unclassified"]
    names = np.array([""] + classes)[labels]
    assert names[0, 0] == "Unclassified" and names[3, 3] == "Unclassified"  # the hole shows the outline below it
    assert names[1, 1] == "Tumor" and names[2, 11] == "Tumor" and names[6, 7] == "Exclude"


def test_without_include_classes_on_the_slide_every_tile_stays():
    grid = _grid()
    annotations = parse_annotations(json.dumps([_feature([_box(2, 2, 4, 4)], "Stroma")]), 1200, 1000)  # bare list
    codes = annotation_qc(annotations, grid, exclude=["Exclude"], include=["Tumor"])
    assert not codes.any()


def test_classification_forms_of_qupath_versions():
    assert class_name({"classification": {"name": "Tumor", "colorRGB": -1}}) == "Tumor"  # 0.2-0.3
    assert class_name({"classification": {"name": "Tumor", "color": [1, 2, 3]}}) == "Tumor"  # 0.4+
    assert class_name({"classification": "Exclude"}) == "Exclude"
    assert class_name({}) == "Unclassified"
    single = parse_annotations(json.dumps(_feature([_box(1, 1, 2, 2)], "Pen")), 1200, 1000)
    assert [a.name for a in single] == ["Pen"]


@pytest.mark.parametrize("text, error, code", [
    ("{not json", AnnotationError, "bad_annotation"),
    (json.dumps({"type": "Topology"}), AnnotationError, "bad_annotation"),
    (json.dumps([{"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}, "properties": {}}]),
     AnnotationGeometryError, "annotation_geometry"),
    (json.dumps([{"type": "Feature", "geometry": {"type": "Hexagon", "coordinates": []}, "properties": {}}]),
     AnnotationGeometryError, "annotation_geometry"),
    (json.dumps([_feature([[[0, 0], [5000, 0], [5000, 50], [0, 50], [0, 0]]], "Tumor")]),
     AnnotationOutsideSlideError, "annotation_outside_slide"),
])
def test_broken_files_give_their_typed_errors(text, error, code):
    with pytest.raises(error) as info:
        parse_annotations(text, 1200, 1000, path="slide.geojson")
    assert info.value.code == code and "slide.geojson" in str(info.value) and info.value.fix


def test_a_small_overshoot_past_the_edge_is_accepted():
    ring = [[-5, -5], [1205, -5], [1205, 1005], [-5, 1005], [-5, -5]]
    assert len(parse_annotations(json.dumps([_feature([ring], "Tissue")]), 1200, 1000)) == 1


def test_describe_with_annotations(tmp_path, caplog):
    """Through describe: tiles removed and labelled, a broken file fails only its slide, an unmatched file is a
    warning, and an edited annotation file makes only its slide stale."""
    slides, notes = tmp_path / "slides", tmp_path / "annotations"
    slides.mkdir()
    notes.mkdir()
    for name, seed in (("a", 1), ("b", 2)):
        write_test_slide(slides / f"{name}.svs", width=1024, height=768, seed=seed, tissue_fraction=0.8)
    # slide a: everything but an excluded band (level-0 px, x 0-1024 at 0.25 µm/px, 64-px tiles at 0.5 -> 128 px)
    exclude = [[0, 256], [1024, 256], [1024, 512], [0, 512], [0, 256]]
    (notes / "a.geojson").write_text(json.dumps({"type": "FeatureCollection",
                                                 "features": [_feature([exclude], "Exclude")]}))
    (notes / "b.geojson").write_text("{broken")
    (notes / "c.geojson").write_text("[]")
    # stain none: a slide that becomes estimable (b, once its bad file is gone) would give the cohort a first stain
    # target and so make slide a stale too; this test is about the annotations alone
    config = config_from_dict({"tiling": {"tile_px": 64}, "qc": [], "stain": {"method": "none"},
                               "annotations": {"dir": str(notes)}})
    out = tmp_path / "out"
    summary = describe_slides([slides], out, config, runner=LocalRunner(), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert summary["done"] == 1 and summary["failed"] == 1
    assert manifest["slides"]["b"]["error"]["code"] == "bad_annotation"
    assert any("c.geojson" in w for w in manifest["annotation_warnings"])
    assert any("c.geojson" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)  # and in the log
    store = store_path(out, "a")
    codes, tissue = read_array(store, "qc_code"), read_array(store, "tissue_fraction") >= 0.5
    band = np.zeros(codes.shape, bool)
    band[2:4, :] = True  # tile rows whose centres (y = 128 r + 64) lie in 256..512
    assert np.array_equal(codes == QC_CODES["annotation_exclude"], band & tissue)
    assert np.isnan(read_array(store, "descriptors")[band]).all()
    assert not read_array(store, "tissue_mask")[band].any()
    assert array_attrs(store, "tile_annotation")["classes"] == ["Exclude"]
    assert manifest["slides"]["a"]["qc"] == {"annotation_exclude": int((band & tissue).sum())}

    (notes / "b.geojson").unlink()
    again = describe_slides([slides], out, config, runner=LocalRunner(), progress=False)
    assert again["skipped"] == 1 and again["done"] == 1  # a is current, b is redone without its bad file
    (notes / "a.geojson").write_text(json.dumps([_feature([exclude], "Stroma")]))  # edited: a is stale
    third = describe_slides([slides], out, config, runner=LocalRunner(), progress=False)
    assert third["done"] == 1 and third["skipped"] == 1
    assert not read_array(store, "qc_code").any()
    assert "annotations:" in read_attrs(store)["fingerprint"]


def test_unmatched_files_are_listed(tmp_path):
    (tmp_path / "s1.geojson").write_text("[]")
    (tmp_path / "other.geojson").write_text("[]")
    assert unmatched_annotation_files(tmp_path, ["s1"]) == [str(tmp_path / "other.geojson")]
    assert unmatched_annotation_files(None, ["s1"]) == []


def test_described_fingerprint_holds_the_file_and_its_annotations(tmp_path):
    from pipeline.slides.annotations import described_fingerprint, file_fingerprint
    from pipeline.slides.open import slide_fingerprint

    slide = tmp_path / "s1.svs"
    slide.write_bytes(b"not really a slide, but bytes to hash" * 100)
    notes = tmp_path / "notes"
    notes.mkdir()
    plain = described_fingerprint(slide, notes, "s1")
    assert plain == slide_fingerprint(slide) == file_fingerprint(plain)
    (notes / "s1.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    with_notes = described_fingerprint(slide, notes, "s1")
    assert with_notes != plain and file_fingerprint(with_notes) == plain  # the worker gets the file's part
    missing = described_fingerprint(tmp_path / "gone.svs", notes, "gone")
    assert missing.startswith("unreadable:") and file_fingerprint(missing) is None
    assert file_fingerprint(None) is None


def test_described_fingerprints_of_many_slides_are_each_slides_own(tmp_path):
    from pipeline.slides.annotations import described_fingerprint, described_fingerprints

    notes = tmp_path / "notes"
    notes.mkdir()
    slides = {}
    for i in range(7):
        slides[f"s{i}"] = tmp_path / f"s{i}.svs"
        slides[f"s{i}"].write_bytes(bytes([i]) * (3 << 19))  # 1.5 MiB each, different content
    (notes / "s3.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    slides["gone"] = tmp_path / "gone.svs"
    made = described_fingerprints(slides, notes)
    assert list(made) == list(slides)  # in the given order
    assert made == {sid: described_fingerprint(path, notes, sid) for sid, path in slides.items()}
    assert len(set(made.values())) == len(slides) and made["gone"].startswith("unreadable:")
