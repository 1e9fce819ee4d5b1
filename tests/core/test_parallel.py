"""The Dask side: SLURM job scripts, and a real scheduler + worker processes on loopback giving the local result."""

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.config import config_from_dict, load_config
from pipeline.core.errors import NoTissueError
from pipeline.core.parallel import (LocalRunner, TaskFailure, TaskRetry, call_each, call_task, group_size,
                                   make_slurm_cluster)
from pipeline.core.store import read_array

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _raise_no_tissue(path):
    raise NoTissueError("nothing here", path=path)


def test_typed_errors_come_back_as_values():
    out = call_task(_raise_no_tissue, "x.svs")
    assert isinstance(out, TaskFailure) and out.error.code == "no_tissue"
    runner = LocalRunner()
    runner.submit(_raise_no_tissue, "y.svs", tag="t")
    done = runner.next_done()
    assert done.tag == "t" and isinstance(done.error, NoTissueError) and "y.svs" in str(done.error)


def _item(x):
    if x == "no tissue":
        raise NoTissueError("nothing here", path="z.svs")
    return 1 / x


def test_a_grouped_task_gives_each_item_its_own_outcome():
    out = call_each(_item, [(2,), ("no tissue",), (0,), (4,)])
    assert out[0] == 0.5 and out[3] == 0.25
    assert isinstance(out[1], TaskFailure) and out[1].error.code == "no_tissue"  # typed: final for that item
    assert isinstance(out[2], TaskRetry) and out[2].message.startswith("ZeroDivisionError")  # to run again alone


def test_groups_follow_the_mean_size_seen_and_shrink_towards_the_end():
    assert group_size(50, 2, None, 256) == 1  # nothing finished yet: sizes unknown
    assert group_size(50, 2, 40.0, 256) == 6  # 256 // 40, below 50 / 4 and the cap
    assert group_size(200, 2, 10.0, 256) == 8  # the cap
    assert group_size(12, 2, 40.0, 256) == 3  # ceil(12 / 4): the last tasks are small
    assert group_size(6, 2, 40.0, 256) == 2
    assert group_size(3, 2, 40.0, 256) == 1
    assert group_size(50, 2, 2000.0, 256) == 1  # big slides stay alone


def test_slurm_job_script_from_workflow():
    pytest.importorskip("dask_jobqueue")
    cluster_cfg = load_config(REPO / "workflows" / "slurm.yaml").cluster
    with make_slurm_cluster(cluster_cfg) as cluster:
        script = cluster.job_script()
    assert "#SBATCH -p normal" in script
    assert "#SBATCH --cpus-per-task=8" in script
    assert "#SBATCH -t 04:00:00" in script
    assert "--nworkers 8" in script


def test_slurm_gpu_jobs_advertise_gpu_resource():
    pytest.importorskip("dask_jobqueue")
    cfg = config_from_dict({"cluster": {"kind": "slurm", "slurm": {"cores": 4, "memory": "8GB", "gpus_per_job": 1}}})
    with make_slurm_cluster(cfg.cluster) as cluster:
        script = cluster.job_script()
    assert "#SBATCH --gres=gpu:1" in script
    assert "--resources GPU=1" in script


