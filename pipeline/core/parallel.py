"""Where tasks run: in this process, or on a Dask distributed cluster (local processes, an address, SLURM).

Stages talk to a small ``TaskRunner`` interface (``submit`` a function, ``next_done`` to collect one finished
task) so the same orchestration code runs in-process for lab scripts and tests and on any Dask cluster, and results
are identical by construction. Functions given to ``submit`` must be module-level and receive only paths and plain
data: each task opens its own slide handle.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from .cluster_config import ClusterConfig
from .errors import ConfigError, PipelineError
from .local_workers import (LOCAL_CLUSTER_CONFIG, default_worker_count, gc_frozen, quicken_local_start,
                            use_worker_malloc, worker_env_config, worker_start_method)

log = logging.getLogger("pipeline")


@dataclass
class TaskFailure:
    """A task's expected failure (a PipelineError), returned as a value so Dask does not retry or log it."""

    error: BaseException


def call_task(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run a task function on a worker; typed pipeline errors come back as ``TaskFailure``."""
    try:
        return fn(*args, **kwargs)
    except PipelineError as err:
        return TaskFailure(err)


@dataclass
class TaskRetry:
    """An unexpected error of one item of a grouped task (``call_each``): the caller runs that item again alone, as
    its own task (with Dask's retries), so one item never fails the others of its group."""

    message: str


def item_outcome(fn: Callable, *args: Any) -> Any:
    """``fn(*args)`` as one item of a grouped task: its result, a ``TaskFailure`` (typed error, final) or a
    ``TaskRetry`` (unexpected error: the caller runs the item again alone)."""
    try:
        return fn(*args)
    except PipelineError as err:
        return TaskFailure(err)
    except Exception as err:  # noqa: BLE001 - run again alone by the caller
        return TaskRetry(f"{type(err).__name__}: {err}")


def call_each(fn: Callable, arg_list: list[tuple]) -> list:
    """``fn(*args)`` for each ``args`` in one task (several small items: one task's overhead instead of one each).
    Returns one outcome per item, in order (``item_outcome``)."""
    return [item_outcome(fn, *args) for args in arg_list]


def group_size(waiting: int, capacity: int, mean_weight: float | None, target_weight: float,
               max_group: int = 8) -> int:
    """How many waiting items (e.g. slides) the next task takes: 1 while their size is unknown (``mean_weight`` None:
    nothing finished yet), else as many as make ``target_weight`` at the mean weight seen (e.g. a few hundred tiles),
    at most ``max_group`` and at most ``waiting / (2 x capacity)``: groups shrink towards the end, so the workers
    finish together (guided self-scheduling; with 4 x capacity the directory's last tasks were mostly single slides,
    and each task costs ~5 ms of CPU: benchmarks/README.md, fourteenth session)."""
    if not mean_weight or waiting <= 1:
        return 1
    by_weight = int(target_weight // max(mean_weight, 1e-9))
    return max(1, min(max_group, by_weight, -(-waiting // (2 * max(1, capacity)))))


def _done(tag: Any, result: Any) -> "Done":
    if isinstance(result, TaskFailure):
        return Done(tag, error=result.error)
    return Done(tag, result)


@dataclass
class Done:
    tag: Any
    result: Any = None
    error: BaseException | None = None


class LocalRunner:
    """Runs each task in this process when it is collected (no parallelism, no pickling)."""

    capacity = 1
    dashboard_link = None

    def __init__(self):
        self._queue: collections.deque = collections.deque()

    def submit(self, fn: Callable, *args: Any, tag: Any = None, resources: dict | None = None, **kwargs: Any) -> None:
        self._queue.append((tag, fn, args, kwargs))

    def pending(self) -> int:
        return len(self._queue)

    def next_done(self) -> Done:
        tag, fn, args, kwargs = self._queue.popleft()
        try:
            return _done(tag, call_task(fn, *args, **kwargs))
        except Exception as err:  # noqa: BLE001 - reported per task, like a remote failure
            return Done(tag, error=err)


class DaskRunner:
    """Submits to a ``distributed.Client``.

    A task whose worker dies is rescheduled by Dask itself (up to ``distributed.scheduler.allowed-failures``);
    ``retries`` re-runs a task that raised an unexpected error (typed pipeline errors are final and not retried).
    """

    def __init__(self, client, retries: int = 2, dashboard: bool = True):
        from distributed import as_completed

        self.client = client
        self.retries = retries
        self._tags: dict = {}
        self._ac = as_completed([], with_results=False)
        info = client.scheduler_info()
        self.capacity = max(1, sum(w.get("nthreads", 1) for w in info.get("workers", {}).values()))
        self.dashboard_link = getattr(client, "dashboard_link", None) if dashboard else None

    def submit(self, fn: Callable, *args: Any, tag: Any = None, resources: dict | None = None, **kwargs: Any) -> None:
        future = self.client.submit(call_task, fn, *args, pure=False, retries=self.retries, resources=resources, **kwargs)
        self._tags[future.key] = tag
        self._ac.add(future)

    def pending(self) -> int:
        return self._ac.count()

    def run_one(self, fn: Callable, *args: Any, resources: dict | None = None, **kwargs: Any) -> Any:
        """Run one task to completion outside the ``next_done`` queue; a typed pipeline error is raised here."""
        future = self.client.submit(call_task, fn, *args, pure=False, retries=self.retries, resources=resources,
                                    **kwargs)
        try:
            result = future.result()
        finally:
            future.release()
        if isinstance(result, TaskFailure):
            raise result.error
        return result

    def gpu_workers(self, wait_s: float = 0.0) -> list[str]:
        """Addresses of the workers that advertise a ``GPU`` resource, waiting up to ``wait_s`` for one to join."""
        deadline = time.monotonic() + wait_s
        while True:
            workers = self.client.scheduler_info(n_workers=-1).get("workers", {})
            found = sorted(a for a, w in workers.items() if (w.get("resources") or {}).get("GPU", 0) >= 1)
            if found or time.monotonic() >= deadline:
                return found
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))

    def next_done(self) -> Done:
        future = next(self._ac)
        tag = self._tags.pop(future.key)
        try:
            if future.status == "error":
                return Done(tag, error=future.exception())
            return _done(tag, future.result())
        except Exception as err:  # noqa: BLE001 - cancelled, lost, deserialisation errors
            return Done(tag, error=err)
        finally:
            future.release()


@dataclass
class Task:
    """One task for ``run_bounded``: ``fn(*args)`` submitted with ``tag`` (and Dask ``resources``, e.g. GPU=1)."""

    fn: Callable
    args: tuple
    tag: Any
    resources: dict | None = None


def in_flight_limit(runner, cluster: ClusterConfig) -> int:
    """Tasks a stage keeps submitted at once: ``cluster.max_tasks_in_flight``, else four per worker thread."""
    return cluster.max_tasks_in_flight or 4 * max(1, runner.capacity)


def run_bounded(runner, next_task: Callable[[], Task | None], max_in_flight: int,
                meanwhile: Callable[[], None] | None = None) -> Iterator[Done]:
    """Keep up to ``max_in_flight`` tasks submitted and yield each one as it finishes.

    ``next_task`` is asked for work whenever there is room, so the caller may add tasks (and decide their order) as
    results come in; None means nothing to submit now. Ends when nothing is in flight and ``next_task`` has nothing.
    ``meanwhile``: called once, after the first tasks are submitted and before waiting for one (bookkeeping the
    workers need not wait for); not called when there was nothing to submit.
    """
    in_flight = 0
    while True:
        while in_flight < max_in_flight:
            task = next_task()
            if task is None:
                break
            runner.submit(task.fn, *task.args, tag=task.tag, resources=task.resources)
            in_flight += 1
        if not in_flight:
            return
        if meanwhile is not None:
            meanwhile()
            meanwhile = None
        done = runner.next_done()
        in_flight -= 1
        yield done


def make_slurm_cluster(cluster: ClusterConfig):
    """A dask-jobqueue SLURMCluster from ``cluster.slurm`` (keyword arguments of SLURMCluster), not yet scaled.

    ``cluster.slurm`` may hold ``gpus_per_job``: the jobs then request GPUs (``--gres=gpu:N``) and their workers
    advertise a ``GPU`` resource, so GPU stages land on them in a mixed cluster.
    """
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ConfigError("cluster.kind 'slurm' needs dask-jobqueue",
                          fix="pip install 'wsi-pipeline[slurm]' (or dask-jobqueue).") from None
    kwargs = {k: v for k, v in cluster.slurm.items() if v is not None}
    gpus = int(kwargs.pop("gpus_per_job", 0) or 0)
    if gpus:
        kwargs["job_extra_directives"] = [*kwargs.get("job_extra_directives", []), f"--gres=gpu:{gpus}"]
        kwargs["worker_extra_args"] = [*kwargs.get("worker_extra_args", []), "--resources", f"GPU={gpus}"]
    kwargs.setdefault("cores", 4)
    kwargs.setdefault("memory", "16GB")
    kwargs.setdefault("processes", kwargs["cores"])
    return SLURMCluster(**kwargs)


GPU_RESOURCES = {"GPU": 1}


def gpu_placement(runner, cluster: ClusterConfig | None) -> list[str]:
    """The GPU workers a model stage (train, Grad-CAM) should run on, or [] to run it in this process.

    Dask only starts a task that asks for ``resources={"GPU": 1}`` on a worker advertising that resource and would
    wait forever without one, so this looks first: in a mixed cluster (CPU workers for describe, GPU workers started
    with ``--resources GPU=1`` or SLURM ``gpus_per_job``) the model stages go to the GPU workers.
    """
    mode = cluster.gpu_placement if cluster is not None else "client"
    if mode == "client" or not isinstance(runner, DaskRunner):
        return []
    expected = mode == "gpu_worker" or (cluster.kind == "slurm" and int(cluster.slurm.get("gpus_per_job") or 0) > 0)
    found = runner.gpu_workers(wait_s=cluster.gpu_wait_s if expected else 0.0)
    if not found and mode == "gpu_worker":
        raise ConfigError(
            f"cluster.gpu_placement is 'gpu_worker' but no worker advertised a GPU resource within "
            f"{cluster.gpu_wait_s:g} s",
            fix="start GPU workers with `dask worker SCHEDULER --resources GPU=1` (SLURM: set slurm.gpus_per_job), "
                "or set cluster.gpu_placement: client to run the model stages in this process.")
    if found:
        log.info("model stage placed on GPU worker(s): %s", ", ".join(found))
    return found


def current_dask_worker():
    """The Dask worker this code runs on, or None. A process that never imported ``distributed`` is on none: asking
    it would import it (~0.25 s in a command that describes one slide in-process)."""
    if "distributed" not in sys.modules:
        return None
    from distributed import get_worker

    try:
        return get_worker()
    except ValueError:
        return None


def where_am_i() -> dict:
    """Host, pid and (on a Dask worker) the worker address: recorded with model-stage outputs."""
    import socket

    worker = current_dask_worker()
    return {"host": socket.gethostname(), "pid": os.getpid(), "worker": worker.address if worker else None}


@contextlib.contextmanager
def task_runner(cluster: ClusterConfig | None, in_process: bool = False) -> Iterator[LocalRunner | DaskRunner]:
    """The runner for a config: in-process, a new LocalCluster of processes, an existing scheduler, or SLURM."""
    if in_process or cluster is None:
        yield LocalRunner()
        return
    import dask
    from distributed import Client, LocalCluster

    if cluster.kind == "address":
        with Client(cluster.address, timeout="30s") as client:
            log.info("connected to Dask scheduler %s", cluster.address)
            yield DaskRunner(client, cluster.retries)
        return
    if cluster.kind == "slurm":
        with make_slurm_cluster(cluster) as slurm, Client(slurm) as client:
            slurm.scale(jobs=cluster.slurm_jobs)
            yield DaskRunner(client, cluster.retries)
        return
    workers = cluster.workers or default_worker_count()
    dashboard = ":0" if cluster.dashboard else None
    method = {"distributed.worker.multiprocessing-method": worker_start_method(cluster)}
    fork = method["distributed.worker.multiprocessing-method"] == "fork"
    if fork:
        use_worker_malloc()
    quicken_local_start(fork)
    settings = {**worker_env_config(), **method, **LOCAL_CLUSTER_CONFIG}
    with gc_frozen() if fork else contextlib.nullcontext(), dask.config.set(settings), \
            LocalCluster(n_workers=workers, threads_per_worker=cluster.threads_per_worker, processes=True,
                         memory_limit=cluster.memory_limit, dashboard_address=dashboard,
                         silence_logs=logging.ERROR) as lc, Client(lc) as client:
        yield DaskRunner(client, cluster.retries, dashboard=cluster.dashboard)


@contextlib.contextmanager
def runner_for(runner, cluster: ClusterConfig | None) -> Iterator[LocalRunner | DaskRunner]:
    """The given runner, or one made from ``cluster`` for the duration of the block."""
    if runner is not None:
        yield runner
        return
    with task_runner(cluster) as own:
        yield own
