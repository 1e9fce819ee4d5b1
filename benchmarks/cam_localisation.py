"""Does the Grad-CAM find the planted lesion? (issue #5)

On a synthetic cohort (``sample_data.synthetic.make_cohort``) run through the pipeline (``wsi-pipeline run``), for each
positive slide: the argmax cell of the CAM, its centre in level-0 pixels (the slide's ``tile_grid``), and whether
``SyntheticTissue.lesion_at`` is true there (a *hit*). Target: hits on at least 80% of the positive test slides.
Also reported, over the test positives and over all positives (the test split is small):

* ``hits``: argmax cell centre inside the lesion;
* ``mass``: the share of the CAM of the top 10% tissue cells that falls on lesion (each cell weighted by the
  fraction of it that is lesion, on a 4 x 4 grid of points); chance is about the lesion's share of the tissue.

The CAM is the stored ``cam`` array of each store (``--variants stored``) or recomputed from OUT/model with variants
(nothing is written). Ground truth comes from ``cohort_plan`` with the cohort's ``--seed`` and ``--n-per-class``.

    python benchmarks/cam_localisation.py --out demo_out --n-per-class 10 [--seed 0] [--variants stored,gradcam,...]

Variants: ``stored``; ``<method>[@layer[+layer...]][:aug][:ref]`` with method ``gradcam`` (the pipeline's),
``layercam`` (ReLU(gradient) x activation), ``logit`` / ``margin`` (Grad-CAM of the pre-softmax score z_c, or of
z_c - mean z); layers (default: the pipeline's choice) averaged after per-slide normalisation; ``:aug`` = Augmented
Grad-CAM (``cam.augmented_slide_cam``, eight flips/rotations); ``:ref`` = ``cam.reference`` (gradient x
(activation - reference activation)).
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

from pipeline.core.store import list_stores, read_array, read_attrs  # noqa: E402
from pipeline.slides.tiling import TileGrid  # noqa: E402
from sample_data.synthetic import cohort_plan  # noqa: E402


def cell_truth(tissue, grid: TileGrid, samples: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(centre inside the lesion (rows, cols) bool, lesion fraction of each cell on samples x samples points)."""
    rr, cc = np.meshgrid(np.arange(grid.rows), np.arange(grid.cols), indexing="ij")
    x0, y0 = cc * grid.stride_l0_px, rr * grid.stride_l0_px
    centre = tissue.lesion_at_tiles(grid)
    offs = (np.arange(samples) + 0.5) / samples * grid.tile_l0_px
    frac = np.zeros(grid.shape)
    for oy in offs:
        for ox in offs:
            frac += tissue.lesion_at(x0 + ox, y0 + oy)
    return centre, frac / samples ** 2


def score_cam(cam: np.ndarray, centre: np.ndarray, frac: np.ndarray, top: float = 0.10) -> dict:
    valid = np.isfinite(cam)
    flat = np.where(valid, cam, -np.inf)
    r, c = np.unravel_index(int(np.argmax(flat)), cam.shape)
    vals = cam[valid]
    k = max(1, int(round(top * vals.size)))
    thr = np.sort(vals)[-k]
    sel = valid & (np.nan_to_num(cam, nan=-1) >= thr)
    w = cam[sel]
    mass = float((w * frac[sel]).sum() / w.sum()) if w.sum() > 0 else 0.0
    return {"hit": bool(centre[r, c]), "near": bool(frac[r, c] > 0), "mass": mass, "argmax": [int(r), int(c)],
            "lesion_share": float(frac[valid].mean())}


# --- CAM variants --------------------------------------------------------------------------------------------------

CLASS_INDEX: int | None = None  # --class-index: the class whose CAM is scored (None: each slide's predicted class)


def _variant_cam(spec: str, trained, fmap: np.ndarray, cache: dict) -> np.ndarray:
    from pipeline.cam import gradients as cam_lib

    head, *flags = spec.split(":")
    aug, ref = "aug" in flags, "ref" in flags
    method, _, layer_spec = head.partition("@")
    layers = layer_spec.split("+") if layer_spec else [
        cam_lib.default_cam_layer(trained.models[0], trained.train_config)]
    cams = []
    for layer in layers:
        if layer not in cache:
            cache[layer] = [cam_lib.split_model(m, layer) for m in trained.models]
            for cm, m in zip(cache[layer], trained.models):
                cm.full = m
        for cm in cache[layer]:
            cams.append(_slide_cam(cm, fmap, trained.train_config, method, 8 if aug else 1, ref))
    return np.nanmean(np.stack(cams), axis=0)


