"""The demo cohort: a seeded plan of two-class slides (``cohort_plan``, the ground truth) written with their labels
(``make_cohort``); slides already written from the same plan entry and settings are kept.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .tissue import SyntheticTissue
from .writing import atomic_target, slide_spec, write_slide, written_spec


def make_cohort(out_dir: str | os.PathLike, n_per_class: int = 6, width_px: int = 6000, height_px: int = 4500,
                mpp: float | None = 0.25, seed: int = 0, *, levels: Sequence[float] = (1, 4, 16),
                quality: int = 85, tissue_fraction: tuple[float, float] = (0.35, 0.6),
                lesion_fraction: tuple[float, float] | None = None, verbose: bool = False, wrap=None) -> Path:
    """Write a two-class demo cohort: ``<out_dir>/<slide_id>.svs`` (Aperio-style TIFF) + ``labels.csv``.

    Class 0 slides have no lesion, class 1 slides have a planted lesion covering a share of the tissue drawn from
    ``lesion_fraction`` (None: 10-20 %); tissue shape and placement vary with each slide's seed.  Slides that already
    exist from the same plan entry and settings (``slide_spec``) are kept, so reruns are quick and a changed cohort is
    rewritten.
    ``labels.csv`` has the header ``slide_id,label`` and integer labels 0/1.
    ``wrap(slide_id, tissue)``: the tissue to write instead (e.g. ``sample_data.stain_batch.StainBatch``), or None.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tile_px = 256
    rows = []
    for sid, lab, tissue in cohort_plan(n_per_class, width_px, height_px, seed, tissue_fraction, lesion_fraction):
        rows.append((sid, lab))
        tissue = wrap(sid, tissue) if wrap is not None else tissue
        path = out / f"{sid}.svs"
        # kept only when written from the same plan entry: a cohort of another size or seed gives slide i
        # another label and lesion
        if path.exists() and written_spec(path) == slide_spec(tissue, mpp, levels, tile_px, quality):
            continue
        if verbose:
            print(f"writing {path} (label {lab})", flush=True)
        write_slide(path, tissue, mpp=mpp, levels=levels, tile_px=tile_px, quality=quality, style="aperio")
    text = "slide_id,label\n" + "".join(f"{s},{lab}\n" for s, lab in rows)
    lab_path = out / "labels.csv"
    if not (lab_path.exists() and lab_path.read_text() == text):
        tmp = atomic_target(lab_path)
        with open(tmp, "x", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows([("slide_id", "label"), *rows])
        os.replace(tmp, lab_path)
    return out


def cohort_plan(n_per_class: int = 6, width_px: int = 6000, height_px: int = 4500, seed: int = 0,
                tissue_fraction: tuple[float, float] = (0.35, 0.6),
                lesion_fraction: tuple[float, float] | None = None) -> list[tuple[str, int, SyntheticTissue]]:
    """(slide_id, label, tissue) of every slide ``make_cohort`` writes with these arguments: the ground truth."""
    n = 2 * int(n_per_class)
    rng = np.random.default_rng([seed, 0xC0])
    labels = np.array([0, 1] * int(n_per_class))
    rng.shuffle(labels)  # slide ids do not give the class away
    plan = []
    for i in range(n):
        lab = int(labels[i])
        rng_i = _rng_for(seed, i)
        tf = float(rng_i.uniform(*tissue_fraction))
        lf = float(rng_i.uniform(*lesion_fraction)) if lesion_fraction is not None and lab else None
        tissue = SyntheticTissue(width_px, height_px, seed=seed * 100003 + i, lesion=bool(lab), tissue_fraction=tf,
                                 lesion_fraction=lf)
        plan.append((f"slide_{i:03d}", lab, tissue))
    return plan


def _rng_for(seed: int, i: int) -> np.random.Generator:
    """Per-slide generator for cohort parameters (independent of how many slides are made)."""
    return np.random.default_rng([seed, i, 0xC1])
