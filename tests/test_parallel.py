"""The Dask side: SLURM job scripts, and a real scheduler + worker processes on loopback giving the local result."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import config_from_dict, load_config
from pipeline.parallel import LocalRunner, TaskFailure, call_task, make_slurm_cluster
from pipeline.errors import NoTissueError
from pipeline.store import read_array

REPO = Path(__file__).resolve().parent.parent
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


@pytest.fixture
def dask_cluster(tmp_path):
    """A real `dask scheduler` and two `dask worker` processes on loopback."""
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
        for _ in range(2):
            procs.append(subprocess.Popen([str(BIN / "dask"), "worker", address, "--nthreads", "1",
                                           "--no-dashboard", "--name", f"w{len(procs)}"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
        from distributed import Client

        with Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


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
