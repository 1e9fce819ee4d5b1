"""The plan of a slide in one describe run: its metadata read, its reader probed, its file hashed and its thumbnail
made once (the stain pass's are taken over), whatever the stain setting; the stores are the same either way."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

import pipeline.describe.plan as plan_module
import pipeline.describe.stain_cohort as stain_module
import pipeline.slides.open as open_module
import pipeline.slides.qc.pen as pen_module
from pipeline.core.config import config_from_dict
from pipeline.core.parallel import LocalRunner
from pipeline.core.store import read_array, read_attrs, store_path
from pipeline.describe.runner import describe_slides
from pipeline.describe.stain_cohort import KEPT_THUMBNAILS


def _counting(monkeypatch, module, name: str, calls: Counter, key=lambda *a, **k: a[0]):
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls[(name, str(key(*args, **kwargs)))] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


@pytest.mark.parametrize("stain", ["macenko", "none"])
def test_each_slide_is_read_once_per_run(small_slides, tmp_path, monkeypatch, stain):
    monkeypatch.setattr(open_module, "RECENT_S", 0.0)  # the test's slides were just written: remember them anyway
    open_module._remembered_hash.cache_clear()
    calls: Counter = Counter()
    for module in (stain_module, plan_module):
        _counting(monkeypatch, module, "read_slide_info", calls)
        _counting(monkeypatch, module, "tissue_image", calls)
    _counting(monkeypatch, stain_module, "choose_reader", calls, key=lambda info, *a, **k: info.path)
    _counting(monkeypatch, open_module, "_hash_file", calls)
    _counting(monkeypatch, pen_module, "pen_pixels", calls, key=lambda *a, **k: "any slide")
    config = config_from_dict({"tiling": {"tile_px": 64, "chunk_tiles": 4}, "stain": {"method": stain}})
    out = tmp_path / "out"
    summary = describe_slides([small_slides], out, config, runner=LocalRunner(), progress=False)
    assert summary["done"] == 2
    paths = sorted(str(p) for p in small_slides.glob("*.svs"))
    for name in ("read_slide_info", "tissue_image", "choose_reader", "_hash_file"):
        assert [calls[(name, p)] for p in paths] == [1, 1], (name, calls)
    assert calls[("pen_pixels", "any slide")] == 2  # the stain pass's flags are the plan's
    assert not (out / "slides" / KEPT_THUMBNAILS).exists()
    for path in paths:
        store = store_path(out, open_module.slide_id_from_path(path))
        assert read_attrs(store)["slide_info"]["path"] == path
        assert read_array(store, "qc_code").shape == read_array(store, "tissue_mask").shape


def test_the_plan_taken_from_the_stain_pass_gives_the_same_store(small_slides, tmp_path):
    """The same slide planned from the stain pass's survey and alone (its stain cache reused: no survey)."""
    config = config_from_dict({"tiling": {"tile_px": 64, "chunk_tiles": 4}})
    first, second = tmp_path / "first", tmp_path / "second"
    describe_slides([small_slides], first, config, runner=LocalRunner(), progress=False)
    second.mkdir()
    (second / "stain.json").write_bytes((first / "stain.json").read_bytes())  # cached estimates: nothing surveyed
    describe_slides([small_slides], second, config, runner=LocalRunner(), progress=False)
    for slide_id in ("slide-a", "slide-b"):
        a, b = store_path(first, slide_id), store_path(second, slide_id)
        for name in ("descriptors", "tissue_mask", "tissue_fraction", "thumbnail", "qc_code", "tile_annotation"):
            assert np.array_equal(read_array(a, name), read_array(b, name), equal_nan=True), name
        attrs_a, attrs_b = read_attrs(a), read_attrs(b)
        for key in ("slide_info", "reader", "reader_choice", "pixel_decode", "tile_grid", "stain", "qc", "tiles"):
            assert attrs_a[key] == attrs_b[key], key


