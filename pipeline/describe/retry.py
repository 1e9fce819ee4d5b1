"""``describe`` again for the slides whose last run failed (``wsi-pipeline retry``), with the run's own settings."""

from __future__ import annotations

from pathlib import Path

from ..core.artefacts import RUN_CONFIG_NAME
from ..core.config import PipelineConfig, load_config
from ..core.errors import DuplicateSlideIdError
from ..core.outputs import Manifest
from .runner import describe_slides


def failed_slide_paths(out_dir: str | Path) -> list[Path]:
    """Paths of the slides whose last describe failed, from the manifest.

    Id collisions are left out: retrying one file alone would hide the clash; rename and run describe instead.
    """
    slides = Manifest(out_dir).slides
    return sorted({Path(r["path"]) for r in slides.values()
                   if r.get("status") == "failed" and r.get("path")
                   and (r.get("error") or {}).get("code") != DuplicateSlideIdError.code})


def retry_failed(out_dir: str | Path, config: PipelineConfig | None = None, runner=None,
                 progress: bool | None = None) -> dict:
    """Describe again only the slides that failed (after the user fixed a file or gave an override).

    Uses the settings of the last run (``OUT/config.yaml``) unless ``config`` is given.
    """
    out_dir = Path(out_dir)
    if config is None:
        saved = out_dir / RUN_CONFIG_NAME
        config = load_config(saved) if saved.exists() else PipelineConfig()
    paths = failed_slide_paths(out_dir)
    if not paths:
        return {"slides": 0, "done": 0, "skipped": 0, "failed": 0, "ignored": 0, "seconds": 0.0}
    return describe_slides(paths, out_dir, config, runner=runner, progress=progress)
