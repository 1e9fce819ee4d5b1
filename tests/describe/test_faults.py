"""Faults with real processes: a Dask worker killed mid-slide, the whole run killed with SIGKILL and started again,
two runs on one output directory, and DICOM files OpenSlide cannot read.

To act "mid-slide" deterministically, the workers load a Dask preload script (``distributed.worker.preload``) that
makes each describe block sleep a little before doing its real work: the slides and the pipeline code are unchanged,
only the window in which a process can be killed gets wider.
"""

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dask
import distributed  # noqa: F401 - its config defaults must be loaded before dask.config.set below, whose undo
# would otherwise delete the whole "distributed" section it did not see (later clusters then fail with KeyError)
import numpy as np
import psutil
import pytest

from pipeline.core.config import config_from_dict
from pipeline.core.outputs import LOCK_NAME
from pipeline.core.parallel import LocalRunner, task_runner
from pipeline.core.store import list_stores, progress_dir, read_array, read_attrs, store_path
from pipeline.describe.runner import describe_slides
from tests.conftest import write_test_slide

BIN = Path(sys.executable).parent
ARRAYS = ("descriptors", "tissue_mask", "tissue_fraction", "thumbnail")
CHUNK_TILES = 4
CONFIG_YAML = f"""
tiling: {{mpp: 0.5, tile_px: 64, chunk_tiles: {CHUNK_TILES}}}
cluster: {{workers: 2, dashboard: false}}
"""
CONFIG = config_from_dict({"tiling": {"mpp": 0.5, "tile_px": 64, "chunk_tiles": CHUNK_TILES},
                           "cluster": {"workers": 2, "dashboard": False}})

SLOW_BLOCKS = """
# Dask worker preload for tests/describe/test_faults.py: each describe block waits {delay} s before its real work.
# Dask may run a preload more than once in a process: wrap the real function, never an earlier wrapper.
import time

import pipeline.describe.blocks as _describe


def _install(real):
    def slow_describe_block(*args, **kwargs):
        time.sleep({delay})
        return real(*args, **kwargs)

    slow_describe_block.__wrapped__ = real
    _describe.describe_block = slow_describe_block


_install(getattr(_describe.describe_block, "__wrapped__", _describe.describe_block))
"""


@pytest.fixture(scope="module")
def big_slides(tmp_path_factory) -> Path:
    """Three slides of 3000x2500 px at 0.25 µm/px: 19x23 tiles of 64 px at 0.5 µm/px, 30 blocks of 4x4 tiles each."""
    root = tmp_path_factory.mktemp("big_slides")
    for i in range(3):
        write_test_slide(root / f"big-{i}.svs", width=3000, height=2500, seed=20 + i, lesion=i == 1)
    return root


