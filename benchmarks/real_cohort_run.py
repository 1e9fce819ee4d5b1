"""Issue 14 end to end: a two-lab, inked, partly blurred real-texture cohort with QuPath annotations through
``wsi-pipeline run`` (defaults for stain and QC), checked against the ground truth. JSON out, one object per seed.

    python benchmarks/real_cohort_run.py --work /tmp/rcr --seeds 11 12 13 [--n-per-class 24] [--skip-run]

Cohort: ``sample_data.lab_cohort`` (textured slides, 3000 x 3000 px at 0.5 µm/px; every other slide in the second
lab's stain; two marker strokes + one blurred region on 2 of 3 slides; ``Tumor`` outlines of every lesion, a ``Pen``
outline of one stroke on half the inked slides, an ``Exclude`` ellipse on 1 of 5). Run settings: those of
``tests/test_recipe_targets.py`` (128-px tiles at 0.5 µm/px, 3 PCA components, the scratch recipe) plus
``--annotations`` and ``annotations.cam_classes: {"1": Tumor}``; stain and QC are left at their defaults.

Printed per seed:

* ``network``: test ROC AUC, the map-statistics baseline's, test slides;
* ``cam``: ``metrics.json``'s pointing game / top-decile IoU (all annotated slides and the positive test slides),
  and the stored CAM's maximum on the true lesion (``lesion_at_tiles``) of the positive test slides: ``peak_in_lesion``
  (any lesion tile) and ``peak_in_visible_lesion`` (lesion tiles QC kept), as ``tests/conftest.stored_cam_hits``;
* ``qc``: among tissue tiles (``tissue_fraction >= tissue.fraction_min``): inked (ink >= 25% of the tile) kept,
  blurred (> 50% blurred, no ink) kept, clean (tissue at the centre, no ink, no blur, no Exclude/Pen annotation)
  lost to a detector; lesion tiles a detector took although clean; per lab;
* ``accounting``: per slide, tissue tiles == described tiles + excluded tiles by reason, the described tiles equal
  ``tissue_mask``, finite descriptors, feature-map tissue cells and finite CAM cells, and the per-reason counts equal
  the manifest's ``qc`` and the report's row; ``ok`` and the slides that fail, with why;
* ``run_wall_s`` / ``run_cpu_s``: the CLI's wall time and CPU seconds (this process's children; shared machine).
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.core.store import read_array, read_attrs  # noqa: E402
from pipeline.slides.tiling import TileGrid  # noqa: E402
from sample_data.lab_cohort import RUN_CONFIG, check_run, make_lab_cohort  # noqa: E402



def run_cli(slides: Path, notes: Path, out: Path, config: Path) -> dict:
    """``wsi-pipeline run`` in a child process: exit code, wall seconds, CPU seconds of the children."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    code = subprocess.run([sys.executable, "-m", "pipeline", "run", "--slides", str(slides), "--labels",
                           str(slides / "labels.csv"), "--out", str(out), "--config", str(config), "--annotations",
                           str(notes)], cwd=ROOT, stdout=subprocess.DEVNULL).returncode
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"exit_code": code, "run_wall_s": round(time.perf_counter() - t0, 1), "run_cpu_s": round(cpu, 1)}


def cam_peaks(out: Path, plan: dict) -> dict:
    """Positive test slides: is the stored CAM's maximum on the lesion / on lesion tiles QC kept."""
    with open(out / "predictions.csv") as fh:
        positives = [row["slide_id"] for row in csv.DictReader(fh) if row["true_label"] == "1"]
    rows = {}
    for sid in positives:
        store = out / "slides" / f"{sid}.zarr"
        cam = read_array(store, "cam")
        peak = np.unravel_index(np.nanargmax(cam), cam.shape)
        lesion = plan[sid].tissue.lesion_at_tiles(TileGrid.from_dict(read_attrs(store)["tile_grid"]))
        visible = lesion & np.isfinite(cam)
        rows[sid] = {"in_lesion": bool(lesion[peak]), "lesion_tiles": int(lesion.sum()),
                     "visible_lesion_tiles": int(visible.sum()), "tissue_tiles": int(np.isfinite(cam).sum())}
    return rows


