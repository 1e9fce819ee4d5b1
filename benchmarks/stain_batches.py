"""Stain batches (#14): do the feature maps encode the lab? One JSON line per (cohort seed, stain method).

A cohort of real H&E texture with planted lesions (``sample_data.textured``) in which every other slide is written in
a second lab's stain (``sample_data.stain_batch``), described (default tiles: 256 px at 0.5 µm/px, ``stats``
descriptors) and reduced (3 PCA components) once per ``stain.method``. Printed per run:

* ``batch_auc``: on benign tissue tiles (tile centre outside the lesion), the ROC AUC with which each map component
  tells the two stain batches apart, as max(AUC, 1 - AUC); ``batch_auc_max`` over the components (target <= 0.7);
* ``lesion_auc``: lesion vs benign tiles pooled over both batches, best component, as max(AUC, 1 - AUC) (>= 0.9);
* ``describe_cpu_s``, ``tiles``, ``tiles_per_cpu_s``: describe in this process (stain pass included), CPU seconds
  (steadier than wall time on a shared machine); kernels are compiled/loaded before the clock starts;
* ``transform_ms_per_tile``: the per-slide transform alone on 256-px tiles of this cohort, one core.

    python benchmarks/stain_batches.py --work /tmp/stain --seeds 0 1 --n-per-class 6 --methods none macenko reinhard
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _common import cpu_model  # noqa: E402

from pipeline.core.config import config_from_dict  # noqa: E402
from pipeline.core.store import list_stores, read_array, read_attrs  # noqa: E402
from pipeline.slides.tiling import TileGrid  # noqa: E402


def make_cohort(work: Path, seed: int, n_per_class: int, size_px: int) -> tuple[Path, dict, set[str]]:
    """Slides (reused when written from the same plan), plan by slide id, and the ids in the second lab's stain."""
    from sample_data.stain_batch import StainBatch, stain_batch_ids
    from sample_data.synthetic.writing import slide_spec, write_slide, written_spec
    from sample_data.textured import LEVELS, MPP, OBJECTIVE, QUALITY, TILE_PX, textured_cohort_plan

    slides = work / f"cohort_{seed}"
    slides.mkdir(parents=True, exist_ok=True)
    plan = {sid: (lab, t) for sid, lab, t in textured_cohort_plan(n_per_class, seed, size_px, size_px)}
    batch_b = stain_batch_ids(list(plan))
    for sid, (_, tissue) in plan.items():
        tissue = StainBatch(tissue) if sid in batch_b else tissue
        path = slides / f"{sid}.svs"
        if written_spec(path) != slide_spec(tissue, MPP, LEVELS, TILE_PX, QUALITY):
            write_slide(path, tissue, mpp=MPP, levels=LEVELS, tile_px=TILE_PX, quality=QUALITY, style="aperio",
                        objective_power=OBJECTIVE)
    return slides, plan, batch_b


def separation_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """max(AUC, 1 - AUC): how well ``scores`` separates the two groups either way round."""
    from sklearn.metrics import roc_auc_score

    auc = float(roc_auc_score(positive, scores))
    return max(auc, 1.0 - auc)


