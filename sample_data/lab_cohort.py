"""A real-texture cohort as a multi-lab study delivers it: two labs' stain, marker ink, out-of-focus regions and a
folder of QuPath annotations (issue 14's closing scenario, for ``benchmarks/real_cohort_run.py`` and the recipe test).

Slides of ``sample_data.textured`` (both classes, small irregular lesions), each one:

* in the second lab's stain (``sample_data.stain_batch``) when it is one of ``stain_batch_ids`` (every other id);
* with two marker strokes and one blurred region (``sample_data.artefacts``) unless ``i % 3 == 2`` (2 of 3 slides);
* with ``annotations/<slide_id>.geojson``: the ``Tumor`` outline of its lesion (class 1), a ``Pen`` outline of its
  first stroke only on every other inked slide (a pathologist marks some ink, not all), an ``Exclude`` ellipse on
  tissue away from the lesion when ``i % 5 == 3``; slides with none of these get an empty FeatureCollection.

Deterministic from ``seed``; ground truth from ``ArtefactTissue`` (ink, blur) and ``TexturedTissue`` (lesion).
"""

from __future__ import annotations

import functools
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.slides.annotations import tile_centres
from sample_data.artefacts import LOW, ArtefactTissue, stroke_alpha, write_geojson
from sample_data.stain_batch import StainBatch, stain_batch_ids
from sample_data.synthetic.writing import atomic_target, slide_spec, write_slide, written_spec
from sample_data.textured import LEVELS, MPP, OBJECTIVE, QUALITY, TILE_PX, TexturedTissue, textured_cohort_plan

__all__ = ["RUN_CONFIG", "LabSlide", "lab_cohort_plan", "make_lab_cohort", "tile_truth", "check_slide", "check_run", "report_rows"]


@dataclass(frozen=True)
class LabSlide:
    """One slide of the cohort: the recipe (cheap to make and to pickle) and, built on first use, the slide."""

    slide_id: str
    label: int
    tissue: TexturedTissue         # the textured slide underneath (``lesion_at_tiles``, ``tissue_at``)
    second_lab: bool
    artefact_seed: int
    artefacts: bool                # two pen strokes and a blurred region
    pen_outlined: tuple[int, ...]  # strokes with a ``Pen`` annotation
    exclude_region: bool

    @functools.cached_property
    def slide(self) -> ArtefactTissue:
        """What is written: the stain batch and artefacts included (~0.15 s to build)."""
        base = StainBatch(self.tissue) if self.second_lab else self.tissue
        return ArtefactTissue(base, seed=self.artefact_seed, pens=2 * self.artefacts, blurs=int(self.artefacts))


def lab_cohort_plan(n_per_class: int, seed: int = 0, width_px: int = 3000, height_px: int = 3000) -> list[LabSlide]:
    """Every slide of the cohort ``make_lab_cohort`` writes, with what was done to it."""
    plan = textured_cohort_plan(n_per_class, seed, width_px, height_px)
    second = stain_batch_ids([sid for sid, _, _ in plan])
    out, inked = [], 0
    for i, (sid, label, tissue) in enumerate(plan):
        artefacts = i % 3 != 2
        outlined = (0,) if artefacts and inked % 2 == 0 else ()
        inked += artefacts
        out.append(LabSlide(sid, int(label), tissue, sid in second, seed * 100003 + i, artefacts, outlined,
                            i % 5 == 3))
    return out


