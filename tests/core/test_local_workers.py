"""Local workers (pipeline/core/local_workers.py): how they start, and the settings their cluster gets."""

from __future__ import annotations

import gc
import sys


def test_local_workers_fork_unless_a_fork_unsafe_framework_is_loaded(monkeypatch):
    import types

    from pipeline.core.config import ClusterConfig
    from pipeline.core.local_workers import FORK_UNSAFE_MODULES, worker_start_method

    for name in FORK_UNSAFE_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    assert worker_start_method(ClusterConfig()) == "fork"
    assert worker_start_method(ClusterConfig(worker_start="spawn")) == "spawn"
    monkeypatch.setitem(sys.modules, "tensorflow", types.ModuleType("tensorflow"))
    assert worker_start_method(ClusterConfig()) == "spawn"  # TensorFlow's threads do not survive a fork
    assert worker_start_method(ClusterConfig(worker_start="fork")) == "fork"
    monkeypatch.delitem(sys.modules, "tensorflow")
    monkeypatch.setitem(sys.modules, "onnxruntime", types.ModuleType("onnxruntime"))
    assert worker_start_method(ClusterConfig()) == "spawn"  # nor onnxruntime's session thread pools
    monkeypatch.delitem(sys.modules, "onnxruntime")
    monkeypatch.setitem(sys.modules, "tensorflow", types.ModuleType("tensorflow"))
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.delitem(sys.modules, "tensorflow")
    assert worker_start_method(ClusterConfig()) == "spawn"


def test_local_cluster_settings_reach_its_scheduler_and_workers():
    """task_runner's local cluster: glibc takes the worker malloc thresholds (inherited by forked workers, in the
    environment of spawned ones), the scheduler hands a worker its next task only when it is free (saturation 1.0),
    and the workers' statistical profiler is off, their memory and the host sampled less often (every key is one of
    Dask's: a misspelt one would be ignored); the nannies look for their started worker every 5 ms (the attribute is
    distributed's: a release that renames it fails here instead of silently waiting 50 ms again)."""
    import dask
    import distributed  # noqa: F401  (its defaults join dask's config when it is imported)
    from distributed.nanny import WorkerProcess

    from pipeline.core.config import ClusterConfig
    from pipeline.core.local_workers import (LOCAL_CLUSTER_CONFIG, NANNY_START_POLL_S, WORKER_ENV, WORKER_MALLOC,
                                             use_worker_malloc)
    from pipeline.core.parallel import task_runner

    missing = object()
    assert all(dask.config.get(key, default=missing) is not missing for key in LOCAL_CLUSTER_CONFIG)

    assert WORKER_ENV == {"MALLOC_MMAP_THRESHOLD_": str(WORKER_MALLOC["MMAP_THRESHOLD"]),
                          "MALLOC_TRIM_THRESHOLD_": str(WORKER_MALLOC["TRIM_THRESHOLD"])}
    if sys.platform.startswith("linux"):
        assert use_worker_malloc() is True
    frozen_before = gc.get_freeze_count()
    with task_runner(ClusterConfig(workers=1, dashboard=False, worker_start="fork")) as runner:
        frozen_in_workers = runner.client.run(lambda: __import__("gc").get_freeze_count())
        saturation = runner.client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.WORKER_SATURATION)
        profiling = runner.client.run(lambda: __import__("dask").config.get("distributed.worker.profile.enabled"))
        monitors = runner.client.run(lambda: [__import__("dask").config.get(key) for key in (
            "distributed.worker.memory.monitor-interval", "distributed.admin.system-monitor.interval")])
    assert saturation == 1.0
    assert WorkerProcess._init_msg_interval == NANNY_START_POLL_S == 0.005
    assert list(profiling.values()) == [False]
    assert list(monitors.values()) == [["500ms", "2s"]]
    # the forked worker's collections leave what it inherited alone; this process's objects go back to the collector
    assert list(frozen_in_workers.values())[0] > frozen_before + 10_000
    assert gc.get_freeze_count() == frozen_before or frozen_before > 0


def test_gc_frozen_freezes_what_exists_and_hands_it_back_unless_frozen_before():
    from pipeline.core.local_workers import gc_frozen

    gc.unfreeze()
    made_before = [[i] for i in range(1000)]  # container objects the collector tracks
    with gc_frozen():
        assert gc.get_freeze_count() >= len(made_before)
    assert gc.get_freeze_count() == 0
    gc.freeze()  # e.g. the console script's start-up (core.startup)
    try:
        earlier = gc.get_freeze_count()
        made_after = [[i] for i in range(1000)]
        with gc_frozen():
            assert gc.get_freeze_count() >= earlier + len(made_after)
        assert gc.get_freeze_count() >= earlier + len(made_after)  # not ours to unfreeze
    finally:
        gc.unfreeze()


def test_one_blas_thread_in_this_process_and_its_forks_then_restored():
    import os

    from threadpoolctl import threadpool_info

    from pipeline.core.local_workers import one_blas_thread

    def blas_threads() -> int:
        return max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")

    before = blas_threads()
    with one_blas_thread():
        assert blas_threads() == 1
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # a forked worker: the setting it inherits
            os.write(write_end, str(blas_threads()).encode())
            os._exit(0)
        os.close(write_end)
        os.waitpid(pid, 0)
        assert int(os.read(read_end, 16)) == 1
        os.close(read_end)
    assert blas_threads() == before