def by_lab_predictions(out: Path, plan: dict) -> dict:
    """Test slides per lab: ROC AUC of the network's class-1 probability, mean probability per true class."""
    from sklearn.metrics import roc_auc_score

    with open(out / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    result = {}
    for lab, second in (("lab_a", False), ("lab_b", True)):
        mine = [r for r in rows if plan[r["slide_id"]].second_lab == second]
        y, p = [int(r["true_label"]) for r in mine], [float(r["prob_1"]) for r in mine]
        result[lab] = {"slides": len(mine), "roc_auc": round(float(roc_auc_score(y, p)), 4) if len(set(y)) == 2
                       else None, **{f"mean_p1_label{c}": round(float(np.mean([q for q, t in zip(p, y) if t == c])), 3)
                                     for c in (0, 1) if c in y}}
    return result


def share(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def evaluate(out: Path, plan: list, workers: int = 1) -> dict:
    by_id = {e.slide_id: e for e in plan}
    metrics = json.loads((out / "metrics.json").read_text())
    checked = check_run(out, plan, workers)
    per_slide = {sid: counts for sid, (counts, _) in checked.items()}
    problems = {sid: bad for sid, (_, bad) in checked.items() if bad}
    tot = {k: sum(v[k] for v in per_slide.values()) for k in next(iter(per_slide.values())) if k != "excluded"}
    by_lab = {}
    for lab, second in (("lab_a", False), ("lab_b", True)):
        rows = [per_slide[e.slide_id] for e in plan if e.second_lab == second]
        s = {k: sum(r[k] for r in rows) for k in ("inked", "inked_kept", "blurred", "blurred_kept", "clean",
                                                 "clean_lost")}
        by_lab[lab] = {"inked_kept": share(s["inked_kept"], s["inked"]),
                       "blurred_kept": share(s["blurred_kept"], s["blurred"]),
                       "clean_lost": share(s["clean_lost"], s["clean"]), "counts": s}
    reasons = {}
    for v in per_slide.values():
        for k, c in v["excluded"].items():
            reasons[k] = reasons.get(k, 0) + c
    peaks = cam_peaks(out, by_id)
    ann = metrics.get("cam_annotations") or {}
    test_pos = set(peaks)
    ann_test = {k: v for k, v in (ann.get("per_slide") or {}).items() if k in test_pos}
    return {
        "network": {"roc_auc": metrics.get("roc_auc"), "baseline_roc_auc": (metrics.get("baseline") or {}).get(
            "roc_auc"), "test_slides": metrics.get("n_slides"), "by_lab": by_lab_predictions(out, by_id)},
        "cam": {"annotations_overall": ann.get("overall"),
                "annotations_positive_test": {
                    "slides": len(ann_test),
                    "pointing_game": share(sum(v["pointing_hit"] for v in ann_test.values()), len(ann_test)),
                    "iou_top_decile_mean": round(float(np.mean([v["iou_top_decile"] for v in ann_test.values()])), 4)
                    if ann_test else None},
                "peak_in_lesion": f"{sum(p['in_lesion'] for p in peaks.values())}/{len(peaks)}",
                "positive_test_slides": peaks,
                "annotation_per_slide": ann.get("per_slide")},
        "qc": {"inked_kept": share(tot["inked_kept"], tot["inked"]),
               "blurred_kept": share(tot["blurred_kept"], tot["blurred"]),
               "clean_lost": share(tot["clean_lost"], tot["clean"]),
               "clean_lesion_lost": share(tot["clean_lesion_lost"], tot["clean_lesion"]),
               "tiles": tot, "excluded_by_reason": reasons, "by_lab": by_lab},
        "accounting": {"ok": not problems, "slides": len(per_slide), "problems": problems},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for the cohorts and outputs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[11])
    ap.add_argument("--n-per-class", type=int, default=24)
    ap.add_argument("--workers", type=int, default=2, help="processes writing slides and checking them")
    ap.add_argument("--skip-run", action="store_true", help="evaluate an existing output only")
    a = ap.parse_args(argv)
    for seed in a.seeds:
        root = a.work / f"seed{seed}_n{a.n_per_class}"
        t0 = time.perf_counter()
        slides, notes, plan = make_lab_cohort(root, a.n_per_class, seed, workers=a.workers)
        row = {"seed": seed, "n_per_class": a.n_per_class, "cohort_wall_s": round(time.perf_counter() - t0, 1)}
        config = root / "config.yaml"
        config.write_text(RUN_CONFIG)
        if not a.skip_run:
            row.update(run_cli(slides, notes, root / "out", config))
        row.update(evaluate(root / "out", plan, a.workers))
        (root / "result.json").write_text(json.dumps(row, indent=1))
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
