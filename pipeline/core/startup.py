"""Python's cyclic garbage collector during a command's start-up.

Importing a stage creates a few hundred thousand long-lived objects (numba, pydantic, zarr, Dask), and each full
collection the imports trigger scans them all: ~0.15-0.2 s of a short ``describe`` (benchmarks/README.md, tenth
session). The console script pauses the collector before it imports anything (``pause_gc``); when the command starts
its work (``resume_gc``: its log is set up, or ``main`` returns) what exists is frozen, never scanned again (and not
touched in the pages forked workers share), and collection resumes for everything made after. This is the pattern
Python's documentation gives for ``gc.freeze`` before ``fork``.
"""

from __future__ import annotations

import gc

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