def _slide_cam(cam_model, fmap, cfg, method: str, transforms: int, reference: bool = False) -> np.ndarray:
    """pipeline.cam.views.slide_cam with a choice of channel weighting (the pipeline's own function for gradcam)."""
    from pipeline.cam import gradients, views

    if method == "gradcam":
        if transforms > 1:
            return views.augmented_slide_cam(cam_model, fmap, cfg, CLASS_INDEX, reference=reference)[0]
        return views.slide_cam(cam_model, fmap, cfg, class_index=CLASS_INDEX, reference=reference)[0]
    if method in ("logit", "margin"):
        return _logit_cam(cam_model, fmap, cfg, transforms, margin=method == "margin")
    original = views.gradcam_from_activations  # what views.cam_from_passes calls

    def layercam(cm, activations, classes, out_hw):
        out = np.empty((len(activations),) + tuple(out_hw), dtype=np.float32)
        for c in np.unique(classes):
            sel = np.flatnonzero(classes == c)
            grads, _ = gradients.class_score_gradients(cm.tail, activations[sel], int(c))
            low = np.maximum((np.maximum(grads, 0) * activations[sel]).sum(axis=-1), 0.0)
            for i, m in zip(sel, low):
                out[i] = gradients.upsample_bilinear(m, *out_hw)
        return out

    views.gradcam_from_activations = layercam
    try:
        return views.slide_cam(cam_model, fmap, cfg)[0]
    finally:
        views.gradcam_from_activations = original


def _logit_cam(cam_model, fmap, cfg, transforms, margin):
    """Grad-CAM of the class score before the softmax (z_c, or z_c - mean_j z_j with ``margin``)."""
    import keras
    import tensorflow as tf

    from pipeline.cam import gradients, views

    if not hasattr(cam_model, "_pre"):
        dense = cam_model.full.get_layer("head_dense")
        cam_model._pre = keras.Model(cam_model.full.get_layer(cam_model.layer).output, dense.input)
        cam_model._w, cam_model._b = dense.kernel, dense.bias
    original = gradients.class_score_gradients  # what gradients.gradcam_from_activations calls

    def grads_fn(tail, activations, class_index):
        acts = tf.convert_to_tensor(activations)
        with tf.GradientTape() as tape:
            tape.watch(acts)
            z = tf.matmul(cam_model._pre(acts, training=False), cam_model._w) + cam_model._b
            if margin:
                z = z - tf.reduce_mean(z, axis=1, keepdims=True)
            score = tf.reduce_sum(z[:, class_index])
        return tape.gradient(score, acts).numpy(), tf.nn.softmax(z).numpy()

    gradients.class_score_gradients = grads_fn
    try:
        return views.slide_cam(cam_model, fmap, cfg)[0]
    finally:
        gradients.class_score_gradients = original


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="pipeline output folder (OUT)")
    ap.add_argument("--n-per-class", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0, help="cohort seed given to make_cohort")
    ap.add_argument("--width", type=int, default=6000)
    ap.add_argument("--height", type=int, default=4500)
    ap.add_argument("--lesion-fraction", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                    help="the make_cohort lesion_fraction range the cohort was made with (default: its own)")
    ap.add_argument("--variants", default="stored")
    ap.add_argument("--class-index", type=int, default=None,
                    help="score the CAM of this class (model output index) instead of the predicted one")
    ap.add_argument("--json", type=Path, help="also write the per-slide results here")
    args = ap.parse_args(argv)
    global CLASS_INDEX
    CLASS_INDEX = args.class_index

    plan = {sid: (lab, tissue) for sid, lab, tissue in cohort_plan(args.n_per_class, args.width, args.height,
                                                                   args.seed, lesion_fraction=args.lesion_fraction)}
    stores = {s.name[:-5]: s for s in list_stores(args.out)}
    info = json.loads((args.out / "model" / "model_info.json").read_text())
    test = set((info.get("splits") or [{}])[0].get("test") or [])
    positives = sorted(sid for sid, (lab, _) in plan.items() if lab == 1 and sid in stores)
    truth = {}
    for sid in positives:
        grid = TileGrid.from_dict(read_attrs(stores[sid])["tile_grid"])
        truth[sid] = cell_truth(plan[sid][1], grid)

    trained, cache = None, {}
    results = {}
    for spec in args.variants.split(","):
        t0 = time.perf_counter()
        per = {}
        for sid in positives:
            if spec == "stored":
                cam = read_array(stores[sid], "cam")
            else:
                if trained is None:
                    from pipeline.model.trained import TrainedModel

                    trained = TrainedModel(args.out / "model")
                cam = _variant_cam(spec, trained, read_array(stores[sid], "feature_map"), cache)
            per[sid] = score_cam(cam, *truth[sid])
        secs = time.perf_counter() - t0
        t_ids = [s for s in positives if s in test]
        row = {"variant": spec, "test_hits": f"{sum(per[s]['hit'] for s in t_ids)}/{len(t_ids)}",
               "all_hits": f"{sum(p['hit'] for p in per.values())}/{len(per)}",
               "all_near": f"{sum(p['near'] for p in per.values())}/{len(per)}",
               "test_mass": round(float(np.mean([per[s]["mass"] for s in t_ids])), 3) if t_ids else None,
               "all_mass": round(float(np.mean([p["mass"] for p in per.values()])), 3),
               "chance": round(float(np.mean([p["lesion_share"] for p in per.values()])), 3),
               "seconds": round(secs, 1), "misses": [s for s in positives if not per[s]["hit"]]}
        results[spec] = {"summary": row, "slides": per}
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
