"""Compiled kernels: numba's ``njit`` when numba imports, else ``None`` so each caller keeps its numpy/PIL path.

numba is a dependency; the fallback only keeps a broken or unusual install (a Python numba does not support yet)
working, more slowly. ``cache=True``: each kernel is compiled once per machine (seconds) and then loaded from disk.
"""

from __future__ import annotations

try:
    import numba
except ImportError:  # pragma: no cover - see the module docstring
    numba = None


def njit(fn=None, *, fastmath=False):
    """``fn`` compiled (nopython, GIL released, cached on disk), or None without numba.

    ``fastmath``: LLVM fast-math flags for this kernel only (e.g. ``{"reassoc"}`` lets a float reduction vectorise).
    """
    if fn is None:
        return lambda f: njit(f, fastmath=fastmath)
    return numba.njit(cache=True, nogil=True, fastmath=fastmath)(fn) if numba is not None else None