def run_tasks(fn, items: list, workers: int) -> list:
    """``[fn(item) for item in items]``, by ``workers`` processes when > 1 (spawned: the caller may have loaded
    TensorFlow, which a forked child can hang on)."""
    if workers > 1 and len(items) > 1:
        import multiprocessing

        with ProcessPoolExecutor(min(workers, len(items)), mp_context=multiprocessing.get_context("spawn")) as pool:
            return list(pool.map(fn, items, chunksize=max(1, len(items) // (8 * workers))))
    return [fn(item) for item in items]


def pen_feature(slide: ArtefactTissue, strokes: tuple[int, ...]) -> dict | None:
    """A QuPath ``Pen`` annotation around the visible ink (opacity > 0.1) of the given strokes, level-0 px."""
    import shapely

    if not strokes:
        return None
    alpha = np.zeros_like(slide.ink_alpha_low)
    for i in strokes:
        alpha = np.maximum(alpha, stroke_alpha(slide.strokes[i], alpha.shape, slide.artefact_seed * 101 + i))
    ink = np.pad(alpha > 0.1, ((0, 0), (1, 1)))
    edges = np.diff(ink.astype(np.int8), axis=1)  # one box per run of inked lattice cells in a row: a fast union
    ys, x0 = np.nonzero(edges == 1)
    x1 = np.nonzero(edges == -1)[1]
    if not len(ys):
        return None
    outline = shapely.union_all(shapely.box(x0 * LOW, ys * LOW, x1 * LOW, (ys + 1) * LOW))
    outline = outline.buffer(2 * LOW).simplify(LOW)
    return {"type": "Feature", "id": f"pen-{'-'.join(map(str, strokes))}",
            "geometry": json.loads(shapely.to_geojson(outline)),
            "properties": {"objectType": "annotation", "classification": {"name": "Pen", "color": [0, 0, 200]}}}


def annotations_of(entry: LabSlide) -> dict:
    """The slide's QuPath FeatureCollection (Tumor, Exclude from ``ArtefactTissue``; Pen from ``pen_feature``)."""
    collection = entry.slide.annotations_geojson(exclude=entry.exclude_region, pen=False)
    pen = pen_feature(entry.slide, entry.pen_outlined)
    if pen is not None:
        collection["features"].append(pen)
    return collection


def write_entry(slides: Path, notes: Path, entry: LabSlide) -> None:
    """Write one slide (unless written from the same plan entry) and its GeoJSON (one task of ``make_lab_cohort``)."""
    path = slides / f"{entry.slide_id}.svs"
    if written_spec(path) != slide_spec(entry.slide, MPP, LEVELS, TILE_PX, QUALITY):
        write_slide(path, entry.slide, mpp=MPP, levels=LEVELS, tile_px=TILE_PX, quality=QUALITY, style="aperio",
                    objective_power=OBJECTIVE)
    write_geojson(notes / f"{entry.slide_id}.geojson", annotations_of(entry))


def make_lab_cohort(out_dir: str | os.PathLike, n_per_class: int = 6, seed: int = 0, workers: int = 1,
                    width_px: int = 3000, height_px: int = 3000) -> tuple[Path, Path, list[LabSlide]]:
    """Write ``<out>/slides/<id>.svs`` + ``labels.csv`` and ``<out>/annotations/<id>.geojson`` (by ``workers``
    processes); slides already written from the same plan entry are kept. Returns (slides dir, annotations dir,
    plan)."""
    out = Path(out_dir)
    slides, notes = out / "slides", out / "annotations"
    slides.mkdir(parents=True, exist_ok=True)
    notes.mkdir(parents=True, exist_ok=True)
    plan = lab_cohort_plan(n_per_class, seed, width_px, height_px)
    run_tasks(functools.partial(write_entry, slides, notes), plan, workers)
    labels = slides / "labels.csv"
    tmp = atomic_target(labels)
    tmp.write_text("slide_id,label\n" + "".join(f"{e.slide_id},{e.label}\n" for e in plan))
    os.replace(tmp, labels)
    return slides, notes, plan


# --------------------------------------------------------------------------------------------- checking a run

# The settings the benchmark and the slow test run this cohort with: stain and QC at their defaults, the recipe of
# tests/test_recipe_targets.py (128-px tiles, 3 PCA components, the scratch recipe), CAMs checked against Tumor.
RUN_CONFIG = """
tiling: {mpp: 0.5, tile_px: 128, chunk_tiles: 16}
reduce: {method: pca, components: 3}
train: {adapter: components, val_fraction: 0.2, test_fraction: 0.3}
cluster: {workers: 2, dashboard: false}
annotations: {cam_classes: {"1": Tumor}}
"""
INKED_MIN = 0.25  # share of a tile under ink that makes it "inked" (as benchmarks/real_cohort_qc.py)
MARKED = ("Exclude", "Pen")  # annotation classes that remove tiles on purpose: not "clean" tissue


def tile_truth(entry: LabSlide, grid) -> dict[str, np.ndarray]:
    """(rows, cols) bool ground truth: ``inked`` (>= INKED_MIN of the tile), ``blurred`` (> half, no ink),
    ``clean`` (tissue at the centre, no ink, no blur, not in a MARKED annotation), ``lesion`` (centre)."""
    truth = entry.slide.tile_truth(grid, INKED_MIN)
    return {"inked": truth["inked"], "blurred": truth["blurred"], "clean": truth["clean"] & ~marked_tiles(entry, grid),
            "lesion": entry.tissue.lesion_at_tiles(grid)}


def marked_tiles(entry: LabSlide, grid) -> np.ndarray:
    """(rows, cols) bool: tile centres inside the slide's MARKED annotations (shapely on the written GeoJSON)."""
    import shapely

    shapes = [shapely.from_geojson(json.dumps(f["geometry"])) for f in annotations_of(entry)["features"]
              if f["properties"]["classification"]["name"] in MARKED]
    x, y = tile_centres(grid)
    if not shapes:
        return np.zeros(x.shape, bool)
    return shapely.contains_xy(shapely.union_all(shapes), x, y)


def report_rows(out_dir: str | os.PathLike) -> dict[str, dict]:
    """The report's per-slide rows (the JSON its slide table is filled from), by slide id."""
    import re

    html = (Path(out_dir) / "report.html").read_text(encoding="utf-8")
    data = re.search(r'<script type="application/json" id="slide-data">(.*?)</script>', html, re.S).group(1)
    return {row["slide_id"]: row for row in json.loads(data.replace("<\\/", "</"))}


def check_slide(out_dir: str | os.PathLike, entry: LabSlide, manifest: dict, report: dict) -> tuple[dict, list[str]]:
    """One slide of a run: tile counts against the ground truth, and its accounting problems (empty: all add up).

    Accounting: tissue tiles (``tissue_fraction >= fraction_min``) == described + excluded by reason (``qc_code``);
    the described tiles are ``tissue_mask``, the finite descriptors and the finite CAM cells; the feature map's tissue
    cells are those plus the excluded ones it fills (``core.maps.FILLED_QC_CODES``, its ``filled_cells``); the tissue
    tiles whose centre lies in a MARKED annotation are those coded ``annotation_exclude`` (``tile_annotation`` may
    name a smaller Tumor outline there); the counts by reason equal the manifest's ``qc`` and the report's row.
    """
    from pipeline.core.maps import FILLED_QC_CODES
    from pipeline.core.qc_codes import DETECTOR_NAMES, QC_CODES, qc_counts
    from pipeline.core.store import array_attrs, read_array, read_attrs
    from pipeline.slides.tiling import TileGrid

    store = Path(out_dir) / "slides" / f"{entry.slide_id}.zarr"
    attrs = read_attrs(store)
    grid, fraction_min = TileGrid.from_dict(attrs["tile_grid"]), attrs["tissue_fraction_min"]
    fraction = read_array(store, "tissue_fraction")
    tissue = fraction > 0 if fraction_min == 0 else fraction >= fraction_min
    codes, described = read_array(store, "qc_code"), read_array(store, "tissue_mask").astype(bool)
    counts, problems = qc_counts(codes, tissue), []
    if int(tissue.sum()) != int(described.sum()) + sum(counts.values()):
        problems.append(f"tissue {int(tissue.sum())} != described {int(described.sum())} + excluded {counts}")
    same = {"finite descriptors": np.isfinite(read_array(store, "descriptors")).all(-1),
            "finite CAM": np.isfinite(read_array(store, "cam")), "tissue with code 0": tissue & (codes == 0)}
    problems += [f"{k} ({int(v.sum())}) != tissue_mask ({int(described.sum())})" for k, v in same.items()
                 if not np.array_equal(v, described)]
    map_attrs = array_attrs(store, "feature_map") or {}
    filled = tissue & np.isin(codes, FILLED_QC_CODES) if map_attrs.get("excluded_fill") else np.zeros_like(tissue)
    if not np.array_equal(read_array(store, "feature_map")[..., 0] >= 0, described | filled) or \
            int(map_attrs.get("filled_cells", 0)) != int(filled.sum()):
        problems.append(f"feature-map tissue cells != described + {int(filled.sum())} filled excluded cells "
                        f"(attrs: {map_attrs.get('filled_cells')})")
    record = manifest["slides"].get(entry.slide_id, {})
    if (record.get("qc") or {}) != counts or record.get("tiles") != int(described.sum()):
        problems.append(f"manifest tiles {record.get('tiles')}, qc {record.get('qc')} != store "
                        f"{int(described.sum())}, {counts}")
    row, want = report.get(entry.slide_id, {}), ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or None
    if row.get("qc_reasons") != want or (row.get("qc_excluded") or 0) != sum(counts.values()):
        problems.append(f"report {row.get('qc_excluded')} / {row.get('qc_reasons')!r} != store {want!r}")
    marked = tissue & marked_tiles(entry, grid)
    if not np.array_equal(marked, codes == QC_CODES["annotation_exclude"]):
        problems.append(f"{int(marked.sum())} tissue tiles in {MARKED} annotations, "
                        f"{int((codes == QC_CODES['annotation_exclude']).sum())} coded annotation_exclude")
    t = {k: v & tissue for k, v in tile_truth(entry, grid).items()}
    kept, detector = tissue & (codes == 0), tissue & np.isin(codes, [QC_CODES[n] for n in DETECTOR_NAMES])
    n = {"tissue": int(tissue.sum()), "described": int(described.sum()), "excluded": counts,
         "inked": int(t["inked"].sum()), "inked_kept": int((t["inked"] & kept).sum()),
         "blurred": int(t["blurred"].sum()), "blurred_kept": int((t["blurred"] & kept).sum()),
         "clean": int(t["clean"].sum()), "clean_lost": int((t["clean"] & detector).sum()),
         "clean_lesion": int((t["clean"] & t["lesion"]).sum()),
         "clean_lesion_lost": int((t["clean"] & t["lesion"] & detector).sum()),
         "lesion": int(t["lesion"].sum()), "lesion_kept": int((t["lesion"] & kept).sum())}
    return n, problems


def check_run(out_dir: str | os.PathLike, plan: list[LabSlide], workers: int = 1) -> dict[str, tuple[dict, list[str]]]:
    """``check_slide`` of every slide of the plan, by ``workers`` processes: {slide_id: (counts, problems)}."""
    out_dir = Path(out_dir)
    manifest, report = json.loads((out_dir / "manifest.json").read_text()), report_rows(out_dir)
    results = run_tasks(functools.partial(check_slide, out_dir, manifest=manifest, report=report), plan, workers)
    return {entry.slide_id: result for entry, result in zip(plan, results)}