def test_a_single_block_slide_is_described_in_its_plan_task(small_slides, tmp_path, monkeypatch):
    """One block per slide (chunks of 64 tiles): no block task, the same values as block by block (4-tile chunks)."""
    import pipeline.describe.grouping as grouping
    import pipeline.describe.runner as runner_module

    tasks: Counter = Counter()
    original = runner_module.Task

    def counted_task(fn, args, tag, *rest, **kwargs):
        if tag[0] in ("prepare", "block"):  # describe's tasks, not the stain pass's surveys (tagged by slide ids)
            tasks[fn.__name__] += 1
        return original(fn, args, tag, *rest, **kwargs)

    monkeypatch.setattr(runner_module, "Task", counted_task)
    monkeypatch.setattr(grouping, "Task", counted_task)  # plan tasks are made by grouping.group_task
    stores = {}
    for chunk in (64, 4):
        config = config_from_dict({"tiling": {"tile_px": 64, "chunk_tiles": chunk}})
        out = tmp_path / f"chunks{chunk}"
        assert describe_slides([small_slides], out, config, runner=LocalRunner(), progress=False)["done"] == 2
        stores[chunk] = out
        if chunk == 64:
            assert tasks == Counter({"plan_and_describe": 2}), tasks
    for slide_id in ("slide-a", "slide-b"):
        one, many = store_path(stores[64], slide_id), store_path(stores[4], slide_id)
        for name in ("descriptors", "tissue_mask", "qc_code", "qc_scores", "thumbnail"):
            assert np.array_equal(read_array(one, name), read_array(many, name), equal_nan=True), name
        assert read_attrs(one)["tiles"] == read_attrs(many)["tiles"] > 0
        # written whole by its plan task: the same attributes, complete, and nothing of a partial store left
        attrs_one, attrs_many = read_attrs(one), read_attrs(many)
        assert set(attrs_one) == set(attrs_many) and attrs_one["complete"] is True
        for key in ("qc", "reader", "slide_info", "tile_grid", "descriptor", "config_hash", "fingerprint", "stain"):
            assert attrs_one[key] == attrs_many[key], key
        assert not (stores[64] / "slides" / ".progress" / slide_id).exists()
        assert not (stores[64] / "slides" / f"{slide_id}.zarr.partial").exists()
        records = [json.loads((stores[c] / "manifest.json").read_text())["slides"][slide_id] for c in (64, 4)]
        assert [r["status"] for r in records] == ["done", "done"] and records[0]["tiles"] == records[1]["tiles"]
        assert records[0]["qc"] == records[1]["qc"] and records[0]["store"] == str(one)


def test_a_single_block_slide_resumes_the_partial_store_an_interrupted_run_left(small_slides, tmp_path, monkeypatch):
    """A one-block slide whose partial store is there (a run stopped after its plan) is described into it, block task
    style, and ends as the store written whole would."""
    import pipeline.describe.small_slides as small_module
    from pipeline.describe.plan import plan_slide
    from pipeline.slides.annotations import described_fingerprints

    config = config_from_dict({"tiling": {"tile_px": 64, "chunk_tiles": 64}, "stain": {"method": "none"}})
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    describe_slides([small_slides], whole, config, runner=LocalRunner(), progress=False)
    path = small_slides / "slide-a.svs"
    plan_slide(str(path), config, str(resumed), "slide-a", described_fingerprints({"slide-a": path}, None)["slide-a"])
    assert (resumed / "slides" / "slide-a.zarr.partial").is_dir()
    calls = Counter()
    _counting(monkeypatch, small_module, "write_complete_store", calls, key=lambda *a, **k: a[1])
    assert describe_slides([small_slides], resumed, config, runner=LocalRunner(), progress=False)["done"] == 2
    assert calls == Counter({("write_complete_store", "slide-b"): 1})  # slide-a went into its partial store
    assert not (resumed / "slides" / "slide-a.zarr.partial").exists()
    for slide_id in ("slide-a", "slide-b"):
        a, b = store_path(whole, slide_id), store_path(resumed, slide_id)
        for name in ("descriptors", "tissue_mask", "tissue_fraction", "qc_code", "qc_scores", "thumbnail"):
            assert np.array_equal(read_array(a, name), read_array(b, name), equal_nan=True), name
        assert read_attrs(a)["tiles"] == read_attrs(b)["tiles"] > 0 and read_attrs(b)["complete"] is True


def test_a_survey_counts_the_tissue_tiles_its_plan_finds(small_slides, tmp_path):
    """The tissue tiles a survey counts (which size the groups of small slides before any plan) are the plan's own,
    QC aside."""
    config = config_from_dict({"tiling": {"tile_px": 64}, "qc": {"detectors": []}})
    for path in sorted(small_slides.glob("*.svs")):
        survey = stain_module.survey_slide(str(path), config, keep=str(tmp_path / f"{path.stem}.npz"))
        plan = plan_module.prepare_slide(str(path), config)
        assert survey["slide"]["tissue_tiles"] == int(plan["tissue_tiles"].sum()) > 0
