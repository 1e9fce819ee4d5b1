"""Small slides several to a task: each Dask task costs milliseconds of client and worker CPU, a small slide's plan and
its one block tens of milliseconds, so a directory of small slides spent a large share of its time scheduling.

The slides waiting for their plan task are taken one at a time until the first ones are planned (their tile counts
are then known; surveyed slides' counts are known before), then as many as make ``GROUP_TILES`` tissue tiles, fewer
towards the end (``group_size``). A group task runs each slide on its own (``call_each``, or the task function's own
``each``): a slide's typed error fails that slide only; an unexpected error (or the whole task lost with its worker)
sends the slide back to be run alone, as before grouping.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ..core.parallel import Done, Task, TaskFailure, TaskRetry, call_each, group_size

GROUP_TILES = 512  # tissue tiles per group task: two full 16 x 16 blocks, "hundreds of tiles per task"
MAX_GROUP = 8  # slides per task at most


def slide_bytes(path: str | Path) -> int:
    """A slide's size on disk: its file's, or the files' of a folder (a DICOM series); 0 when it cannot be read (the
    slide's task says why)."""
    try:
        if os.path.isdir(path):
            return sum(entry.stat().st_size for entry in os.scandir(path) if entry.is_file())
        return os.stat(path).st_size
    except OSError:
        return 0


def largest_first(items: list, path_of: Callable[[object], str]) -> list:
    """``items`` (slides) in descending order of size on disk, a stand-in for their tiles before any is planned (equal
    sizes keep their order): a directory's last tasks are then its smallest slides, and the workers finish closer
    together (largest first, as ``core.task_order`` orders blocks)."""
    return sorted(items, key=lambda item: -slide_bytes(path_of(item)))


class PlanQueue:
    """Slides waiting for a task (in the given order), taken one or several at a time: the describe plan tasks (by
    tissue tiles) and the stain pass's survey tasks (by grid tiles) take their slides from one."""

    def __init__(self, items: list, capacity: int, target_tiles: int | None = None):
        self.waiting = list(reversed(items))  # taken from the end
        self.alone: list = []  # sent back by ``again``: each taken first, in a task of its own
        self.capacity = capacity
        self.target_tiles = GROUP_TILES if target_tiles is None else target_tiles
        self.tiles: list[int] = []  # tiles of the slides done so far, and those known before (``expect``)

    def __len__(self) -> int:
        return len(self.waiting) + len(self.alone)

    def planned(self, tiles: int) -> None:
        self.tiles.append(tiles)

    def expect(self, tiles: list[int]) -> None:
        """Sizes known before any slide is planned (the slides a survey measured): groups from the first task."""
        self.tiles.extend(tiles)

    def sizes_known(self) -> bool:
        """Enough slide sizes are known (one per worker) for their mean to set the groups'."""
        return len(self.tiles) >= self.capacity

    def take(self, grouped: bool = True) -> list:
        """The next item alone, or (``grouped``) the next group; an item sent back (``again``) always goes alone."""
        if self.alone:
            return [self.alone.pop()]
        if not grouped:
            return [self.waiting.pop()]
        mean = sum(self.tiles) / len(self.tiles) if self.sizes_known() else None
        count = group_size(len(self.waiting), self.capacity, mean, self.target_tiles, MAX_GROUP)
        return [self.waiting.pop() for _ in range(count)]

    def again(self, item) -> None:
        """Run ``item`` again, alone, next."""
        self.alone.append(item)


def group_task(fn: Callable, arg_list: list[tuple], tag, each: Callable[[list[tuple]], list] | None = None) -> Task:
    """``fn`` on one slide's arguments as its own task, or on several in one task: through ``each`` (``fn``'s own
    version for a list of arguments, returning what ``call_each`` does), else ``call_each``."""
    if len(arg_list) == 1:
        return Task(fn, arg_list[0], tag)
    return Task(each, (arg_list,), tag) if each is not None else Task(call_each, (fn, arg_list), tag)


def outcomes(done: Done, count: int) -> list[Done]:
    """One ``Done`` per slide of a plan task of ``count`` slides (a group returns ``call_each``'s list); a slide to run
    again alone has ``result`` TaskRetry (every slide of a group task that failed as a whole)."""
    if count == 1:
        return [done]
    if done.error is not None:
        return [Done(done.tag, TaskRetry(f"{type(done.error).__name__}: {done.error}")) for _ in range(count)]
    return [Done(done.tag, error=r.error) if isinstance(r, TaskFailure) else Done(done.tag, r) for r in done.result]
