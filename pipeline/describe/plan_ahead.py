"""The run's largest new slide planned (or, with a stain pass, surveyed) in a forked copy of the command while Dask is
imported and the local cluster starts, and the next new slides surveyed after it (largest first, the runner's order).

Importing ``distributed`` costs ~0.2 s of one core, and starting a local cluster ~0.1 s more, before any task runs.
The first slide's plan task (metadata, thumbnail, tissue mask, partial store) then ran on one worker while the other
waited, and its blocks were dispatched only after it: the first ~0.15 s of a 2 s run on the 1-gigapixel slide, with a
core idle. Planned in a child process forked before the import, on the core the import leaves idle, the slide's blocks
go to the workers as soon as they start (benchmarks/README.md, eighteenth session). A thread does not do: the import
and the plan's many numpy calls hand the GIL back and forth, and each took twice as long.

The child runs the plan task's own function (``plan_and_describe``): a one-block slide is described whole, a larger one
gets its partial store, exactly as on a worker; its outcome comes back pickled through a pipe. With a stain pass, which
surveys every slide before any plan, the child runs that slide's survey instead (``survey_new_slide``:
thumbnail, tissue mask, stain estimate, the thumbnail kept for the plan), ~0.2 s of the 1-gigapixel slide that a
worker ran while the other waited. Then it hashes the next new slides' fingerprints (the command needs them all before
its first task with a stain pass) and surveys them one by one, until the run begins and collects it: their plan tasks
(and the stain pass) take those surveys instead of reading the slides again (nineteenth session). It is forked where
local workers are (``worker_start_method``), before any thread of Dask exists. If it dies (a reader that crashes), the
slide's own tasks do its work, where a crash is retried and recorded.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import signal
import struct
import time
from pathlib import Path

from ..core.config import PipelineConfig
from ..core.local_workers import gc_frozen, worker_start_method
from ..core.parallel import Done, TaskFailure, TaskRetry, item_outcome
from ..core.store import store_path
from ..slides.annotations import described_fingerprint
from .encoders import Encoder, encoder_info
from .grouping import largest_first
from .small_slides import plan_and_describe
from .stain_cohort import survey_new_slide

log = logging.getLogger("pipeline")
WAIT_S = 600.0  # a plan takes well under a second, a few seconds for a huge slide on a slow share


class PlanAhead:
    """``plan_and_describe`` (``kind`` "plan") or ``survey_new_slide`` ("survey") of one slide in a forked child
    process, started at construction. After it, the child hashes the ``described_fingerprint`` of ``next_slides``
    (slide id -> path: later slides without a store), then surveys them one by one (``survey_new_slide``: metadata,
    reader, thumbnail and tissue mask kept for their plans, with a stain pass their estimate), until ``wait``
    collects it."""

    def __init__(self, slide_id: str, args: tuple, config: PipelineConfig, out_dir: Path,
                 next_slides: dict[str, Path] | None = None, kind: str = "plan"):
        self.slide_id = slide_id
        self.kind = kind
        self.started = time.monotonic()
        self.fingerprints: dict[str, str] = {}  # of ``next_slides``, those the child had made when collected
        self.surveys: dict[str, dict] = {}  # of ``next_slides``, those the child had surveyed when collected
        self._done: Done | None = None
        self._waited = False
        read_end, write_end = os.pipe()
        with gc_frozen():  # the child's collections leave the objects it inherits alone (as the workers')
            self._pid = os.fork()
            if self._pid == 0:  # the child: plan, send the outcome, leave without running the command's exit handlers
                code = 1
                try:
                    os.close(read_end)
                    with os.fdopen(write_end, "wb", buffering=0) as pipe:
                        # its result, typed error (TaskFailure) or unexpected error (TaskRetry), as a group's item
                        fn = survey_new_slide if kind == "survey" else plan_and_describe
                        _send(pipe, pickle.dumps(item_outcome(fn, *args)))
                        _work_ahead(pipe, next_slides or {}, config, out_dir)
                    code = 0
                finally:
                    os._exit(code)
        os.close(write_end)
        self._read_end = read_end

    def wait(self) -> None:
        """Collect the child's outcome (once), and the fingerprints and surveys it has made by now (it is then
        stopped). A child silent for ``WAIT_S`` (stuck, e.g. on a lock another thread held when it was forked) is
        killed and the slide left to a worker."""
        if self._waited:
            return
        self._waited = True
        frames = _read_frames(self._read_end, time.monotonic() + WAIT_S)
        os.kill(self._pid, signal.SIGKILL)  # done planning: hashing and surveying the next slides is all it may do
        os.waitpid(self._pid, 0)
        for frame in frames[1:]:
            what, other_id, value = pickle.loads(frame)  # our own child's bytes, through a pipe: never a file
            (self.fingerprints if what == "fingerprint" else self.surveys)[other_id] = value
        tag = ("prepare", (self.slide_id,))
        if not frames:  # the child died or was stopped before its outcome came
            log.info("slide %s: the child planning it did not finish; a worker %ss it", self.slide_id, self.kind)
            return
        value = pickle.loads(frames[0])
        if isinstance(value, TaskRetry):
            log.info("slide %s: planning it here failed (%s); a worker %ss it", self.slide_id, value.message,
                     self.kind)
        elif isinstance(value, TaskFailure):
            self._done = Done(tag, error=value.error)
        else:
            self._done = Done(tag, value)

    def new_fingerprints(self) -> dict[str, str]:
        """Slide id -> ``described_fingerprint`` of the later new slides the child hashed before it was collected."""
        self.wait()
        if self.fingerprints:
            log.info("%d new slides fingerprinted while Dask was imported", len(self.fingerprints))
        return self.fingerprints

    def outcome(self) -> Done | None:
        """The plan task's outcome (its result, or its typed error); None after an unexpected error or the child's
        death: a worker then plans the slide."""
        self.wait()
        return self._done


FRAME_HEADER = struct.Struct("<Q")  # each message through the pipe: its length, then its bytes


def _send(pipe, payload: bytes) -> None:
    pipe.write(FRAME_HEADER.pack(len(payload)) + payload)


def _read_frames(fd: int, deadline: float) -> list[bytes]:
    """The whole messages that came through the pipe ``fd``: blocking (until ``deadline``) for the first, then only
    what is there already. ``fd`` is closed."""
    buffer = bytearray()
    frames: list[bytes] = []
    try:
        while True:
            wait_s = max(0.0, deadline - time.monotonic()) if not frames else 0.0
            if not select.select([fd], [], [], wait_s)[0]:
                return frames
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return frames
            buffer += chunk
            while len(buffer) >= FRAME_HEADER.size:
                size = FRAME_HEADER.unpack_from(buffer)[0]
                if len(buffer) < FRAME_HEADER.size + size:
                    break
                frames.append(bytes(buffer[FRAME_HEADER.size:FRAME_HEADER.size + size]))
                del buffer[:FRAME_HEADER.size + size]
    finally:
        os.close(fd)


def _work_ahead(pipe, next_slides: dict[str, Path], config: PipelineConfig, out_dir: Path) -> None:
    """The child's work after its slide: every next slide's fingerprint (the command needs them all before its
    first task with a stain pass), then each one's survey. A slide whose survey fails is left to its own tasks, which
    record why."""
    fingerprints = {}
    for slide_id, path in next_slides.items():
        fingerprints[slide_id] = described_fingerprint(path, config.annotations.dir, slide_id)
        _send(pipe, pickle.dumps(("fingerprint", slide_id, fingerprints[slide_id])))
    for slide_id, path in next_slides.items():
        try:
            survey = survey_new_slide(str(path), config, str(out_dir), slide_id, fingerprints[slide_id])
        except Exception:  # noqa: BLE001 - typed or not, the slide's own survey or plan task meets it again
            continue
        _send(pipe, pickle.dumps(("survey", slide_id, survey)))


def plan_ahead(ids: dict[str, Path], out_dir: Path, config: PipelineConfig, encoder: Encoder) -> PlanAhead | None:
    """Start planning the largest slide of ``ids`` that has no store (with a stain pass: surveying it; the runner too
    takes the largest first), when a local cluster is about to start and the encoder loads no model framework (a
    one-block slide's tiles are encoded by its plan task, and a framework loaded here would keep the workers from
    being forked)."""
    cluster = config.cluster
    if cluster.kind != "local" or not cluster.plan_while_starting or encoder.learned \
            or worker_start_method(cluster) != "fork":
        return None
    new = {slide_id: path for slide_id, path in ids.items() if not store_path(out_dir, slide_id).is_dir()}
    if not new:
        return None
    new = dict(largest_first(list(new.items()), lambda item: item[1]))  # the runner's order: the largest first
    slide_id, path = next(iter(new.items()))
    new.pop(slide_id)
    if config.stain.method != "none":  # every slide is surveyed before any is planned
        return PlanAhead(slide_id, (str(path), config, str(out_dir), slide_id), config, out_dir, new, kind="survey")
    args = (str(path), config, str(out_dir), slide_id, None, encoder_info(encoder), None, None, None)
    return PlanAhead(slide_id, args, config, out_dir, new)


def take_planned(ahead: PlanAhead | None, todo: list) -> list[tuple[object, Done]]:
    """The slide ``ahead`` planned, as [(its job in ``todo``, its plan task's ``Done``)], the job taken out of
    ``todo`` and its clock set to the plan's start; [] when nothing was planned (an unexpected error: a worker plans
    it)."""
    done = ahead.outcome() if ahead is not None and ahead.kind == "plan" else None
    job = None if done is None else next((j for j in todo if j.slide_id == ahead.slide_id), None)
    if job is None:
        return []
    todo.remove(job)
    job.started = ahead.started
    log.info("slide %s planned while Dask was imported", job.slide_id)
    return [(job, done)]


def take_surveyed(ahead: PlanAhead | None) -> dict[str, dict]:
    """Slide id -> ``survey_new_slide`` of the slides ``ahead`` surveyed: the next new slides it got to and, with a
    stain pass, its own slide (unless its survey failed: a worker surveys it again, where a typed error is recorded as
    the stain pass records it)."""
    if ahead is None:
        return {}
    done = ahead.outcome()
    surveys = dict(ahead.surveys)
    if ahead.kind == "survey" and done is not None and done.error is None:
        surveys[ahead.slide_id] = done.result
    if surveys:
        log.info("%d new slides surveyed while Dask started", len(surveys))
    return surveys
