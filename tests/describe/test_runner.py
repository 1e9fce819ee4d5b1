"""The describe stage end to end: CLI, stores, descriptor values, Dask equality, reruns, resume, failures."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import openslide
import pytest

import pipeline
from pipeline.core.config import config_from_dict, load_config
from pipeline.core.errors import MissingMppError, NoTissueError
from pipeline.core.parallel import LocalRunner, task_runner
from pipeline.core.store import read_array, read_attrs, store_path
from pipeline.describe.descriptors import stats_descriptors
from pipeline.describe.runner import describe_slides, is_one_block_slide
from pipeline.describe.stats import STATS_FEATURE_NAMES
from pipeline.slides.open import find_slides
from pipeline.slides.reader_choice import REMEMBERED_NOTE
from pipeline.slides.tiling import TileGrid
from tests.conftest import write_test_slide

BIN = Path(sys.executable).parent


def _arrays(store):
    return {name: read_array(store, name) for name in ("descriptors", "tissue_mask", "tissue_fraction", "thumbnail")}


def test_cli_end_to_end(small_slides, tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([str(BIN / "wsi-pipeline"), "describe", "--slides", str(small_slides), "--out", str(out),
                          "--tile-px", "64", "--workers", "2"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "describe: slides 2, done 2, skipped 0, failed 0" in run.stdout
    assert "Dask dashboard: http" in run.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    for slide_id in ("slide-a", "slide-b"):
        rec = manifest["slides"][slide_id]
        assert rec["status"] == "done" and rec["error"] is None
        assert rec["mpp"] == pytest.approx(0.25) and rec["mpp_source"] == "slide_metadata"
        assert rec["tiles"] > 20 and rec["seconds"] > 0
        store = out / "slides" / f"{slide_id}.zarr"
        attrs = read_attrs(store)
        assert attrs["complete"] and attrs["fingerprint"] and attrs["config_hash"]
        assert attrs["descriptor"]["feature_names"] == list(STATS_FEATURE_NAMES)
        assert attrs["versions"]["zarr"].startswith("3.")
        grid = TileGrid.from_dict(attrs["tile_grid"])
        assert grid.tile_l0_px == 128 and grid.target_mpp == 0.5
        arrays = _arrays(store)
        assert arrays["descriptors"].shape == (grid.rows, grid.cols, 25)
        tissue = arrays["tissue_mask"]
        assert tissue.sum() == rec["tiles"]
        assert np.isfinite(arrays["descriptors"][tissue]).all()
        assert np.isnan(arrays["descriptors"][~tissue]).all()
        assert (arrays["tissue_fraction"][tissue] >= 0.5).all()
    assert list((out / "logs").glob("*-describe-*.log"))
    assert not list((out / "slides").glob("*.partial"))


def test_descriptors_equal_direct_computation(small_slides, tmp_path):
    """At 1.0 µm/px the tiles are exactly level 1 (downsample 4) of the slide: recompute from OpenSlide pixels."""
    slide = small_slides / "slide-a.svs"
    config = config_from_dict({"tiling": {"mpp": 1.0, "tile_px": 32}, "stain": {"method": "none"}})  # pixels as read
    store = pipeline.describe_slide(slide, tmp_path, config)
    desc = read_array(store, "descriptors")
    tissue = read_array(store, "tissue_mask")
    grid = TileGrid.from_dict(read_attrs(store)["tile_grid"])
    assert grid.read_level == 1 and grid.tile_l0_px == 128
    rows, cols = np.nonzero(tissue)
    with openslide.OpenSlide(str(slide)) as handle:
        tiles = np.stack([np.asarray(handle.read_region((int(c * 128), int(r * 128)), 1, (32, 32)))[..., :3]
                          for r, c in zip(rows, cols)])
    np.testing.assert_allclose(desc[rows, cols], stats_descriptors(tiles), rtol=1e-5, atol=1e-6)


def test_two_dask_workers_give_exactly_the_in_process_result(small_slides, small_config, tmp_path):
    local_out, dask_out = tmp_path / "local", tmp_path / "dask"
    describe_slides([small_slides], local_out, small_config, runner=LocalRunner(), progress=False)
    with task_runner(small_config.cluster) as runner:
        assert runner.capacity == 2
        summary = describe_slides([small_slides], dask_out, small_config, runner=runner, progress=False)
    assert summary["done"] == 2
    for slide_id in ("slide-a", "slide-b"):
        a, b = _arrays(store_path(local_out, slide_id)), _arrays(store_path(dask_out, slide_id))
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_one_block_slide_is_described_in_this_process(small_slides, tmp_path, caplog):
    """One slide whose grid is a single block has nothing to run in parallel: no cluster is started for it, and its
    store is the one a cluster makes."""
    slide = small_slides / "slide-a.svs"  # 12 x 9 tiles of 64 px at 0.5 µm/px
    config = config_from_dict({"tiling": {"mpp": 0.5, "tile_px": 64, "chunk_tiles": 16},
                               "cluster": {"workers": 2, "dashboard": False}})
    assert is_one_block_slide([slide], config)
    assert not is_one_block_slide([slide], config.with_overrides(tiling__chunk_tiles=4))  # 9 blocks
    assert not is_one_block_slide(find_slides([small_slides])[0], config)  # two slides
    assert is_one_block_slide([tmp_path / "missing.svs"], config)  # fails here, typed, as it would on a worker
    caplog.set_level("INFO", logger="pipeline")
    describe_slides([slide], tmp_path / "here", config, progress=False)
    assert "no cluster started" in caplog.text
    caplog.clear()
    clustered = config.with_overrides(cluster__one_block_in_process=False)
    assert describe_slides([slide], tmp_path / "cluster", clustered, progress=False)["done"] == 1
    assert "no cluster started" not in caplog.text
    here, there = _arrays(store_path(tmp_path / "here", "slide-a")), _arrays(store_path(tmp_path / "cluster", "slide-a"))
    for name in here:
        np.testing.assert_array_equal(here[name], there[name], err_msg=name)


def test_one_slide_command_imports_no_dask_nor_scipy_linalg(small_slides, tmp_path):
    """Describing one small slide (default settings: QC on) pays for no cluster and imports neither Dask
    (~0.5 s of a ~1.5 s command) nor ``scipy.linalg`` (~0.17 s)."""
    code = ("import sys; from pipeline.describe.runner import describe_slides; "
            f"s = describe_slides([{str(small_slides / 'slide-b.svs')!r}], {str(tmp_path)!r}, progress=False); "
            "print(s['done'], *(m in sys.modules for m in ('dask', 'distributed', 'scipy.linalg', 'skimage')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["1", "False", "False", "False", "False"]


class CountingRunner(LocalRunner):
    """In-process runner that counts block tasks and can simulate a crash after some of them."""

    def __init__(self, crash_after=None):
        super().__init__()
        self.blocks = 0
        self.crash_after = crash_after

    def next_done(self):
        done = super().next_done()
        if done.tag[0] == "block":
            self.blocks += 1
            if self.crash_after is not None and self.blocks >= self.crash_after:
                raise KeyboardInterrupt("simulated crash")
        return done


def test_rerun_skips_complete_slides_and_redoes_stale_ones(small_slides, small_config, tmp_path):
    first = CountingRunner()
    describe_slides([small_slides], tmp_path, small_config, runner=first, progress=False)
    again = CountingRunner()
    summary = describe_slides([small_slides], tmp_path, small_config, runner=again, progress=False)
    assert summary["skipped"] == 2 and summary["done"] == 0 and again.blocks == 0
    # a settings change makes every store stale
    changed = small_config.with_overrides(tissue__fraction_min=0.25)
    summary = describe_slides([small_slides], tmp_path, changed, runner=CountingRunner(), progress=False)
    assert summary["done"] == 2 and summary["skipped"] == 0
    # the stores carry the hash of the run's settings: these ones with the cohort's stain target (OUT/config.yaml)
    run_config = load_config(tmp_path / "config.yaml")
    assert run_config.tissue.fraction_min == 0.25
    assert read_attrs(store_path(tmp_path, "slide-a"))["config_hash"] == run_config.stage_hash("describe")


def test_a_new_slide_is_fingerprinted_by_its_plan_task(small_slides, small_config, tmp_path, monkeypatch):
    """Without a stain pass the client hashes only slides that have a store (to see whether it is current); a new
    slide's plan task hashes its own, and its store records the same fingerprint."""
    from pipeline.describe import runner as runner_module
    from pipeline.slides.annotations import described_fingerprint

    config = small_config.with_overrides(stain__method="none")
    asked = []
    real = runner_module.described_fingerprints
    monkeypatch.setattr(runner_module, "described_fingerprints",
                        lambda ids, annotations: asked.append(sorted(ids)) or real(ids, annotations))
    describe_slides([small_slides], tmp_path, config, runner=LocalRunner(), progress=False)
    assert asked == [[]]
    for slide_id in ("slide-a", "slide-b"):
        expected = described_fingerprint(small_slides / f"{slide_id}.svs", None, slide_id)
        assert read_attrs(store_path(tmp_path, slide_id))["fingerprint"] == expected
    summary = describe_slides([small_slides], tmp_path, config, runner=LocalRunner(), progress=False)
    assert asked[-1] == ["slide-a", "slide-b"] and summary["skipped"] == 2 and summary["done"] == 0


