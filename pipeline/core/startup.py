"""Python's cyclic garbage collector during a command's start-up.

Importing a stage creates a few hundred thousand long-lived objects (numba, pydantic, zarr, Dask), and each full
collection the imports trigger scans them all: ~0.15-0.2 s of a short ``describe`` (benchmarks/README.md, tenth
session). The console script pauses the collector before it imports anything (``pause_gc``); when the command starts
its work (``resume_gc``: its log is set up, or ``main`` returns) what exists is frozen, never scanned again (and not
touched in the pages forked workers share), and collection resumes for everything made after. This is the pattern
Python's documentation gives for ``gc.freeze`` before ``fork``.

BLAS gets one thread (``one_blas_thread_env``) before numpy is imported: OpenBLAS starts a pool of one thread per core
when it loads, and the pool spun ~0.07 s of CPU on the 2-core machine during every command's imports; the stages run
in parallel processes anyway, and Dask gives the workers it spawns one BLAS thread (benchmarks/README.md, twentieth
session).
"""

from __future__ import annotations

import gc
import os

BLAS_THREADS_ENV = "OPENBLAS_NUM_THREADS"  # read by numpy's and scipy's OpenBLAS when they load

_paused = False


def pause_gc() -> None:
    """Switch the collector off until ``resume_gc`` (no-op when it is already off: someone else decided)."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def resume_gc() -> None:
    """Freeze what the start-up made and switch the collector back on, if ``pause_gc`` switched it off."""
    global _paused
    if _paused:
        _paused = False
        gc.freeze()
        gc.enable()


def one_blas_thread_env() -> None:
    """One OpenBLAS thread for this process and those it starts, unless the environment already says how many."""
    os.environ.setdefault(BLAS_THREADS_ENV, "1")
