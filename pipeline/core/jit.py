"""Compiled kernels: numba's ``njit`` when numba imports, else ``None`` so each caller keeps its numpy/PIL path.

numba is a dependency; the fallback only keeps a broken or unusual install (a Python numba does not support yet)
working, more slowly. ``cache=True``: each kernel is compiled once per machine (seconds) and then loaded from disk.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

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


BLAS_PROBE = "scipy.linalg.cython_blas"


@contextlib.contextmanager
def no_blas_probe() -> Iterator[None]:
    """Around a process's first compiled kernel: numba then loads its registries, and one of them checks for scipy's
    BLAS by importing ``scipy.linalg.cython_blas``, i.e. all of ``scipy.linalg`` (~0.17 s of a describe command's
    start). No kernel here calls BLAS, so the check is told it is absent (for this process, numba then computes
    np.correlate / np.convolve of floats in its own loop; jitted np.dot still finds BLAS when it is compiled)."""
    blocked = BLAS_PROBE not in sys.modules
    if blocked:
        sys.modules[BLAS_PROBE] = None  # an import of it raises ImportError
    try:
        yield
    finally:
        if blocked and BLAS_PROBE in sys.modules and sys.modules[BLAS_PROBE] is None:
            del sys.modules[BLAS_PROBE]