def test_interrupted_run_resumes_chunk_by_chunk(small_slides, small_config, tmp_path):
    reference = tmp_path / "reference"
    full = CountingRunner()
    describe_slides([small_slides / "slide-a.svs"], reference, small_config, runner=full, progress=False)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        describe_slides([small_slides / "slide-a.svs"], out, small_config, runner=CountingRunner(crash_after=3),
                        progress=False)
    assert not store_path(out, "slide-a").exists()  # nothing half-written is visible as a store
    assert (out / "slides" / "slide-a.zarr.partial").is_dir()
    resumed = CountingRunner()
    summary = describe_slides([small_slides / "slide-a.svs"], out, small_config, runner=resumed, progress=False)
    assert summary["done"] == 1
    assert resumed.blocks == full.blocks - 3  # only the missing chunks were computed
    a, b = _arrays(store_path(reference, "slide-a")), _arrays(store_path(out, "slide-a"))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert not (out / "slides" / "slide-a.zarr.partial").exists()


def _corrupt_tiles(src: Path, dst: Path) -> Path:
    """A copy whose level-0 JPEG tile data is overwritten with garbage (headers intact)."""
    import tifffile

    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tif:
        page = tif.pages[0]
        for offset, count in list(zip(page.dataoffsets, page.databytecounts))[: len(page.dataoffsets) // 2]:
            data[offset + 20: offset + count] = bytes([0x5A]) * (count - 20)
    dst.write_bytes(bytes(data))
    return dst


def test_bad_inputs_are_recorded_and_the_batch_goes_on(small_slides, tmp_path, cmu_slide):
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(small_slides / "slide-a.svs", slides / "good one.svs")
    (slides / "random.svs").write_bytes(np.random.default_rng(0).bytes(5000))
    (slides / "empty.svs").write_bytes(b"")
    data = (small_slides / "slide-a.svs").read_bytes()
    (slides / "half.svs").write_bytes(data[: len(data) // 2])
    _corrupt_tiles(small_slides / "slide-a.svs", slides / "bad-tiles.svs")
    write_test_slide(slides / "no-mpp.svs", width=900, height=700, seed=5, mpp=None)
    write_test_slide(slides / "blank.svs", width=900, height=700, seed=6, tissue_fraction=0.0)
    write_test_slide(slides / "praep.svs", width=900, height=700, seed=7).rename(slides / "Präparat Nr 1.svs")
    shutil.copy(slides / "Präparat Nr 1.svs", slides / "Praparat_Nr_1.svs")  # collides after sanitising
    (slides / "notes.txt").write_text("not a slide")
    out = tmp_path / "out"
    config = config_from_dict({"tiling": {"tile_px": 64}})
    summary = describe_slides([slides], out, config, runner=LocalRunner(), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    codes = {k: (v["status"], (v["error"] or {}).get("code")) for k, v in manifest["slides"].items()}
    assert codes["good_one"] == ("done", None)
    assert codes["random"] == ("failed", "unsupported_format")
    assert codes["empty"] == ("failed", "corrupt_slide")
    assert codes["half"] == ("failed", "corrupt_slide")
    assert codes["bad-tiles"] == ("failed", "unreadable_tiles")
    assert codes["no-mpp"] == ("failed", "missing_mpp")
    assert codes["blank"] == ("failed", "no_tissue")
    assert codes["Praparat_Nr_1"] == ("done", None)
    assert codes["Praparat_Nr_1@Präparat Nr 1.svs"] == ("failed", "duplicate_slide_id")
    for key, (status, _) in codes.items():
        if status == "failed":
            message = manifest["slides"][key]["error"]["message"]
            assert "Fix:" in message and str(slides) in message
    assert manifest["ignored"][0]["path"].endswith("notes.txt")
    assert summary["done"] == 2 and summary["failed"] == 7
    assert sorted(p.name for p in (out / "slides").glob("*.zarr")) == ["Praparat_Nr_1.zarr", "good_one.zarr"]

    # retry with an override only redoes the failed ones; the no-mpp slide now succeeds
    from pipeline.describe.retry import retry_failed

    summary = retry_failed(out, config.with_overrides(tiling__mpp_override=0.25), runner=LocalRunner())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["slides"]["no-mpp"]["status"] == "done"
    assert manifest["slides"]["no-mpp"]["mpp_source"] == "override"
    assert manifest["slides"]["good_one"]["status"] == "done"
    assert summary["slides"] == 6  # the id collision needs a rename, not a retry
    assert manifest["slides"]["Praparat_Nr_1@Präparat Nr 1.svs"]["status"] == "failed"


def test_small_slides_go_several_to_a_task_with_the_same_results(small_slides, tmp_path, monkeypatch):
    """Small slides planned and described several to a task (and surveyed for the stain several to a task) give the
    stores of one task per slide; a broken slide fails alone; an unexpected error runs its slide again alone."""
    import pipeline.describe.grouping as grouping
    import pipeline.describe.runner as runner_module
    import pipeline.describe.small_slides as small_slides_module
    import pipeline.describe.stain_cohort as stain_cohort

    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(14):
        shutil.copy(small_slides / ("slide-a.svs" if i % 2 else "slide-b.svs"), slides / f"s{i:02d}.svs")
    (slides / "s09.svs").write_bytes(b"")
    config = config_from_dict({"tiling": {"tile_px": 64, "chunk_tiles": 64}})
    plan_tasks: list[tuple[str, tuple]] = []
    original_task, original_tiles = runner_module.Task, small_slides_module.describe_tiles
    failed_once: set = set()

    def counted_task(fn, args, tag, *rest):
        if tag[0] == "prepare":
            plan_tasks.append((fn.__name__, tag[1]))
        return original_task(fn, args, tag, *rest)

    def flaky_tiles(path, *rest):  # the second step of a group (every plan, then every block, then every store)
        if Path(path).stem == "s05" and "s05" not in failed_once:
            failed_once.add("s05")
            raise RuntimeError("a bug met once")
        return original_tiles(path, *rest)

    monkeypatch.setattr(runner_module, "Task", counted_task)
    monkeypatch.setattr(grouping, "Task", counted_task)  # plan tasks of small slides are made by grouping.group_task
    monkeypatch.setattr(small_slides_module, "describe_tiles", flaky_tiles)
    grouped = describe_slides([slides], tmp_path / "grouped", config, runner=LocalRunner(), progress=False)
    assert any(name == "plan_and_describe_each" and len(ids) >= 2 for name, ids in plan_tasks), plan_tasks
    assert len(plan_tasks) < 14 and failed_once == {"s05"}
    with_s05 = [ids for _, ids in plan_tasks if "s05" in ids]
    assert len(with_s05) == 2 and len(with_s05[0]) >= 2 and with_s05[1] == ("s05",)  # again alone, after its group

    plan_tasks.clear()
    monkeypatch.setattr(grouping, "GROUP_TILES", 0)  # one slide per task
    monkeypatch.setattr(stain_cohort, "SURVEY_GROUP_TILES", 0)
    alone = describe_slides([slides], tmp_path / "alone", config, runner=LocalRunner(), progress=False)
    assert all(len(ids) == 1 for _, ids in plan_tasks) and len(plan_tasks) == 14
    assert grouped["done"] == alone["done"] == 13 and grouped["failed"] == alone["failed"] == 1
    for out in ("grouped", "alone"):
        record = json.loads((tmp_path / out / "manifest.json").read_text())["slides"]["s09"]
        assert (record["status"], record["error"]["code"]) == ("failed", "corrupt_slide")
    for i in set(range(14)) - {9}:
        a, b = store_path(tmp_path / "grouped", f"s{i:02d}"), store_path(tmp_path / "alone", f"s{i:02d}")
        for name in ("descriptors", "tissue_mask", "tissue_fraction", "thumbnail", "qc_code", "qc_scores"):
            assert np.array_equal(read_array(a, name), read_array(b, name), equal_nan=True), name
        attrs_a, attrs_b = read_attrs(a), read_attrs(b)
        for attrs in (attrs_a, attrs_b):  # whether a slide coded alike was probed before in this process
            attrs["reader_choice"]["reason"] = attrs["reader_choice"]["reason"].replace(REMEMBERED_NOTE, "")
        assert {k: v for k, v in attrs_a.items() if k != "seconds"} == {k: v for k, v in attrs_b.items()
                                                                        if k != "seconds"}


def test_while_no_slide_size_is_known_few_slides_go_alone(small_slides, tmp_path, monkeypatch):
    """Before any slide is planned, at most two plan tasks per worker are out (one slide each, their sizes unknown);
    the slides after them go in groups sized by the first ones."""
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(12):
        shutil.copy(small_slides / "slide-a.svs", slides / f"s{i:02d}.svs")

    class TwoWorkers(LocalRunner):  # in-process, but planned as for two workers
        capacity = 2

    events: list = []
    runner = TwoWorkers()
    original_submit, original_next = runner.submit, runner.next_done
    monkeypatch.setattr(runner, "submit", lambda fn, *a, tag=None, **k: (events.append(len(tag[1])),
                                                                          original_submit(fn, *a, tag=tag, **k)))
    monkeypatch.setattr(runner, "next_done", lambda: (events.append("done"), original_next())[1])
    config = config_from_dict({"tiling": {"tile_px": 64, "chunk_tiles": 64}, "stain": {"method": "none"}})
    assert describe_slides([slides], tmp_path / "out", config, runner=runner, progress=False)["done"] == 12
    first_done = events.index("done")
    assert events[:first_done] == [1, 1, 1, 1]  # not the in-flight limit's 8
    sizes = [e for e in events if e != "done"]
    assert max(sizes) >= 2 and sum(sizes) == 12 and len(sizes) < 12


def test_cli_exit_codes(tmp_path, small_slides):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiling: {tile_size: 3}\n")
    run = subprocess.run([str(BIN / "wsi-pipeline"), "describe", "--slides", str(small_slides), "--out",
                          str(tmp_path / "o"), "--config", str(bad)], capture_output=True, text=True)
    assert run.returncode == 2 and "tiling.tile_size: unknown key" in run.stderr
    assert not (tmp_path / "o").exists()  # nothing was started
    run = subprocess.run([str(BIN / "wsi-pipeline"), "describe", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "--slides" in run.stderr


def test_python_api_single_slide(tmp_path, fixtures_dir, small_slides):
    config = config_from_dict({"tiling": {"tile_px": 64}})
    store = pipeline.describe_slide(small_slides / "slide-b.svs", tmp_path, config)
    assert store == tmp_path / "slides" / "slide-b.zarr" and read_attrs(store)["complete"]
    with pytest.raises(MissingMppError, match="--mpp-override"):
        pipeline.describe_slide(fixtures_dir / "boxes.png", tmp_path, config)
    blank = write_test_slide(tmp_path / "blank.svs", width=700, height=600, tissue_fraction=0.0)
    with pytest.raises(NoTissueError):
        pipeline.describe_slide(blank, tmp_path, config)


def test_real_aperio_slide(cmu_slide, tmp_path):
    store = pipeline.describe_slide(cmu_slide, tmp_path)
    attrs = read_attrs(store)
    assert attrs["mpp"] == pytest.approx(0.499)
    grid = TileGrid.from_dict(attrs["tile_grid"])
    assert (grid.rows, grid.cols) == (11, 8)
    tissue = read_array(store, "tissue_mask")
    assert 20 < tissue.sum() < 60  # the section covers part of the region