@contextlib.contextmanager
def loopback_cluster(tmp_path, workers: list[list[str]]):
    """A real `dask scheduler` and one `dask worker` process per entry of ``workers`` (its extra arguments)."""
    sched_file = tmp_path / "scheduler.json"
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--no-dashboard", "--scheduler-file", str(sched_file)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)]
    try:
        deadline = time.time() + 60
        while not sched_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        address = json.loads(sched_file.read_text())["address"]
        for extra in workers:
            procs.append(subprocess.Popen([str(BIN / "dask"), "worker", address, "--nthreads", "1",
                                           "--no-dashboard", "--name", f"w{len(procs)}", *extra],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
        from distributed import Client

        with Client(address, timeout=30) as client:
            client.wait_for_workers(len(workers), timeout=60)
            resources = {w["name"]: w.get("resources") or {} for w in client.scheduler_info()["workers"].values()}
        yield address, resources
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture
def dask_cluster(tmp_path):
    """Two plain workers."""
    with loopback_cluster(tmp_path, [[], []]) as (address, _):
        yield address


@pytest.mark.slow
def test_external_scheduler_equals_in_process(dask_cluster, cmu_slide, fixtures_dir, tmp_path):
    import pipeline

    config = tmp_path / "cfg.yaml"
    config.write_text("tiling: {mpp: 1.0, tile_px: 64, chunk_tiles: 4}\n")
    out_cluster = tmp_path / "cluster"
    run = subprocess.run([str(BIN / "wsi-pipeline"), "describe", "--slides", str(cmu_slide),
                          str(fixtures_dir / "unopenable.tiff"), "--out", str(out_cluster), "--config", str(config),
                          "--scheduler", dask_cluster], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    manifest = json.loads((out_cluster / "manifest.json").read_text())
    assert manifest["slides"]["cmu-1-small-region"]["status"] == "done"
    assert manifest["slides"]["unopenable"]["error"]["code"] == "unsupported_format"

    local = pipeline.describe_slide(cmu_slide, tmp_path / "local", pipeline.load_config(config))
    a = read_array(out_cluster / "slides" / "cmu-1-small-region.zarr", "descriptors")
    b = read_array(local, "descriptors")
    assert a.shape == b.shape and np.isfinite(a).sum() > 50
    np.testing.assert_array_equal(a, b)  # NaN positions and values identical


# --- model stages on the GPU workers of a mixed cluster ----------------------------------------------------------

TINY_TRAIN = """
train: {recipe: finetune, input_px: 80, batch_size: 8, head_epochs: 2, finetune_epochs: 1, val_fraction: 0.25, test_fraction: 0.25}
"""


@pytest.mark.slow
def test_model_stages_land_on_the_gpu_worker_of_a_mixed_cluster(tmp_path):
    """One CPU worker and one advertising GPU=1 (as `dask worker --resources GPU=1` or SLURM gpus_per_job make):
    training and the Grad-CAM model pass run on the GPU worker; the CAM file rendering may use either."""
    from ..conftest import make_map_cohort

    out = tmp_path / "out"
    labels = make_map_cohort(out, n_per_class=6, seed=3, size_range=(12, 16))
    config = tmp_path / "train.yaml"
    config.write_text(TINY_TRAIN)
    with loopback_cluster(tmp_path, [[], ["--resources", "GPU=1"]]) as (address, resources):
        gpu_worker = next(name for name, res in resources.items() if res.get("GPU"))
        train_run = subprocess.run([str(BIN / "wsi-pipeline"), "train", "--out", str(out), "--labels", str(labels),
                                    "--config", str(config), "--scheduler", address],
                                   capture_output=True, text=True, timeout=600)
        assert train_run.returncode == 0, train_run.stderr[-3000:]
        cam_run = subprocess.run([str(BIN / "wsi-pipeline"), "cam", "--out", str(out), "--config", str(config),
                                  "--scheduler", address], capture_output=True, text=True, timeout=600)
        assert cam_run.returncode == 0, cam_run.stderr[-3000:]
        from distributed import Client

        with Client(address, timeout=30) as client:
            names = {a: w["name"] for a, w in client.scheduler_info()["workers"].items()}
    info = json.loads((out / "model" / "model_info.json").read_text())
    where = info["trained_on"]
    assert names[where["worker"]] == gpu_worker and where["pid"] != os.getpid()
    assert f"on worker {where['worker']}" in train_run.stdout
    assert json.loads((out / "metrics.json").read_text())["n_slides"] == 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(rec["stages"]["cam"]["status"] == "done" for rec in manifest["slides"].values())
    assert {names[rec["stages"]["cam"]["computed_on"]["worker"]] for rec in manifest["slides"].values()} == {gpu_worker}
    assert len(list((out / "cam").glob("*.tiff"))) == 12
    # each model stage left its own log on the shared output directory, written by the worker
    train_log = next((out / "logs").glob("*-train-worker-*.log")).read_text()
    assert "train: 6 train, 3 validation, 3 test slides" in train_log
    assert "Grad-CAM at mixed" in next((out / "logs").glob("*-cam-worker-*.log")).read_text()


def test_gpu_placement_decisions(tmp_path):
    from pipeline.core.errors import ConfigError
    from pipeline.core.parallel import DaskRunner, gpu_placement

    local = config_from_dict({}).cluster
    assert gpu_placement(LocalRunner(), local) == []  # in-process: nothing to place
    with pytest.raises(ConfigError, match="gpu_worker"):
        config_from_dict({"cluster": {"gpu_placement": "gpu_worker"}})  # a local cluster has no GPU workers
    strict = config_from_dict({"cluster": {"kind": "address", "address": "tcp://x:1", "gpu_placement": "gpu_worker",
                                           "gpu_wait_s": 0.5}}).cluster
    with loopback_cluster(tmp_path, [[]]) as (address, _):
        from distributed import Client

        with Client(address, timeout=30) as client:
            runner = DaskRunner(client)
            assert gpu_placement(runner, local) == []  # auto: no GPU worker, so this process
            t0 = time.monotonic()
            with pytest.raises(ConfigError, match="no worker advertised a GPU") as err:
                gpu_placement(runner, strict)
            assert time.monotonic() - t0 >= 0.5 and "--resources GPU=1" in err.value.fix


def test_run_bounded_does_its_bookkeeping_once_the_first_tasks_are_submitted():
    """``meanwhile`` runs once, after the first tasks went out and before any result is waited for (the workers do
    not wait for it), and not at all when there was nothing to run."""
    from pipeline.core.parallel import LocalRunner, Task, run_bounded

    events: list[str] = []

    class Recording(LocalRunner):
        def submit(self, fn, *args, **kwargs):
            events.append(f"submit {args[0]}")
            super().submit(fn, *args, **kwargs)

        def next_done(self):
            events.append("wait")
            return super().next_done()

    tasks = iter([Task(abs, (-1,), "a"), Task(abs, (-2,), "b"), Task(abs, (-3,), "c")])
    results = [d.result for d in run_bounded(Recording(), lambda: next(tasks, None), 2,
                                             lambda: events.append("meanwhile"))]
    assert sorted(results) == [1, 2, 3]
    assert events[:4] == ["submit -1", "submit -2", "meanwhile", "wait"]
    assert events.count("meanwhile") == 1
    nothing: list[str] = []
    assert list(run_bounded(Recording(), lambda: None, 2, lambda: nothing.append("meanwhile"))) == []
    assert nothing == []
