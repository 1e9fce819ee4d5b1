"""The run as the viewer reads it: slides only from the manifest, slide files found where the run read them
(relative paths from where it was started), details of every stage, and nothing written."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.core.errors import NoRunError
from pipeline.view.catalog import RunCatalog, scalar_details


def test_catalog_holds_the_manifest_slides_and_their_files(view_run):
    catalog = RunCatalog(view_run["out"])
    assert list(catalog.slides) == ["broken", "lesion", "moved"]
    assert catalog.get("../lesion") is None and catalog.get("nope") is None
    lesion = catalog.get("lesion")
    assert lesion.store is not None and catalog.slide_file(lesion) == (view_run["slide"], str(view_run["slide"]))
    path, recorded = catalog.slide_file(catalog.get("moved"))
    assert path is None and recorded.endswith("gone/moved.svs")
    assert catalog.get("broken").store is None
    assert [r["name"] for r in catalog.regions(lesion)] == ["CAM hot regions", "annotations"]
    assert catalog.regions(catalog.get("broken")) == []


def test_relative_slide_path_is_found_from_the_output_parent(view_run, tmp_path, monkeypatch):
    out = tmp_path / "run" / "out"
    shutil.copytree(view_run["out"], out)
    shutil.copy(view_run["slide"], tmp_path / "run" / "lesion.svs")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["slides"]["lesion"]["path"] = "lesion.svs"  # as a run started in tmp_path/run records it
    (out / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(out / "slides" / "lesion.zarr")  # no store: only the manifest's relative path is left
    monkeypatch.chdir(tmp_path)
    entry = RunCatalog(out).get("lesion")
    assert RunCatalog(out).slide_file(entry) == (tmp_path / "run" / "lesion.svs", "lesion.svs")


def test_damaged_manifest_is_a_typed_error_and_left_alone(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(NoRunError, match="cannot read manifest.json"):
        RunCatalog(tmp_path)
    assert (tmp_path / "manifest.json").read_text() == "{not json"  # the viewer writes nothing


def test_scalar_details_flatten_every_stage():
    record = {"status": "done", "tiles": 12, "path": "/x.svs", "error": None,
              "stages": {"cam": {"status": "done", "pointing": {"hit": 1.0}, "files": {"png": "a"}},
                         "qc": {"excluded": 3}}}
    assert scalar_details(record) == {"status": "done", "tiles": 12, "cam.status": "done", "cam.pointing.hit": 1.0,
                                      "qc.excluded": 3}
