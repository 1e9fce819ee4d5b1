"""The run's first new slide planned in a forked copy of the command while Dask is imported, before the local
cluster starts.

Importing ``distributed`` costs ~0.2 s of one core before a local cluster can start. The first slide's plan task
(metadata, thumbnail, tissue mask, partial store) then ran on one worker while the other waited, and its blocks were
dispatched only after it: the first ~0.15 s of a 2 s run on the 1-gigapixel slide, with a core idle. Planned in a child
process forked before the import, on the core the import leaves idle, the slide's blocks go to the workers as soon as
they start (benchmarks/README.md, eighteenth session). A thread does not do: the import and the plan's many numpy
calls hand the GIL back and forth, and each took twice as long.

The child runs the plan task's own function (``plan_and_describe``): a one-block slide is described whole, a larger one
gets its partial store, exactly as on a worker; its outcome comes back pickled through a pipe. It is forked where
local workers are (``worker_start_method``), before any thread of Dask exists. If it dies (a reader that crashes), a
worker plans the slide, where a crash is retried and recorded.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import signal
import time
from pathlib import Path

from ..core.config import PipelineConfig
from ..core.local_workers import worker_start_method
from ..core.parallel import Done, TaskFailure, call_task
from ..core.store import store_path
from .encoders import Encoder, encoder_info
from .small_slides import plan_and_describe

log = logging.getLogger("pipeline")
WAIT_S = 600.0  # a plan takes well under a second, a few seconds for a huge slide on a slow share


class PlanAhead:
    """``plan_and_describe`` of one slide in a forked child process, started at construction."""

    def __init__(self, slide_id: str, path: Path, args: tuple):
        self.slide_id = slide_id
        self.path = path
        self.started = time.monotonic()
        self._done: Done | None = None
        self._waited = False
        read_end, write_end = os.pipe()
        self._pid = os.fork()
        if self._pid == 0:  # the child: plan, send the outcome, leave without running the command's exit handlers
            code = 1
            try:
                os.close(read_end)
                outcome = _outcome(args)
                with os.fdopen(write_end, "wb") as pipe:
                    pipe.write(outcome)
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        self._read_end = read_end

    def wait(self) -> None:
        """Collect the child's outcome (once). A child silent for ``WAIT_S`` (stuck, e.g. on a lock another thread
        held when it was forked) is killed and the slide left to a worker."""
        if self._waited:
            return
        self._waited = True
        data = _read_until_closed(self._read_end, time.monotonic() + WAIT_S)
        if data is None:
            os.kill(self._pid, signal.SIGKILL)
        os.waitpid(self._pid, 0)
        tag = ("prepare", (self.slide_id,))
        try:
            kind, value = pickle.loads(data)  # our own child's bytes, through a pipe: never a file
        except Exception:  # noqa: BLE001 - the child died or was stopped (nothing or part of it came back)
            log.info("slide %s: the child planning it did not finish; a worker plans it", self.slide_id)
            return
        if kind == "unexpected":
            log.info("slide %s: planning it here failed (%s); a worker plans it", self.slide_id, value)
        elif isinstance(value, TaskFailure):
            self._done = Done(tag, error=value.error)
        else:
            self._done = Done(tag, value)

    def outcome(self) -> Done | None:
        """The plan task's outcome (its result, or its typed error); None after an unexpected error or the child's
        death: a worker then plans the slide."""
        self.wait()
        return self._done


def _read_until_closed(fd: int, deadline: float) -> bytes | None:
    """All that comes through the pipe ``fd`` until its writer closes its end, or None at ``deadline``; ``fd`` is
    closed either way."""
    chunks = []
    try:
        while True:
            if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                return None
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def _outcome(args: tuple) -> bytes:
    """The pickled ("done", result or TaskFailure) or ("unexpected", message) of ``plan_and_describe(*args)``."""
    try:
        return pickle.dumps(("done", call_task(plan_and_describe, *args)))
    except Exception as err:  # noqa: BLE001 - reported to the parent, which leaves the slide to a worker
        return pickle.dumps(("unexpected", f"{type(err).__name__}: {err}"))


def plan_ahead(ids: dict[str, Path], out_dir: Path, config: PipelineConfig, encoder: Encoder) -> PlanAhead | None:
    """Start planning the first slide of ``ids`` (``assign_slide_ids``' order, the runner's) that has no store, when a
    local cluster is about to start for a run whose plans need nothing from the other slides: no stain pass (it
    surveys every slide first) and an encoder that loads no model framework (a one-block slide's tiles are encoded by
    its plan task, and a framework loaded here would keep the workers from being forked)."""
    cluster = config.cluster
    if cluster.kind != "local" or not cluster.plan_while_starting or config.stain.method != "none" or encoder.learned \
            or worker_start_method(cluster) != "fork":
        return None
    for slide_id, path in ids.items():
        if not store_path(out_dir, slide_id).is_dir():
            args = (str(path), config, str(out_dir), slide_id, None, encoder_info(encoder), None, None, None)
            return PlanAhead(slide_id, path, args)
    return None


def take_planned(ahead: PlanAhead | None, todo: list) -> list[tuple[object, Done]]:
    """The slide ``ahead`` planned, as [(its job in ``todo``, its plan task's ``Done``)], the job taken out of
    ``todo`` and its clock set to the plan's start; [] when nothing was planned (an unexpected error: a worker plans
    it)."""
    done = ahead.outcome() if ahead is not None else None
    job = next((j for j in todo if done is not None and j.slide_id == ahead.slide_id), None)
    if job is None:
        return []
    todo.remove(job)
    job.started = ahead.started
    log.info("slide %s planned while Dask was imported", job.slide_id)
    return [(job, done)]
