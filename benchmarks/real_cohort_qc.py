"""Artifact QC on generated cohorts of real H&E texture with marker strokes and out-of-focus regions (JSON out).

    python benchmarks/real_cohort_qc.py [--seeds 200 300 400 500] [--n-per-class 4] [--sweep-seed 100] [--out DIR]

Slides: ``sample_data.textured`` (real CMU-1 / TCGA texture, 3000 x 3000 px at 0.5 µm/px) with two marker strokes
(random colour among blue, green, black, red) and one blurred region each (``sample_data.artefacts``). Ground truth
per tile (256 px at 0.5 µm/px, the defaults): *inked* = ink covers >= 25% of it (``--inked-min``); *blurred* = more
than half of it lies in the blurred region, no ink (*blurred_core*: at least 90%); *clean* = tissue at its centre, no
ink, no blur. Among the tiles
the tissue mask keeps (before QC), it reports the share of inked / blurred tiles QC keeps and of clean tiles it loses,
and the clean tiles lost on a clean copy of each cohort (same slides, no artefacts).

``--sweep-seed``: thresholds (``qc.pen_distance``, ``qc.blur_ratio``) are swept on that cohort first (from the
thumbnails and the stored focus scores, the functions describe runs) and reported; the headline figures are the
defaults on the other seeds. Cost, in CPU seconds (``time.process_time``, one process: the machine is shared):
describe of the first seed's clean copy with ``qc: []`` and with the default QC (best of ``--repeats``), the blur
score alone over ~2000 real tiles of those slides (best of 5) and the pen detector per thumbnail (median over the
slides of the best of 5).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.core.config import config_from_dict  # noqa: E402
from pipeline.core.parallel import LocalRunner  # noqa: E402
from pipeline.core.qc_codes import QC_CODES  # noqa: E402
from pipeline.core.store import read_array, read_attrs, store_path  # noqa: E402
from pipeline.describe.runner import describe_slides  # noqa: E402
from pipeline.slides.qc import decide_tile_qc  # noqa: E402
from pipeline.slides.qc.blur import GRID_CELLS, cell_sums_numpy, focus_scores, scores_from_sums  # noqa: E402
from pipeline.slides.qc.pen import pen_pixels  # noqa: E402
from pipeline.slides.tiling import TileGrid, read_tile_row  # noqa: E402
from pipeline.slides.tissue import tile_tissue_fraction, tissue_mask  # noqa: E402
from sample_data.artefacts import ArtefactTissue  # noqa: E402
from sample_data.synthetic.writing import write_slide  # noqa: E402
from sample_data.textured import LEVELS, MPP, OBJECTIVE, QUALITY, TILE_PX, textured_cohort_plan  # noqa: E402


def make_cohort(out: Path, seed: int, n_per_class: int, artefacts: bool = True) -> dict[str, ArtefactTissue]:
    out.mkdir(parents=True, exist_ok=True)
    slides = {}
    for slide_id, _, tissue in textured_cohort_plan(n_per_class, seed=seed):
        slide = ArtefactTissue(tissue, seed=seed * 1000 + int(slide_id[-3:]), pens=2 if artefacts else 0,
                               blurs=1 if artefacts else 0)
        write_slide(out / f"{slide_id}.svs", slide, mpp=MPP, levels=LEVELS, tile_px=TILE_PX, quality=QUALITY,
                    style="aperio", objective_power=OBJECTIVE)
        slides[slide_id] = slide
    return slides


def evaluate(out: Path, slides: dict, inked_min: float, codes_of=None) -> dict:
    """Shares over the cohort; ``codes_of(store, grid)`` gives the QC codes (default: the stored ``qc_code``)."""
    n = {k: 0 for k in ("inked", "inked_kept", "blurred", "blurred_kept", "blurred_core", "blurred_core_kept", "clean",
                        "clean_lost")}
    for slide_id, slide in slides.items():
        store = store_path(out, slide_id)
        attrs = read_attrs(store)
        if not attrs:
            continue
        grid = TileGrid.from_dict(attrs["tile_grid"])
        tissue = read_array(store, "tissue_fraction") >= 0.5
        codes = codes_of(store, grid) if codes_of else read_array(store, "qc_code")
        kept = tissue & (codes == 0)
        t = slide.tile_truth(grid, inked_min)
        for key in ("inked", "blurred", "blurred_core", "clean"):
            n[key] += int((t[key] & tissue).sum())
        n["blurred_core_kept"] += int((t["blurred_core"] & kept).sum())
        n["inked_kept"] += int((t["inked"] & kept).sum())
        n["blurred_kept"] += int((t["blurred"] & kept).sum())
        n["clean_lost"] += int((t["clean"] & tissue & ~kept).sum())
    return {"tiles": {k: n[k] for k in ("inked", "blurred", "blurred_core", "clean")},
            "inked_kept": round(n["inked_kept"] / max(n["inked"], 1), 4),
            "blurred_kept": round(n["blurred_kept"] / max(n["blurred"], 1), 4),
            "blurred_core_kept": round(n["blurred_core_kept"] / max(n["blurred_core"], 1), 4),
            "clean_lost": round(n["clean_lost"] / max(n["clean"], 1), 4)}


def slides_keeping_inked(out: Path, slides: dict, inked_min: float) -> dict:
    """Per slide that keeps inked tiles: its strokes' colours and the inked tiles kept / counted."""
    rows = {}
    for slide_id, slide in slides.items():
        row = evaluate(out, {slide_id: slide}, inked_min)
        kept = round(row["inked_kept"] * row["tiles"]["inked"])
        if kept:
            rows[slide_id] = {"colours": [s.colour for s in slide.strokes], "inked_kept": kept,
                              "inked": row["tiles"]["inked"]}
    return rows


