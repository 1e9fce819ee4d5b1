"""The stain estimate leaves out what describe leaves out: a marker stroke under a ``Pen`` annotation must not move a
slide's Macenko vectors (it turned pen-marked demo slides' estimates into non-H&E ones, docs/design/classifier.md)."""

from types import SimpleNamespace

import numpy as np

from pipeline.core.config import config_from_dict
from pipeline.describe.stain_cohort import excluded_pixels
from pipeline.slides.stain import estimate_stain
from pipeline.slides.tissue import tissue_mask
from sample_data.artefacts import ArtefactTissue, write_geojson
from sample_data.synthetic import SyntheticTissue

MPP, DS = 0.25, 32  # level 0 and the mask resolution's downsample (8 µm/px)


def _angle_deg(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.degrees(np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1, 1))))


def test_pen_annotation_keeps_the_stain_estimate(tmp_path):
    base = SyntheticTissue(6000, 4500, seed=100003, lesion=False, tissue_fraction=0.5)
    inked = ArtefactTissue(base, seed=100003, pens=1, blurs=0)
    write_geojson(tmp_path / "slide_000.geojson", inked.annotations_geojson(exclude=False, pen=True))
    config = config_from_dict({"qc": [], "annotations": {"dir": str(tmp_path)}})
    info = SimpleNamespace(width_px=6000, height_px=4500)
    h, w = 4500 // DS, 6000 // DS
    clean = base.render(0, 0, w, h, downsample=DS)
    thumb = inked.render(0, 0, w, h, downsample=DS)
    mask = tissue_mask(thumb, config.tissue, MPP * DS)
    reference = estimate_stain(clean, tissue_mask(clean, config.tissue, MPP * DS), config.stain)
    excluded = excluded_pixels(thumb, mask, DS, info, config, "slide_000")
    assert 0 < excluded.sum() < mask.sum() / 2
    kept = estimate_stain(thumb, mask & ~excluded, config.stain)
    assert kept["status"] == "estimated"
    ref_h, kept_h = reference["estimate"]["stain_vectors"][0], kept["estimate"]["stain_vectors"][0]
    assert _angle_deg(ref_h, kept_h) < 3.0
    inked_all = estimate_stain(thumb, mask, config.stain)  # the ink in the estimate: far off, or not H&E at all
    moved = [_angle_deg(r, i) for r, i in zip(reference["estimate"]["stain_vectors"],  # H, E (here the ink moves E)
                                              (inked_all["estimate"] or {}).get("stain_vectors", []))]
    assert inked_all["status"] != "estimated" or max(moved) > 6