@pytest.fixture(scope="module")
def slow_preload(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("preload") / "slow_blocks.py"
    path.write_text(SLOW_BLOCKS.format(delay=0.25))
    return path


@pytest.fixture(scope="module")
def reference(big_slides, tmp_path_factory) -> Path:
    """An uninterrupted in-process run of the three slides."""
    out = tmp_path_factory.mktemp("reference")
    summary = describe_slides([big_slides], out, CONFIG, runner=LocalRunner(), progress=False)
    assert summary["done"] == 3
    return out


def assert_same_stores(out: Path, ref: Path, slide_ids) -> None:
    for slide_id in slide_ids:
        for name in ARRAYS:
            # assert_array_equal treats NaN (non-tissue tiles) as equal when in the same places
            np.testing.assert_array_equal(read_array(store_path(out, slide_id), name),
                                          read_array(store_path(ref, slide_id), name), err_msg=f"{slide_id} {name}")


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process exited (code {proc.returncode}) before {what}")
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def markers(out: Path, slide_id: str) -> set[str]:
    folder = progress_dir(out, slide_id)
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def chunk_file(store: Path, marker: str) -> Path:
    """The Zarr v3 chunk file of the block whose progress marker is ``r0_c0``."""
    r0, c0 = (int(v) for v in marker.split("_"))
    return store / "descriptors" / f"c.{r0 // CHUNK_TILES}.{c0 // CHUNK_TILES}.0"


def tissue_blocks(store: Path) -> int:
    tissue = read_array(store, "tissue_mask")
    rows, cols = tissue.shape
    return sum(bool(tissue[r:r + CHUNK_TILES, c:c + CHUNK_TILES].any())
               for r in range(0, rows, CHUNK_TILES) for c in range(0, cols, CHUNK_TILES))


def kill_process_group(proc: subprocess.Popen) -> None:
    """SIGKILL a run started with start_new_session=True: the CLI process and its Dask scheduler and workers."""
    family = [proc] + [psutil.Process(p.pid) for p in psutil.Process(proc.pid).children(recursive=True)]
    pids = [p.pid for p in family]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    gone, alive = psutil.wait_procs([psutil.Process(p) for p in pids[1:] if psutil.pid_exists(p)], timeout=15)
    assert not alive, f"processes of the killed run survived: {alive}"


# --- a worker process killed mid-slide ------------------------------------------------------------------------------


def _busy_worker(client, out: Path, slide_ids) -> str | None:
    """A worker running a task while some blocks are already written and no slide is finished yet."""
    if not any(len(markers(out, s)) >= 2 for s in slide_ids) or list_stores(out):
        return None
    busy = [addr for addr, keys in client.processing().items() if any("call_task" in str(k) for k in keys)]
    return busy[0] if busy else None


@pytest.mark.slow
def test_worker_killed_mid_slide_is_rescheduled_and_the_run_completes(big_slides, slow_preload, reference, tmp_path):
    # the reference's slides: the cohort's stain target (median over its slides) is then the same
    slides = [big_slides / f"big-{i}.svs" for i in range(3)]
    slide_ids = ["big-0", "big-1", "big-2"]
    out = tmp_path / "out"
    pool = ThreadPoolExecutor(1)
    try:
        with dask.config.set({"distributed.worker.preload": [str(slow_preload)]}), \
                task_runner(CONFIG.cluster) as runner:
            client = runner.client
            pids = client.run(os.getpid)
            assert len(pids) == 2
            run = pool.submit(describe_slides, slides, out, CONFIG, runner=runner, progress=False)
            victim = wait_for(lambda: _busy_worker(client, out, slide_ids), 60, "blocks written and a busy worker")
            done_at_kill = {s: len(markers(out, s)) for s in slide_ids}
            os.kill(pids[victim], signal.SIGKILL)
            summary = run.result(timeout=120)
            after = client.run(os.getpid)
    finally:
        pool.shutdown(wait=False)  # on failure, closing the cluster above has already ended the run's thread
    assert pids[victim] not in after.values()  # the killed process is gone; the nanny started a new one
    assert all(n < tissue_blocks(store_path(out, s)) for s, n in done_at_kill.items())  # it was mid-slide
    assert summary["done"] == 3 and summary["failed"] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert {s: manifest["slides"][s]["status"] for s in slide_ids} == {s: "done" for s in slide_ids}
    assert_same_stores(out, reference, slide_ids)
    assert not list((out / "slides").glob("*.partial"))


# --- the whole run killed with SIGKILL, then started again ------------------------------------------------------------


def _describe_cmd(slides, out: Path, config: Path, *extra: str) -> list[str]:
    return [str(BIN / "wsi-pipeline"), "describe", "--slides", *map(str, slides), "--out", str(out),
            "--config", str(config), *extra]


def _slow_env(preload: Path) -> dict:
    return {**os.environ, "DASK_DISTRIBUTED__WORKER__PRELOAD": json.dumps([str(preload)])}


def _finished_and_partial(out: Path) -> bool:
    """At least one slide complete and another one part-way (a partial store with written chunks)."""
    partial = [p for p in (out / "slides").glob("*.zarr.partial")] if (out / "slides").is_dir() else []
    return bool(list_stores(out)) and any(markers(out, p.name[: -len(".zarr.partial")]) for p in partial)


@pytest.mark.slow
def test_run_killed_with_sigkill_resumes_only_the_missing_work(big_slides, slow_preload, reference, tmp_path):
    out = tmp_path / "out"
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG_YAML)
    cmd = _describe_cmd([big_slides], out, config)
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(cmd, env=_slow_env(slow_preload), start_new_session=True, stdout=log, stderr=log)
        try:
            wait_for(lambda: _finished_and_partial(out), 90, "one finished slide and one partial store", first)
        finally:
            kill_process_group(first)

    # what the killed run left behind
    done_before = {p.name[: -len(".zarr")] for p in list_stores(out)}
    holder = json.loads((out / LOCK_NAME).read_text())
    assert holder["pid"] == first.pid  # a stale lock of a dead process
    stamps, unfinished = {}, {}
    for partial in (out / "slides").glob("*.zarr.partial"):
        slide_id = partial.name[: -len(".zarr.partial")]
        written = markers(out, slide_id)
        stamps[slide_id] = {m: chunk_file(partial, m).stat().st_mtime_ns for m in written}
        unfinished[slide_id] = tissue_blocks(partial) - len(written)
    assert any(stamps.values()) and any(n > 0 for n in unfinished.values())  # killed part-way through a slide
    finished_stamps = {s: (store_path(out, s) / "zarr.json").stat().st_mtime_ns for s in done_before}
    killed_ns = time.time_ns()

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr  # the stale lock did not block it
    n_done = 3 - len(done_before)
    assert f"describe: slides 3, done {n_done}, skipped {len(done_before)}, failed 0" in rerun.stdout
    assert not (out / LOCK_NAME).exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert {r["status"] for r in manifest["slides"].values()} == {"done"} and len(manifest["slides"]) == 3
    assert manifest["runs"][-1]["skipped"] == len(done_before)
    rerun_log = max((out / "logs").glob("*-describe-*.log"), key=lambda p: p.stat().st_mtime_ns).read_text()
    for slide_id in ("big-0", "big-1", "big-2"):
        assert (f"slide {slide_id} done" in rerun_log) == (slide_id not in done_before)
    # finished slides untouched; chunks finished before the kill kept, the missing ones computed now
    for slide_id, stamp in finished_stamps.items():
        assert (store_path(out, slide_id) / "zarr.json").stat().st_mtime_ns == stamp
    for slide_id, kept in stamps.items():
        store = store_path(out, slide_id)
        for marker, stamp in kept.items():
            assert chunk_file(store, marker).stat().st_mtime_ns == stamp, (slide_id, marker)
        redone = [f for f in (store / "descriptors").glob("c.*") if f.is_file()
                  and f not in {chunk_file(store, m) for m in kept}]
        assert len(redone) == unfinished[slide_id]
        assert all(f.stat().st_mtime_ns > killed_ns for f in redone)
    assert_same_stores(out, reference, ["big-0", "big-1", "big-2"])
    assert not list((out / "slides").glob("*.partial"))


