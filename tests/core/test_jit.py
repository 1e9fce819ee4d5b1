"""Compiled kernels (``pipeline.core.jit``): the first kernel of a process loaded without numba's BLAS probe."""

import subprocess
import sys


def test_kernels_load_without_scipy_linalg_and_jitted_blas_still_works():
    """The probe's import is refused only while the kernels load: scipy.linalg stays unimported, and a jitted np.dot
    compiled afterwards still finds BLAS (it imports scipy.linalg then) with numpy's result."""
    code = """
import sys
import numpy as np
from pipeline.core.config import PipelineConfig
from pipeline.core.jit import BLAS_PROBE
from pipeline.describe.bookkeeping import load_kernels
from pipeline.describe.descriptors import compute_descriptors
load_kernels(PipelineConfig())
print('scipy.linalg' in sys.modules, BLAS_PROBE in sys.modules)
tiles = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
print(np.isfinite(compute_descriptors(tiles, PipelineConfig().descriptor)).all())
import numba
a = np.arange(12.0).reshape(3, 4)
print(np.allclose(numba.njit(lambda x, y: np.dot(x, y))(a, a.T), a @ a.T), 'scipy.linalg' in sys.modules)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "False", "True", "True", "True"]


def test_the_probe_is_left_alone_where_scipy_linalg_is_loaded():
    import scipy.linalg.cython_blas  # noqa: F401 - e.g. a lab script that imported scikit-learn first

    from pipeline.core.jit import BLAS_PROBE, no_blas_probe

    module = sys.modules[BLAS_PROBE]
    with no_blas_probe():
        assert sys.modules[BLAS_PROBE] is module
    assert sys.modules[BLAS_PROBE] is module
