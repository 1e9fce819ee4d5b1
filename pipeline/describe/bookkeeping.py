"""What the describe runner does around its tasks: kernels loaded before workers fork, manifest records written at
intervals, and a record rebuilt from a complete store (when the manifest lagged behind a crash)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..core.config import PipelineConfig
from ..core.jit import no_blas_probe
from ..core.outputs import Manifest
from ..core.store import package_versions, read_attrs, store_path
from ..core.zarr_files import load_codecs
from ..slides.morphology import load_kernels as load_mask_kernels
from ..slides.pixels import load_kernels as load_shrink_kernels
from ..slides.qc import registry as qc_registry
from ..slides.readers import load_modules as load_reader_modules
from ..slides.stain.transform import load_kernels as load_stain_kernels
from .descriptors import compute_descriptors

MANIFEST_SAVE_S = 1.0  # the manifest is rewritten at most this often while slides finish (and always at the end)


def load_kernels(config: PipelineConfig) -> None:
    """Load the compiled kernels a describe task uses (shrink; mask labelling; the stain transform; the stats
    descriptor), in this process, and what its first task would otherwise import or look up (the TIFF reader's
    modules, the QC detectors, the package versions stores record, the chunk codec): a forked worker inherits them,
    so a single slide's plan, which every block waits for, does not pay them (~0.05 s of its 0.17 s on the 1-Gpx
    slide). Run where tasks run in this process too: the first kernel is loaded without numba's BLAS probe."""
    load_reader_modules()
    load_codecs()
    qc_registry()
    package_versions()
    with no_blas_probe():
        load_shrink_kernels()
    load_mask_kernels()
    load_stain_kernels(config.stain.method)
    if config.descriptor.name == "stats":  # learned encoders load their framework: never before a fork
        compute_descriptors(np.zeros((1, 8, 8, 3), np.uint8), config.descriptor)


class ManifestRecords:
    """Per-slide manifest records, the file rewritten at most every ``MANIFEST_SAVE_S``: one rewrite per slide made a
    directory of small slides quadratic (19 ms per rewrite at 200 slides). Stores, not the manifest, decide what a
    rerun redoes; ``record_from_store`` fills a record the manifest lost."""

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self._saved = time.monotonic()

    def __call__(self, slide_id: str, **fields) -> None:
        self.manifest.slides.setdefault(slide_id, {}).update(fields)
        if time.monotonic() - self._saved >= MANIFEST_SAVE_S:
            self.manifest.save()
            self._saved = time.monotonic()


def record_from_store(out_dir: Path, slide_id: str, path: Path) -> dict:
    """The manifest record of a complete store, from its attributes."""
    attrs = read_attrs(store_path(out_dir, slide_id)) or {}
    return {"status": "done", "error": None, "path": str(path), "mpp": attrs.get("mpp"),
            "mpp_source": attrs.get("mpp_source"), "tiles": attrs.get("tiles", 0), "seconds": attrs.get("seconds"),
            "store": str(store_path(out_dir, slide_id)), "reader": attrs.get("reader"),
            "reader_fallback_regions": attrs.get("reader_fallback_regions", 0), "qc": attrs.get("qc")}
