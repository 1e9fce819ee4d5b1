"""What a run holds, for the viewer: one record per slide of ``OUT/manifest.json``, its store and its files.

The manifest is the only way in: a slide id that is not one of its keys is unknown, and every file the viewer reads
is named here from the run's own records (the store, ``cam/<id>.geojson``, the slide file and the annotation file the
run read), never from a URL.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..core.artefacts import CAM_DIR, METRICS_JSON
from ..core.errors import NoRunError
from ..core.outputs import MANIFEST_NAME
from ..core.store import array_attrs, read_attrs, store_path
from ..report.records import read_predictions, slide_row

def scalar_details(record: dict) -> dict[str, object]:
    """Every number or short string of a manifest record and its stage records, as ``stage.key`` (what the page
    lists as the slide's metrics; a stage that adds a field shows up without a change here)."""
    out: dict[str, object] = {}

    def add(prefix: str, rec: dict) -> None:
        for key, value in rec.items():
            if isinstance(value, bool) or value is None:
                continue
            if isinstance(value, (int, float)) or (isinstance(value, str) and len(value) <= 80
                                                   and key not in ("path", "store", "picture")):
                out[f"{prefix}{key}"] = value
            elif isinstance(value, dict) and key not in ("stages", "error", "files", "computed_on"):
                add(f"{prefix}{key}.", value)

    add("", {k: v for k, v in record.items() if k != "stages"})
    for stage, srec in (record.get("stages") or {}).items():
        if isinstance(srec, dict):
            add(f"{stage}.", srec)
    return out


@dataclass
class SlideEntry:
    """One slide of the run: its manifest record, prediction row and where its files are."""

    slide_id: str
    record: dict
    prediction: dict = field(default_factory=dict)
    store: Path | None = None
    attrs: dict | None = None

    def summary(self) -> dict:
        """The row of the slide list: the report's slide-table columns (``report.records``)."""
        return slide_row(self.slide_id, self.record, self.prediction)


class RunCatalog:
    """The slides of one output directory, read once when the viewer starts (the run is not changed)."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir).resolve()
        # read here, not through ``Manifest``: that one sets a damaged manifest aside, and the viewer writes nothing
        try:
            manifest = json.loads((self.out_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise NoRunError(f"cannot read {MANIFEST_NAME} ({err})", path=self.out_dir) from None
        predictions = read_predictions(self.out_dir)
        metrics_path = self.out_dir / METRICS_JSON
        self.metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
        self.slides: dict[str, SlideEntry] = {}
        for slide_id, record in sorted((manifest.get("slides") or {}).items()):
            store = store_path(self.out_dir, slide_id)
            attrs = read_attrs(store)
            complete = bool(attrs and attrs.get("complete"))
            self.slides[slide_id] = SlideEntry(slide_id, record, predictions.get(slide_id, {}),
                                               store if complete else None, attrs if complete else None)

    def get(self, slide_id: str) -> SlideEntry | None:
        return self.slides.get(slide_id)

    def slide_file(self, entry: SlideEntry) -> tuple[Path | None, str]:
        """The slide file the run described, or None and the path the run had (the file moved or was deleted)."""
        candidates: list[Path] = []
        recorded = (entry.attrs or {}).get("slide_path") or entry.record.get("path")
        if not recorded:
            return None, ""
        recorded_path = Path(recorded)
        if recorded_path.is_absolute():
            candidates.append(recorded_path)
        else:  # relative to where the run was started: the working directory, or the output's parent
            candidates += [Path.cwd() / recorded_path, self.out_dir.parent / recorded_path]
        for path in candidates:
            if path.is_file() or path.is_dir():
                return path, str(recorded)
        return None, str(recorded)

    def regions(self, entry: SlideEntry) -> list[dict]:
        """GeoJSON FeatureCollections drawn on the slide: the CAM's hot regions and the annotation file the run read
        for the slide (recorded in its store's ``tile_annotation`` array)."""
        sources = [("CAM hot regions", self.out_dir / CAM_DIR / f"{entry.slide_id}.geojson")]
        annotation_file = ((array_attrs(entry.store, "tile_annotation") or {}) if entry.store else {}).get("file")
        if annotation_file:
            sources.append(("annotations", Path(annotation_file)))
        found = []
        for kind, path in sources:
            if path.is_file():
                try:
                    data = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                    continue
                found.append({"name": kind, "collection": data})
        return found
