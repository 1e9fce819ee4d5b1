"""The garbage collector paused for a command's start-up (``pipeline.core.startup``) and resumed with the start-up's
objects frozen."""

import gc
import subprocess
import sys

import pytest

from pipeline.core import startup


@pytest.fixture
def collector_restored():
    enabled = gc.isenabled()
    yield
    startup.resume_gc()
    gc.unfreeze()
    (gc.enable if enabled else gc.disable)()


def test_pause_then_resume_freezes_what_exists(collector_restored):
    gc.enable()
    startup.pause_gc()
    assert not gc.isenabled()
    made_during_startup = [[i] for i in range(1000)]  # container objects the collector tracks
    startup.resume_gc()
    assert gc.isenabled()
    assert gc.get_freeze_count() >= len(made_during_startup)
    startup.resume_gc()  # a second resume changes nothing
    assert gc.isenabled()


def test_resume_without_pause_leaves_the_collector_alone(collector_restored):
    gc.disable()  # switched off by someone else (e.g. the user's script): not ours to switch on
    startup.pause_gc()
    startup.resume_gc()
    assert not gc.isenabled()
    assert gc.get_freeze_count() == 0


def test_a_command_works_with_the_collector_on(collector_restored, tmp_path, monkeypatch):
    """Every command resumes collection when its work starts (a long report or server never runs without it)."""
    from pipeline import cli
    from pipeline.report import html

    seen = []
    monkeypatch.setattr(html, "build_report", lambda out: seen.append(gc.isenabled()) or tmp_path / "report.html")
    gc.enable()
    startup.pause_gc()
    assert cli.main(["report", "--out", str(tmp_path)]) == 0
    assert seen == [True] and gc.isenabled()


def test_console_script_runs_a_command():
    done = subprocess.run([sys.executable, "-m", "pipeline", "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("wsi-pipeline ")


@pytest.mark.parametrize("given", [None, "2"])
def test_blas_gets_one_thread_before_numpy_loads_unless_the_environment_says(given):
    """The console script's start-up gives OpenBLAS one thread (its pool spun during every command's imports); a count
    the user set is kept."""
    import os

    env = {k: v for k, v in os.environ.items() if k != startup.BLAS_THREADS_ENV}
    if given:
        env[startup.BLAS_THREADS_ENV] = given
    code = ("from pipeline.core.startup import one_blas_thread_env; one_blas_thread_env(); import numpy\n"
            "from threadpoolctl import threadpool_info\n"
            "print(max(i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert int(out) == int(given or 1)
