"""Small slides several to a task: each Dask task costs milliseconds of client and worker CPU, a small slide's plan and
its one block tens of milliseconds, so a directory of small slides spent a large share of its time scheduling.

The slides waiting for their plan task are taken one at a time until the first ones are planned (their tile counts
are then known), then as many as make ``GROUP_TILES`` tissue tiles, fewer towards the end (``group_size``). A group
task runs each slide on its own (``call_each``): a slide's typed error fails that slide only; an unexpected error (or
the whole task lost with its worker) sends the slide back to be run alone, as before grouping.
"""

from __future__ import annotations

from ..core.parallel import Done, TaskFailure, TaskRetry, group_size

GROUP_TILES = 256  # tissue tiles per group task: one full 16 x 16 block, "hundreds of tiles per task"
MAX_GROUP = 8  # slides per task at most


class PlanQueue:
    """Slide jobs waiting for their plan task (in the given order), taken one or several at a time."""

    def __init__(self, jobs: list, capacity: int):
        self.waiting = list(reversed(jobs))  # taken from the end
        self.capacity = capacity
        self.tiles: list[int] = []  # tissue tiles of the slides planned so far

    def __len__(self) -> int:
        return len(self.waiting)

    def planned(self, tiles: int) -> None:
        self.tiles.append(tiles)

    def take(self, grouped: bool) -> list:
        """The next job alone, or (``grouped``) the next group; a job sent back (``again``) always goes alone."""
        first = self.waiting.pop()
        if not grouped or getattr(first, "alone", False):
            return [first]
        mean = sum(self.tiles) / len(self.tiles) if len(self.tiles) >= self.capacity else None
        count = group_size(len(self.waiting) + 1, self.capacity, mean, GROUP_TILES, MAX_GROUP)
        group = [first]
        while len(group) < count and self.waiting and not getattr(self.waiting[-1], "alone", False):
            group.append(self.waiting.pop())
        return group

    def again(self, job) -> None:
        """Run ``job`` again, alone, next."""
        job.alone = True
        self.waiting.append(job)


def outcomes(done: Done, count: int) -> list[Done]:
    """One ``Done`` per slide of a plan task of ``count`` slides (a group returns ``call_each``'s list); a slide to run
    again alone has ``result`` TaskRetry (every slide of a group task that failed as a whole)."""
    if count == 1:
        return [done]
    if done.error is not None:
        return [Done(done.tag, TaskRetry(f"{type(done.error).__name__}: {done.error}")) for _ in range(count)]
    return [Done(done.tag, error=r.error) if isinstance(r, TaskFailure) else Done(done.tag, r) for r in done.result]
