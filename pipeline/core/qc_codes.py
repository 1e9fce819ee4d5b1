"""The per-tile QC codes, defined once: the store's ``qc_code`` array, the manifest, the report and the viewer.

``0`` = kept (or not tissue: ``tissue_fraction`` tells). Every other code is one reason a tissue tile was excluded
and not described. Artifact detectors (``pipeline/slides/qc/``) are named after their code; a new detector needs a
new code here.
"""

from __future__ import annotations

KEPT = 0
QC_CODES: dict[str, int] = {
    "pen": 1,                 # marker ink (blue, green, black, red) on the slide
    "blur": 2,                # out of focus relative to the slide's own tiles
    "debris": 3,              # near-black dirt or near-white bubbles/holes inside the tissue mask
    "annotation_exclude": 4,  # inside an annotation of an excluded class (annotations.exclude)
    "annotation_outside": 5,  # outside every annotation of the included classes (annotations.include)
}
QC_NAMES: dict[int, str] = {code: name for name, code in QC_CODES.items()}
QC_COLOURS: dict[int, tuple[int, int, int]] = {1: (30, 90, 230), 2: (250, 160, 0), 3: (120, 80, 40), 4: (230, 50, 50),
                                               5: (150, 150, 150)}  # how pictures show each reason
DETECTOR_NAMES: tuple[str, ...] = ("pen", "blur", "debris")  # codes an artifact detector sets


def qc_counts(qc_code, tissue) -> dict[str, int]:
    """{reason: number of tissue tiles excluded for it} (reasons with no tile left out)."""
    import numpy as np

    codes = np.asarray(qc_code)[np.asarray(tissue, dtype=bool)]
    return {QC_NAMES[int(c)]: int(n) for c, n in zip(*np.unique(codes, return_counts=True)) if c != KEPT}
