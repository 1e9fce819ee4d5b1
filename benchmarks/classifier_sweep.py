"""Slide classifier on hard generated cohorts: network vs map-statistics baseline, and where its CAM peaks (#15).

For each cohort seed: a cohort of real H&E texture with small irregular lesions and stain jitter
(``sample_data.textured``), described and reduced once (128-px tiles at 0.5 µm/px, 3 PCA components), then trained
once per variant (``--variants``: JSON train-section overrides, one per line or ``;``-separated). Printed per run, as
one JSON line: test ROC AUC of the network and of the baseline, training seconds, and for each Grad-CAM layer the
share of positive test slides whose CAM maximum lies inside the lesion (the tile centre's ground truth).

    python benchmarks/classifier_sweep.py --work /tmp/sweep --seeds 1 2 3 --n-per-class 80 \
        --variants '{}' '{"pooling": "avg"}' --cam-layers mixed0 mixed1 mixed2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.core.config import config_from_dict  # noqa: E402
from pipeline.core.store import list_stores, read_array, read_attrs  # noqa: E402
from pipeline.slides.tiling import TileGrid  # noqa: E402

BASE_CONFIG = {
    "tiling": {"mpp": 0.5, "tile_px": 128, "chunk_tiles": 16},
    "reduce": {"method": "pca", "components": 3},
    "train": {"adapter": "components", "val_fraction": 0.2, "test_fraction": 0.3},
    "cluster": {"kind": "local"},
}


def prepare_cohort(work: Path, seed: int, n_per_class: int, size_px: int) -> tuple[Path, Path, dict]:
    """Cohort slides + describe + reduce (each reused when current); returns (out, labels, plan by slide id)."""
    from pipeline.describe.runner import describe_slides
    from pipeline.reduce.runner import reduce_slides
    from sample_data.textured import make_textured_cohort, textured_cohort_plan

    slides = work / f"cohort-{seed}"
    make_textured_cohort(slides, n_per_class, seed=seed, width_px=size_px, height_px=size_px)
    out = work / f"out-{seed}"
    config = config_from_dict(BASE_CONFIG)
    describe_slides([slides], out, config, progress=False)
    reduce_slides(out, config, progress=False)
    plan = {sid: (label, tissue) for sid, label, tissue in
            textured_cohort_plan(n_per_class, seed=seed, width_px=size_px, height_px=size_px)}
    return out, slides / "labels.csv", plan


def cam_hits(out: Path, plan: dict, layers: list[str], test_ids: set[str]) -> dict:
    """Per layer: (hits, positives) over the positive test slides, CAM of each slide's predicted class."""
    from pipeline.cam.gradients import split_model
    from pipeline.cam.views import slide_cam_with_models
    from pipeline.core.config import CamConfig
    from pipeline.model.trained import TrainedModel

    trained = TrainedModel(out / "model")
    stores = {s.name[:-5]: s for s in list_stores(out)}
    positives = sorted(s for s in test_ids if plan[s][0] == 1 and s in stores)
    result = {}
    for spec in layers:  # "mixed1" or "mixed1:ref" (cam.reference)
        layer, _, flag = spec.partition(":")
        cam_cfg = CamConfig(reference=flag == "ref")
        if layer not in [lay.name for lay in trained.models[0].layers]:
            continue  # a block beyond this model's head
        cam_models = [split_model(m, layer) for m in trained.models]
        hits = 0
        for sid in positives:
            grid = TileGrid.from_dict(read_attrs(stores[sid])["tile_grid"])
            truth = plan[sid][1].lesion_at_tiles(grid)
            cam, _, _ = slide_cam_with_models(cam_models, read_array(stores[sid], "feature_map"),
                                              trained.train_config, cam_cfg)
            r, c = np.unravel_index(int(np.nanargmax(np.where(np.isfinite(cam), cam, -np.inf))), cam.shape)
            hits += bool(truth[r, c])
        result[spec] = [hits, len(positives)]
    return result


def run_variant(out: Path, labels: Path, plan: dict, overrides: dict, layers: list[str], retrain: bool = True) -> dict:
    from pipeline.train.runner import train

    data = json.loads(json.dumps(BASE_CONFIG))
    data["train"].update(overrides)
    config = config_from_dict(data)
    t0 = time.perf_counter()
    summary = train(out, labels, config, force=True)
    seconds = time.perf_counter() - t0
    metrics = json.loads((out / "metrics.json").read_text())
    info = json.loads((out / "model" / "model_info.json").read_text())
    test_ids = set(info["splits"][0]["test"])
    return {"roc_auc": summary.get("roc_auc"), "baseline_roc_auc": metrics["baseline"].get("roc_auc"),
            "accuracy": summary.get("accuracy"), "train_s": round(seconds, 1),
            "cam_hits": cam_hits(out, plan, layers, test_ids)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1])
    ap.add_argument("--n-per-class", type=int, default=80)
    ap.add_argument("--size-px", type=int, default=3000)
    ap.add_argument("--train-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="+", default=["{}"])
    ap.add_argument("--cam-layers", nargs="+", default=["mixed0", "mixed1", "mixed2"])
    ap.add_argument("--jsonl", type=Path, help="append each result here too")
    args = ap.parse_args(argv)
    for seed in args.seeds:
        out, labels, plan = prepare_cohort(args.work, seed, args.n_per_class, args.size_px)
        for variant in args.variants:
            for train_seed in args.train_seeds:
                overrides = {**json.loads(variant), "seed": train_seed}
                row = {"cohort_seed": seed, "slides": 2 * args.n_per_class, "variant": overrides,
                       **run_variant(out, labels, plan, overrides, args.cam_layers)}
                print(json.dumps(row), flush=True)
                if args.jsonl:
                    with open(args.jsonl, "a") as f:
                        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