def tile_table(out: Path, plan: dict, batch_b: set[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(map values (n, K), lesion (n,), second batch (n,)) of every tissue tile of the cohort."""
    values, lesion, batch = [], [], []
    for store in list_stores(out):
        sid = store.name[:-5]
        fmap = read_array(store, "feature_map")
        tissue = read_array(store, "tissue_mask").astype(bool) & (fmap[..., 0] >= 0)
        truth = plan[sid][1].lesion_at_tiles(TileGrid.from_dict(read_attrs(store)["tile_grid"]))
        values.append(fmap[tissue])
        lesion.append(truth[tissue])
        batch.append(np.full(int(tissue.sum()), sid in batch_b))
    return np.concatenate(values), np.concatenate(lesion), np.concatenate(batch)


def transform_cost(out: Path, slides: Path, config) -> float | None:
    """ms per 256-px tile of the per-slide transform alone (the first slide's, on 64 of its tiles)."""
    from pipeline.describe.stain_cohort import plan_stain
    from pipeline.core.parallel import LocalRunner
    from pipeline.slides.stain import apply_stain_transform

    if config.stain.method == "none":
        return 0.0
    path = sorted(slides.glob("*.svs"))[0]
    plan = plan_stain({path.stem: path}, out / "cost", config, LocalRunner())
    transform = plan.transforms.get(path.stem)
    if transform is None:
        return None
    import openslide

    with openslide.OpenSlide(str(path)) as handle:
        region = np.asarray(handle.read_region((0, 0), 0, (2048, 2048)).convert("RGB"))
    tiles = np.ascontiguousarray(region.reshape(8, 256, 8, 256, 3).swapaxes(1, 2).reshape(64, 256, 256, 3))
    apply_stain_transform(tiles[:1], transform)  # compile
    t0 = time.perf_counter()
    for _ in range(3):
        apply_stain_transform(tiles, transform)
    return (time.perf_counter() - t0) / (3 * 64) * 1000


def warm_up() -> None:
    """Load the compiled kernels (numba's disk cache) so that no run pays for it."""
    from pipeline.slides.stain import apply_stain_transform

    tiles = np.full((1, 8, 8, 3), 128, np.uint8)
    apply_stain_transform(tiles, {"method": "macenko", "od_matrix": np.eye(3).tolist(), "background": [240] * 3,
                                  "target_background": [240] * 3})
    lab = {"lab_mean": [50.0, 0.0, 0.0], "lab_std": [1.0, 1.0, 1.0]}
    apply_stain_transform(tiles, {"method": "reinhard", "source": lab, "target": lab})


def run(work: Path, seed: int, method: str, n_per_class: int, size_px: int, extra: dict, qc: bool = True) -> dict:
    from pipeline.core.parallel import LocalRunner
    from pipeline.describe.runner import describe_slides
    from pipeline.reduce.runner import reduce_slides

    slides, plan, batch_b = make_cohort(work, seed, n_per_class, size_px)
    tag = f"{method}" + ("-" + "-".join(f"{k}{v}" for k, v in sorted(extra.items())) if extra else "")
    tag += "" if qc else "-noqc"
    out = work / f"out_{seed}_{tag}"
    shutil.rmtree(out, ignore_errors=True)
    config = config_from_dict({"stain": {"method": method, **extra}, "reduce": {"components": 3},
                               **({} if qc else {"qc": {"detectors": []}})})
    t0, c0 = time.perf_counter(), time.process_time()
    summary = describe_slides([slides], out, config, runner=LocalRunner(), progress=False)
    describe_s, describe_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    reduce_slides(out, config, runner=LocalRunner(), progress=False)
    values, lesion, batch = tile_table(out, plan, batch_b)
    benign = ~lesion
    batch_auc = [round(separation_auc(values[benign, k], batch[benign]), 3) for k in range(values.shape[1])]
    lesion_auc = [round(separation_auc(values[:, k], lesion), 3) for k in range(values.shape[1])]
    normalised = sum(bool((read_attrs(s).get("stain") or {}).get("normalised")) for s in list_stores(out))
    cost = transform_cost(out, slides, config)
    return {"seed": seed, "method": method, "settings": extra, "qc": qc, "slides": len(plan),
            "normalised_slides": normalised,
            "tiles": int(len(values)), "lesion_tiles": int(lesion.sum()), "batch_auc": batch_auc,
            "batch_auc_max": max(batch_auc), "lesion_auc": lesion_auc, "lesion_auc_best": max(lesion_auc),
            "describe_s": round(describe_s, 2), "describe_cpu_s": round(describe_cpu_s, 2),
            "tiles_per_cpu_s": round(len(values) / describe_cpu_s, 1),
            "transform_ms_per_tile": None if cost is None else round(cost, 3), "failed": summary["failed"],
            "cpu": cpu_model()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for the cohorts and outputs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--n-per-class", type=int, default=8)
    ap.add_argument("--size-px", type=int, default=4000, help="slide edge at 0.5 µm/px")
    ap.add_argument("--methods", nargs="+", default=["none", "macenko", "reinhard"])
    ap.add_argument("--settings", default="{}", help="JSON stain-section overrides applied to every method but none")
    ap.add_argument("--no-qc", action="store_true", help="artifact QC off (qc.detectors: []), to see the stain alone")
    a = ap.parse_args(argv)
    warm_up()
    for seed in a.seeds:
        for method in a.methods:
            extra = json.loads(a.settings) if method != "none" else {}
            row = run(a.work, seed, method, a.n_per_class, a.size_px, extra, not a.no_qc)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
