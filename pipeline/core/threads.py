"""A small per-process thread pool for C work that releases the GIL (libjpeg-turbo decodes, zstd compression).

Dask runs one task per worker thread; inside a task, such work can use a core that the worker's neighbours leave
idle, e.g. while a single slide's plan (its thumbnail) runs and every other worker waits for it. When all cores are
busy the threads only take turns, so the pool is small and used only for batches of sizeable pieces.
"""

from __future__ import annotations

import os
from typing import Any, Callable

THREADS_PER_TASK = 2
_POOLS: dict[int, Any] = {}  # pid -> pool: a pool does not survive a fork, so each process makes its own


def map_threads(fn: Callable, items: list) -> list:
    """``[fn(item) for item in items]`` run on the pool, results in order; the first exception is raised."""
    if len(items) < 2:
        return [fn(item) for item in items]
    pool = _POOLS.get(os.getpid())
    if pool is None:
        from concurrent.futures import ThreadPoolExecutor

        pool = _POOLS[os.getpid()] = ThreadPoolExecutor(THREADS_PER_TASK, thread_name_prefix="pipeline")
    return list(pool.map(fn, items))
