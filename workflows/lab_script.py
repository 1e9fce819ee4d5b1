"""A lab script: one slide end to end with a saved model, in this process (no cluster, no command line tool).

    python workflows/lab_script.py SLIDE MODEL_DIR OUT_DIR [--mpp-override 0.25] [--layer mixed5]

MODEL_DIR is the directory ``wsi-pipeline train`` (or ``run``) wrote, ``OUT/model``: it holds the model, its label
mapping and the reducer the training slides were mapped with. The script

1. describes the slide with the settings the model's training slides were described with
   (``pipeline.model_describe_config`` + ``pipeline.describe_slide``) -> ``OUT_DIR/slides/<id>.zarr``;
2. maps its descriptors with the model's reducer (``pipeline.map_slide``) -> the ``feature_map`` array;
3. predicts its class (``pipeline.predict_slide``);
4. computes Grad-CAM (``pipeline.cam_slide``) -> the ``cam`` array and ``OUT_DIR/cam/<id>.png`` (overlay on the
   thumbnail), ``.tiff`` (pyramidal heatmap on the slide's geometry) and ``.geojson`` (hot regions for QuPath).

Each step is one call; steps 3 and 4 alone would also do 1 and 2 themselves. Failures raise the pipeline's typed
errors, whose message names the file and the fix (e.g. a slide without a recorded resolution needs --mpp-override).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import pipeline
from pipeline.core.errors import PipelineError


def analyse_slide(slide: str | Path, model_dir: str | Path, out_dir: str | Path, mpp_override: float | None = None,
                  layer: str | None = None) -> dict:
    """Describe, map, predict and explain one slide; returns what each step produced."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = pipeline.model_describe_config(model_dir).with_overrides(tiling__mpp_override=mpp_override,
                                                                      cam__layer=layer)
    store = pipeline.describe_slide(slide, out_dir, config)                      # 1. tiles -> descriptors
    feature_map = pipeline.map_slide(store, model_dir / "reducer")               # 2. descriptors -> feature map
    prediction = pipeline.predict_slide(slide, model_dir, out=out_dir, config=config)  # 3. class probabilities
    cam = pipeline.cam_slide(store, model_dir, out=out_dir, config=config)      # 4. Grad-CAM + heatmap files
    return {"config": config, "store": store, "feature_map": feature_map, "prediction": prediction, "cam": cam}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("slide", type=Path, help="a whole-slide image (SVS, TIFF, NDPI, MRXS, DICOM, ...)")
    parser.add_argument("model_dir", type=Path, help="model directory written by `wsi-pipeline train` (OUT/model)")
    parser.add_argument("out_dir", type=Path, help="where the slide's store and heatmap files go")
    parser.add_argument("--mpp-override", type=float, help="level-0 µm/px when the slide does not record it")
    parser.add_argument("--layer", help="Grad-CAM layer (default: chosen for the model's input resolution)")
    args = parser.parse_args(argv)
    try:
        result = analyse_slide(args.slide, args.model_dir, args.out_dir, args.mpp_override, args.layer)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    fmap, pred, cam = result["feature_map"], result["prediction"], result["cam"]
    tissue = int((fmap[..., 0] >= 0).sum())
    probs = ", ".join(f"{label}: {p:.3f}" for label, p in pred["probabilities"].items())
    print(f"slide {pred['slide_id']}: {fmap.shape[0]}x{fmap.shape[1]} tile grid, {tissue} tissue tiles")
    print(f"  store:      {result['store']}")
    print(f"  prediction: {pred['predicted_label']} ({probs})")
    hot = result["config"].cam.hot_threshold
    print(f"  Grad-CAM:   class {cam['class_label']} at layer {cam['layer']}, "
          f"{int(np.sum(np.nan_to_num(cam['cam']) >= hot))} tiles at >= {hot} of the peak")
    for kind in ("png", "tiff", "geojson"):
        print(f"  {kind + ':':<11} {cam[kind]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
