"""Output-directory bookkeeping: atomic file writes, the run manifest and the output lock.

Every file is written under a temporary name in the same directory and then renamed over the target, so an
interrupted run leaves either the old file or the new one, never half of one. Only the client process (never a
worker) writes the manifest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import psutil

from .errors import OutputLockedError

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() would give; mkstemp's 0600 would hide outputs from the lab's group

MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".wsi-pipeline.lock"


def atomic_write_bytes(path: str | Path, data: bytes, sync: bool = True) -> Path:
    """Write ``data`` under a temporary name beside ``path`` and rename it over ``path`` (folders made as needed).
    ``sync=False``: no fsync before the rename (Zarr chunk files: one per block, as zarr itself writes them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


@contextmanager
def atomic_output_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so writers pick the format); rename it on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.fchmod(fd, FILE_MODE)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def replace_directory(new: str | Path, target: str | Path) -> Path:
    """Move the complete directory ``new`` to ``target`` (same file system), replacing what is there: the old
    directory is renamed aside first and removed afterwards, so ``target`` is always the old or the new one whole."""
    new, target = Path(new), Path(target)
    trash = None
    if target.exists():
        trash = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, trash)
    os.replace(new, target)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return target


class Manifest:
    """``OUT/manifest.json``: one record per slide plus run history. Saved atomically after every change."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / MANIFEST_NAME
        self.data: dict = {"slides": {}, "ignored": [], "runs": []}
        if self.path.exists():
            try:
                loaded = json.loads(self.path.read_text(encoding="utf-8"))
                if isinstance(loaded, dict):
                    self.data.update(loaded)
            except json.JSONDecodeError:
                # Only possible if someone edited it by hand: keep a copy and start a fresh one.
                self.path.rename(self.path.with_suffix(f".corrupt-{int(time.time())}.json"))

    @property
    def slides(self) -> dict:
        return self.data["slides"]

    def update_slide(self, slide_id: str, **fields: Any) -> None:
        self.slides.setdefault(slide_id, {}).update(fields)
        self.save()

    def update_stage(self, slide_id: str, stage: str, **fields: Any) -> None:
        """Per-stage status of later stages lives under the slide's ``stages`` key."""
        record = self.slides.setdefault(slide_id, {})
        record.setdefault("stages", {}).setdefault(stage, {}).update(fields)
        self.save()

    def set_stage(self, slide_id: str, stage: str, record: dict) -> None:
        """Replace a slide's record of ``stage`` (not saved: call ``save`` once after a batch of them)."""
        self.slides.setdefault(slide_id, {}).setdefault("stages", {})[stage] = record

    def record_run(self, command: str, summary: dict) -> None:
        """Append a command's summary to the run history and save."""
        self.data["runs"].append({"command": command, "finished": time.time(), **summary})
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, self.data)


def _lock_holder(lock_path: Path) -> dict | None:
    try:
        return json.loads(lock_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


_HELD: dict[Path, int] = {}  # lock path -> nesting depth in this process


@contextmanager
def output_lock(out_dir: str | Path, command: str = "") -> Iterator[Path]:
    """Refuse a second run on the same output directory while the first is alive (stale locks are taken over).

    Re-entrant within one process, so ``run`` can hold the lock across all its stages while each stage takes it too.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock_path = (out_dir / LOCK_NAME).resolve()
    if _HELD.get(lock_path):
        _HELD[lock_path] += 1
        try:
            yield lock_path
        finally:
            _HELD[lock_path] -= 1
        return
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "started": time.time()}
    for _ in range(2):
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(lock_path)
            alive = (holder is not None and holder.get("host") == socket.gethostname()
                     and psutil.pid_exists(int(holder.get("pid", -1))))
            if holder is not None and (alive or holder.get("host") != socket.gethostname()):
                raise OutputLockedError(
                    f"another run holds this output directory (pid {holder.get('pid')} on {holder.get('host')}, "
                    f"command '{holder.get('command', '')}')",
                    path=lock_path,
                ) from None
            lock_path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        break
    else:
        raise OutputLockedError("could not take the output lock", path=lock_path)
    _HELD[lock_path] = 1
    try:
        yield lock_path
    finally:
        _HELD.pop(lock_path, None)
        holder = _lock_holder(lock_path)
        if holder and holder.get("pid") == me["pid"]:
            lock_path.unlink(missing_ok=True)


def log_file_handler(out_dir: str | Path, command: str) -> tuple[logging.Handler, Path]:
    """A file handler for ``OUT/logs/<time>-<command>-<pid>.log`` (opened on the first record: a run refused by
    the output lock leaves no empty file; the pid keeps same-second runs apart)."""
    log_dir = Path(out_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{command}-{os.getpid()}.log"
    handler = logging.FileHandler(path, encoding="utf-8", delay=True)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    return handler, path


@contextmanager
def log_file(out_dir: str | Path, command: str) -> Iterator[Path]:
    """The ``pipeline`` logger also writes to its own log file for the block (a task on a worker, whose log records
    would otherwise stay in the worker's console)."""
    logger = logging.getLogger("pipeline")
    handler, path = log_file_handler(out_dir, command)
    old_level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield path
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(old_level)