# --- two runs on one output directory ---------------------------------------------------------------------------------


def test_second_run_on_the_same_output_refuses_naming_the_holder(big_slides, slow_preload, tmp_path):
    out = tmp_path / "out"
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG_YAML)
    cmd = _describe_cmd([big_slides], out, config, "--workers", "1")

    def lock_of_first():
        try:
            return json.loads((out / LOCK_NAME).read_text()).get("pid") == first.pid
        except (OSError, ValueError):
            return False

    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(cmd, env=_slow_env(slow_preload), start_new_session=True, stdout=log, stderr=log)
        try:
            wait_for(lock_of_first, 60, "the first run to take the lock", first)
            second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            assert first.poll() is None  # the first run was still working all along
            assert lock_of_first()  # and still holds its lock: the refused run touched nothing
        finally:
            kill_process_group(first)
    assert second.returncode == 2
    assert f"pid {first.pid}" in second.stderr and "command 'describe'" in second.stderr
    assert str(out / LOCK_NAME) in second.stderr and "Fix:" in second.stderr
    assert "Traceback" not in second.stderr


# --- DICOM files OpenSlide cannot read ----------------------------------------------------------------------------


def test_unreadable_dicom_files_fail_with_typed_codes_and_the_rest_goes_on(fixtures_dir, tmp_path):
    import pydicom

    dicom = (fixtures_dir / "boxes_0.dcm").read_bytes()  # a 16x16 px DICOM WSI instance at 0.499 µm/px
    slides = tmp_path / "slides"
    slides.mkdir()
    write_test_slide(slides / "good.svs", width=700, height=600, seed=3)
    (slides / "broken-scan.dcm").write_bytes(dicom[:3000])  # cut inside its metadata: no reader can open it
    files = {"noise/noise.dcm": np.random.default_rng(1).bytes(len(dicom)),  # random bytes named .dcm
             "cut/cut-pixels.dcm": dicom[:-500],  # opens, but its pixel data is cut short
             # DICOM folders often name their instances alike: given as files, each clash keeps its own record
             **{f"other-{x}/scan.dcm": dicom[:3000] for x in "abc"}}
    for name, data in files.items():
        (tmp_path / name).parent.mkdir()
        (tmp_path / name).write_bytes(data)
    # a valid VL whole-slide series whose instances lack ImageType: OpenSlide "Couldn't get image flavor", wsidicom
    # finds no level; the file is fine, the format is not one any reader supports
    (tmp_path / "no-image-type").mkdir()
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        ds = pydicom.dcmread(fixtures_dir / name)
        del ds.ImageType
        ds.save_as(tmp_path / "no-image-type" / name)
    inputs = [slides, tmp_path / "noise", tmp_path / "cut", tmp_path / "no-image-type",
              *(tmp_path / f"other-{x}" / "scan.dcm" for x in "abc")]
    out = tmp_path / "out"
    config = config_from_dict({"tiling": {"mpp": 0.5, "tile_px": 8}})  # tiles small enough for a 16-px slide
    summary = describe_slides(inputs, out, config, runner=LocalRunner(), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())["slides"]
    outcome = {key: (r["status"], (r["error"] or {}).get("code"), str(Path(r["path"]).relative_to(tmp_path)))
               for key, r in manifest.items()}
    assert outcome.pop("good") == ("done", None, "slides/good.svs")
    assert outcome.pop("broken-scan") == ("failed", "corrupt_slide", "slides/broken-scan.dcm")
    assert outcome.pop("noise") == ("failed", "unsupported_format", "noise")  # a folder of instances is one slide
    assert outcome.pop("cut") == ("failed", "unreadable_tiles", "cut")
    assert outcome.pop("no-image-type") == ("failed", "unsupported_format", "no-image-type")
    assert "ImageType (0008,0008)" in manifest["no-image-type"]["error"]["message"]
    assert outcome.pop("scan") == ("failed", "corrupt_slide", "other-a/scan.dcm")  # first in sorted order keeps the id
    assert sorted(outcome.values()) == [("failed", "duplicate_slide_id", "other-b/scan.dcm"),
                                        ("failed", "duplicate_slide_id", "other-c/scan.dcm")]
    for record in manifest.values():
        if record["status"] == "failed":
            assert record["path"] in record["error"]["message"] and "Fix:" in record["error"]["message"]
    assert (summary["slides"], summary["done"], summary["failed"]) == (8, 1, 7)
    assert read_attrs(store_path(out, "good"))["complete"]
    assert [p.name for p in (out / "slides").glob("*.zarr")] == ["good.zarr"]
