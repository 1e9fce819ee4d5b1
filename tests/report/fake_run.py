"""A run's output directory written directly (no slides, no model): manifest, stores with a thumbnail and tissue mask,
map and CAM pictures, predictions, metrics and plots, for any number of slides. Used by the report tests and by
``benchmarks/report_scale.py`` (1,000+ slides in seconds instead of a whole pipeline run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.core.outputs import atomic_write_json
from pipeline.core.store import create_partial_store, finalize_store

FAILURE = {"code": "corrupt_slide", "message": "slides/broken.svs: OpenSlide failed to open it. Fix: re-copy it."}


def _picture(rng: np.random.Generator, size: tuple[int, int], hot: bool) -> Image.Image:
    """A small pink 'slide' with a blob, and a darker disc where the 'CAM' is hot."""
    w, h = size
    img = Image.new("RGB", size, (240, 238, 242))
    draw = ImageDraw.Draw(img)
    draw.ellipse([w * 0.1, h * 0.1, w * 0.9, h * 0.9], fill=tuple(int(v) for v in rng.integers(150, 220, 3)))
    if hot:
        draw.ellipse([w * 0.4, h * 0.35, w * 0.6, h * 0.6], fill=(250, 220, 60))
    return img


def write_fake_run(out: str | Path, n_slides: int, seed: int = 0, failed_every: int = 17,
                   wrong_every: int = 9, cam_px: tuple[int, int] = (770, 580)) -> Path:
    """``n_slides`` slides ``s00000``...: every ``failed_every``-th failed at describe (no store), the others done,
    labels alternate 0/1, half of them in the test split with a prediction, every ``wrong_every``-th test slide
    misclassified; CAM pictures of ``cam_px`` (the cam stage's size by default). Returns ``out``."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    (out / "maps").mkdir(parents=True, exist_ok=True)
    (out / "cam").mkdir(exist_ok=True)
    (out / "plots").mkdir(exist_ok=True)
    slides, lines = {}, ["slide_id,true_label,predicted_label,prob_0,prob_1"]
    for i in range(n_slides):
        sid = f"s{i:05d}"
        label = i % 2
        if i % failed_every == failed_every - 1:
            slides[sid] = {"status": "failed", "error": FAILURE, "path": f"slides/{sid}.svs", "tiles": 0}
            continue
        rows, cols = int(rng.integers(8, 14)), int(rng.integers(8, 14))
        tissue = np.zeros((rows, cols), bool)
        tissue[1:-1, 1:-1] = True
        thumb = np.asarray(_picture(rng, (cols * 16, rows * 16), False))
        grid = {"slide_width_px": cols * 512, "slide_height_px": rows * 512, "slide_mpp": 0.25, "target_mpp": 0.5,
                "tile_px": 256, "stride_px": 256, "rows": rows, "cols": cols, "tile_l0_px": 512.0,
                "stride_l0_px": 512.0, "read_level": 0, "read_downsample": 1.0}
        attrs = {"stage": "describe", "slide_id": sid, "slide_path": f"/nowhere/{sid}.svs", "fingerprint": sid,
                 "mpp": 0.25, "mpp_source": "slide_metadata", "tile_grid": grid, "mask_downsample": 32.0,
                 "config_hash": "fake"}
        create_partial_store(out, sid, attrs, (rows, cols), 1, 16, tissue.astype(np.float32), tissue, thumb)
        finalize_store(out, sid, {"tiles": int(tissue.sum())})
        Image.fromarray(np.kron(rng.integers(0, 255, (rows, cols, 3), dtype=np.uint8),
                                np.ones((8, 8, 1), np.uint8))).save(out / "maps" / f"{sid}.png")
        test = i % 4 < 2
        record = {"status": "done", "error": None, "path": f"slides/{sid}.svs", "mpp": 0.25,
                  "mpp_source": "slide_metadata", "tiles": int(tissue.sum()),
                  "stages": {"reduce": {"status": "done"},
                             "train": {"status": "done", "label": label, "split": "test" if test else "train"},
                             "cam": {"status": "done"}}}
        slides[sid] = record
        _picture(rng, cam_px, bool(label)).save(out / "cam" / f"{sid}.png")
        if test:
            wrong = (i // 2) % wrong_every == 0
            pred = 1 - label if wrong else label
            p1 = float(np.clip(rng.uniform(0.55, 0.999) if pred else rng.uniform(0.001, 0.45), 0, 1))
            lines.append(f"{sid},{label},{pred},{1 - p1:.6f},{p1:.6f}")
    atomic_write_json(out / "manifest.json", {"slides": slides, "ignored": [], "runs": []})
    (out / "predictions.csv").write_text("\n".join(lines) + "\n")
    (out / "metrics.json").write_text(json.dumps({"accuracy": 0.875, "roc_auc": 0.9375, "n_slides": len(lines) - 1}))
    for name in ("roc", "confusion_matrix", "training_curves"):
        Image.new("RGB", (300, 240), (250, 250, 250)).save(out / "plots" / f"{name}.png")
    (out / "config.yaml").write_text("tiling:\n  mpp: 0.5\n")
    return out