def sweep(out: Path, slides: dict, inked_min: float, distances, fractions, ratios) -> dict:
    """Pen (distance x tile fraction) and blur (ratio) thresholds, each alone, on the stored thumbnails and focus
    scores (the functions describe runs)."""
    tissue_config = config_from_dict({}).tissue
    stores = {sid: store_path(out, sid) for sid in slides}
    grids = {sid: TileGrid.from_dict(read_attrs(st)["tile_grid"]) for sid, st in stores.items()}
    pen_rows = []
    for distance in distances:
        fractions_by_slide = {}
        for sid, st in stores.items():
            thumb, ds = read_array(st, "thumbnail"), read_attrs(st)["mask_downsample"]
            tissue_px = tissue_mask(thumb, tissue_config, grids[sid].slide_mpp * ds)
            fractions_by_slide[sid] = tile_tissue_fraction(pen_pixels(thumb, tissue_px, distance), ds, grids[sid])
        for fraction in fractions:
            codes = {sid: np.where(f >= fraction, QC_CODES["pen"], 0) for sid, f in fractions_by_slide.items()}
            row = evaluate(out, slides, inked_min, lambda store, grid: codes[Path(store).stem])
            pen_rows.append({"pen_distance": distance, "pen_tile_fraction": fraction,
                             "inked_kept": row["inked_kept"], "clean_lost": row["clean_lost"]})
    blur_rows = []
    for ratio in ratios:
        qc = config_from_dict({"qc": {"blur_ratio": ratio}}).qc

        def codes_of(store, grid, qc=qc):
            tiles = read_array(store, "tissue_fraction") >= 0.5
            return decide_tile_qc(read_array(store, "qc_scores"), ["blur"], tiles, qc)

        row = evaluate(out, slides, inked_min, codes_of)
        blur_rows.append({"blur_ratio": ratio, "blurred_kept": row["blurred_kept"], "clean_lost": row["clean_lost"]})
    return {"pen": pen_rows, "blur": blur_rows}


def describe(paths, out: Path, qc) -> float:
    """CPU seconds of describing ``paths`` in this process with the detectors ``qc``."""
    config = config_from_dict({"qc": qc, "cluster": {"workers": 1}})
    t0 = time.process_time()
    describe_slides(paths, out, config, runner=LocalRunner(), progress=False)
    return time.process_time() - t0


def tissue_tiles(paths, out: Path, limit: int) -> np.ndarray:
    """Up to ``limit`` tissue tiles of the described slides (as describe reads them), repeated to ``limit``."""
    import openslide

    tiles = []
    for path in paths:
        store = store_path(out, path.stem)
        grid, mask = TileGrid.from_dict(read_attrs(store)["tile_grid"]), read_array(store, "tissue_mask")
        with openslide.OpenSlide(str(path)) as handle:
            tiles += [read_tile_row(handle, grid, r, np.flatnonzero(mask[r]))
                      for r in range(grid.rows) if mask[r].any()]
    tiles = np.concatenate(tiles)
    return np.ascontiguousarray(np.resize(tiles, (limit, *tiles.shape[1:])))


def cpu_ms_per_tile(fn, tiles: np.ndarray, repeats: int = 5) -> float:
    fn(tiles[:8])  # compile / load the kernel
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn(tiles)
        best = min(best, time.process_time() - t0)
    return best / len(tiles) * 1e3


