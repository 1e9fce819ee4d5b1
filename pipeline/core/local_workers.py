"""How local Dask workers start and what they are given: forked or spawned (``worker_start_method``), glibc's malloc
thresholds (``WORKER_MALLOC``), a heap the garbage collector leaves alone (``gc_frozen``), and the cluster settings a
local batch run needs (``LOCAL_CLUSTER_CONFIG``, ``quicken_local_start``). ``core.parallel.task_runner`` starts the
cluster with them; each value's measurements are in benchmarks/README.md."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from typing import Iterator

from .cluster_config import ClusterConfig


# Dask starts workers with MALLOC_TRIM_THRESHOLD_ set, which switches off glibc's adaptive mmap threshold: every
# temporary array above 128 KiB then becomes a fresh mapping with page faults, and describe runs 2-3x slower on
# workers (benchmarks/README.md). Fixed thresholds keep tile- and thumbnail-sized temporaries on the heap and the freed
# heap mapped (up to 128 MiB per worker), so a task reuses pages instead of faulting them in again: spawned workers
# get them through their environment (WORKER_ENV), forked ones inherit them from this process (``use_worker_malloc``).
WORKER_MALLOC = {"MMAP_THRESHOLD": 32 * 1024 * 1024, "TRIM_THRESHOLD": 128 * 1024 * 1024}
WORKER_ENV = {f"MALLOC_{name}_": str(value) for name, value in WORKER_MALLOC.items()}
_MALLOPT_PARAMS = {"TRIM_THRESHOLD": -1, "MMAP_THRESHOLD": -3}  # glibc's M_TRIM_THRESHOLD, M_MMAP_THRESHOLD


def use_worker_malloc() -> bool:
    """Give this process WORKER_MALLOC (glibc's ``mallopt``), before it forks workers; False where there is no glibc
    (macOS, musl): the allocator's own defaults then stay."""
    import ctypes

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return False
    return all(mallopt(_MALLOPT_PARAMS[key], value) == 1 for key, value in WORKER_MALLOC.items())


@contextlib.contextmanager
def gc_frozen() -> Iterator[None]:
    """Python's garbage collector leaves the objects that exist on entry alone (``gc.freeze``), in this process and in
    the processes it forks meanwhile. A forked worker's first full collection otherwise walks every object it
    inherited (~156,000 once a describe run has imported its modules), writing to each one's header, so that every
    page they lie on is copied: ~90 ms of CPU and ~38 MB in each worker, within its first task or before it
    (benchmarks/README.md, nineteenth session). Objects made later are collected as usual. On exit the objects are
    handed back to the collector (``gc.unfreeze``) unless something had frozen objects before (the console script's
    start-up, ``core.startup``): those stay frozen, with the ones frozen here."""
    frozen_before = gc.get_freeze_count()
    gc.freeze()
    try:
        yield
    finally:
        if not frozen_before:
            gc.unfreeze()


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """BLAS (numpy's OpenBLAS) on one thread in this process, and in the workers it forks meanwhile, as Dask gives the
    workers it spawns (``OPENBLAS_NUM_THREADS=1``). Forked workers otherwise inherit the command's pool (one thread per
    core), and after each BLAS call of the command's start-up a pool thread spun ~0.1 s on a core the imports and the
    plan-ahead child needed (benchmarks/README.md, twentieth session). The setting is restored on exit."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        yield


def worker_env_config() -> dict:
    """Dask's pre-spawn environment with WORKER_ENV added (set as one whole key: no dotted-key inserts to undo)."""
    import dask

    current = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    return {"distributed.nanny.pre-spawn-environ": {**current, **WORKER_ENV}}


# Dask's periodic housekeeping that a local batch run pays for and does not use: the statistical profiler samples every
# worker's task thread every 10 ms (for the bokeh dashboard's profile page; it takes the GIL from the tile loop), and
# every process checks its event loop every 20 ms (the 3 s "unresponsive" warning still works at a 1 s tick). Off / 1 s
# here: 5-15% less worker CPU and ~0.2 s less client CPU on the 1-Gpx slide (benchmarks/README.md, ninth session).
# A worker takes its next task from the scheduler when it finishes one (saturation 1.0), instead of holding one queued
# (1.1): a slide's last blocks then go to whichever worker is free, not to one still busy with a large block while
# the other idles (up to a block's time, ~0.1 s of a 2 s slide on 2 workers).
# Every process also samples host CPU, memory, network and disk for the dashboard's plots every 0.5 s, and each nanny
# and worker reads its worker's memory every 0.1 s (to pause it at 80% of its limit and restart it at 95%): every 2 s /
# 0.5 s here (the limits still act within half a second), about a quarter of the CPU the scheduling process and the
# workers' event loops spend beside the tile loops during a run (benchmarks/README.md, twelfth session).
LOCAL_CLUSTER_CONFIG = {"distributed.worker.profile.enabled": False, "distributed.admin.tick.interval": "1s",
                        "distributed.scheduler.worker-saturation": 1.0,
                        "distributed.admin.system-monitor.interval": "2s",
                        "distributed.worker.memory.monitor-interval": "500ms"}


# A local cluster is up when each nanny has seen its worker start, which it checks every 50 ms: 15-25 ms of waiting per
# command after the workers registered (every 5 ms here). Workers register with package versions each process reads
# once (~7.5 ms): read before the fork, they are inherited (benchmarks/README.md, thirteenth session).
NANNY_START_POLL_S = 0.005


def quicken_local_start(fork: bool) -> None:
    """Before a local cluster starts in this process: nannies that see a started worker within
    ``NANNY_START_POLL_S``, and (``fork``) the versions the workers report read once, for them to inherit."""
    from distributed.nanny import WorkerProcess
    from distributed.versions import get_versions

    poll_s = getattr(WorkerProcess, "_init_msg_interval", None)  # distributed's private attribute: kept if absent
    if isinstance(poll_s, (int, float)):
        WorkerProcess._init_msg_interval = min(poll_s, NANNY_START_POLL_S)
    if fork:
        get_versions()  # cached per process (the scheduler here reads them too when the first worker registers)


# Modules that are not safe to fork once loaded (their thread pools and device state do not survive a fork):
# onnxruntime too, whose session thread pools, once run in the parent (the encoder check), hung a forked worker.
FORK_UNSAFE_MODULES = ("tensorflow", "jax", "torch", "onnxruntime")


def worker_start_method(cluster: ClusterConfig) -> str:
    """'fork' or 'spawn' for local workers (``cluster.worker_start``). Forked workers inherit this process's imports
    and its malloc settings, so they start in ~0.1 s instead of importing numpy, OpenSlide, zarr, numba... again."""
    if cluster.worker_start != "auto":
        return cluster.worker_start
    if not sys.platform.startswith("linux") or any(name in sys.modules for name in FORK_UNSAFE_MODULES):
        return "spawn"
    return "fork"


def default_worker_count() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