def pen_cpu_s(thumbs, repeats: int = 5) -> float:
    """Median over ``thumbs`` of the pen detector's best-of-``repeats`` CPU seconds on one thumbnail (its tissue mask
    made beforehand, as describe does)."""
    tissue_config, per_slide = config_from_dict({}).tissue, []
    for thumb in thumbs:
        tissue_px = tissue_mask(thumb, tissue_config, 8.0)
        pen_pixels(thumb, tissue_px)  # imports, first-call costs
        best = float("inf")
        for _ in range(repeats):
            t0 = time.process_time()
            pen_pixels(thumb, tissue_px)
            best = min(best, time.process_time() - t0)
        per_slide.append(best)
    return float(np.median(per_slide))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[200, 300, 400, 500])
    ap.add_argument("--sweep-seed", type=int, default=100, help="a negative seed: no sweep")
    ap.add_argument("--n-per-class", type=int, default=4)
    ap.add_argument("--inked-min", type=float, default=0.25)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    root = a.out or Path(tempfile.mkdtemp(prefix="qc-bench-"))
    result: dict = {"settings": {"n_per_class": a.n_per_class, "inked_min": a.inked_min, "slide_px": 3000,
                                 "mpp": MPP, "tile_px": 256, "defaults": config_from_dict({}).qc.model_dump()}}
    if a.sweep_seed >= 0:
        slides = make_cohort(root / f"cohort{a.sweep_seed}", a.sweep_seed, a.n_per_class)
        describe([root / f"cohort{a.sweep_seed}"], root / f"out{a.sweep_seed}", ["pen", "blur", "debris"])
        swept = sweep(root / f"out{a.sweep_seed}", slides, a.inked_min, [2.75, 3.0, 3.25, 3.5], [0.1, 0.15, 0.2],
                      [0.05, 0.08, 0.12, 0.3])
        result["sweep"] = {"seed": a.sweep_seed, **swept}
    result["report"] = {}
    for seed in a.seeds:
        slides = make_cohort(root / f"cohort{seed}", seed, a.n_per_class)
        describe([root / f"cohort{seed}"], root / f"out{seed}", ["pen", "blur", "debris"])
        result["report"][str(seed)] = evaluate(root / f"out{seed}", slides, a.inked_min)
        result["report"][str(seed)]["inked_kept_at_10pct"] = evaluate(root / f"out{seed}", slides, 0.10)["inked_kept"]
        result["report"][str(seed)]["slides_keeping_inked"] = slides_keeping_inked(root / f"out{seed}", slides,
                                                                                  a.inked_min)
        clean = make_cohort(root / f"clean{seed}", seed, a.n_per_class, artefacts=False)
        describe([root / f"clean{seed}"], root / f"cleanout{seed}", ["pen", "blur", "debris"])
        row = evaluate(root / f"cleanout{seed}", clean, a.inked_min)
        result["report"][str(seed)]["clean_copy"] = {"clean_tiles": row["tiles"]["clean"],
                                                     "clean_lost": row["clean_lost"]}
    # cost: clean copies of the first report cohort, described without and with QC
    paths = sorted((root / f"clean{a.seeds[0]}").glob("*.svs"))
    describe(paths, root / "warm", [])  # compile kernels, warm the page cache
    off = min(describe(paths, root / f"off{i}", []) for i in range(a.repeats))
    on = min(describe(paths, root / f"on{i}", ["pen", "blur", "debris"]) for i in range(a.repeats))
    tiles = sum(int(read_array(store_path(root / "off0", p.stem), "tissue_mask").sum()) for p in paths)
    lost = tiles - sum(int(read_array(store_path(root / "on0", p.stem), "tissue_mask").sum()) for p in paths)
    real = tissue_tiles(paths, root / "off0", 2000)
    blur_ms = cpu_ms_per_tile(focus_scores, real)
    blur_numpy_ms = cpu_ms_per_tile(lambda t: scores_from_sums(cell_sums_numpy(t, GRID_CELLS), 254 * 254),
                                    real[:200], 1)
    pen_s = pen_cpu_s([read_array(store_path(root / "on0", p.stem), "thumbnail") for p in paths])
    thumb = read_array(store_path(root / "on0", paths[0].stem), "thumbnail")
    result["cost"] = {"slides": len(paths), "tissue_tiles": tiles, "clean_tiles_lost": lost,
                      "describe_cpu_s_qc_off": round(off, 2), "describe_cpu_s_qc_on": round(on, 2),
                      "tiles_per_s_qc_off": round(tiles / off, 1), "tiles_per_s_qc_on": round(tiles / on, 1),
                      "slowdown": round(on / off - 1, 3), "blur_score_cpu_ms_per_tile": round(blur_ms, 4),
                      "blur_score_numpy_fallback_cpu_ms_per_tile": round(blur_numpy_ms, 3),
                      "blur_timed_tiles": len(real),
                      "pen_cpu_ms_per_slide_thumbnail": round(pen_s * 1e3, 2), "thumbnail_px": list(thumb.shape[:2])}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
