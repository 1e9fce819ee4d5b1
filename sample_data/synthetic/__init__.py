"""Synthetic H&E-like whole-slide images, written as real pyramidal tiled JPEG TIFFs.

Everything here is *procedural*: a pixel's value is a pure function of its level-0 coordinates (and the
slide's seed), so any region of any level can be rendered on demand, in any order and in any pieces, with
identical results.  That lets :func:`write_slide` stream a gigapixel slide tile by tile into tifffile without
ever holding a level in memory.

How a pixel is made
-------------------
* Large-scale fields (tissue, nuclear density, eosin strength, lesion) are evaluated on a fixed lattice of
  level-0 points (spacing :data:`LATTICE` px, anchored at the origin) and interpolated bilinearly.  Tissue =
  a few random elliptical blobs + fractal value noise, thresholded so that ~``tissue_fraction`` of the slide is
  covered; the lesion = a noisy ellipse placed deep inside tissue, sized to cover ~10-20 % of the tissue (large
  nuclei on pale eosinophilic cytoplasm); cellular basophilic patches (denser nuclei, less eosin) in all tissue.
* Fine detail (collagen fibre texture, nuclei, pixel noise) comes from two precomputed periodic "sheets"
  (periods 769 and 577 px, coprime, so their combination repeats only every ~444k px) sampled at
  ``(x + offset) mod period``; the per-slide offsets depend on the seed.  Every nucleus in a sheet carries a
  random rank in [0, 1); it is drawn where ``rank < local nuclear density`` (fading in over a narrow rank
  band, so a density change across a nucleus dims it rather than cutting it).  The sheets are built once per
  process on first use (~2 s).
* Hematoxylin and eosin amounts are turned into RGB with a Beer-Lambert lookup table (which also holds the
  pixel noise), so the colour step is one gather.
* Lower pyramid levels are rendered with the same function, supersampled (up to 4x4 samples per pixel, exact
  level-0 pixel positions), so level 1 at downsample 4 is exactly the box-filtered level 0.

Speed (one core of a shared 2-core box): level-0 render ~60-70 Mpx/s, render + JPEG ~40 Mpx/s; a full
(1, 4, 16) pyramid ~23 Mpx/s of level-0 area (level 1 costs about as much as level 0 because of the 4x4
supersampling).  A 40000 x 30000 slide writes in about a minute (~190 MB at Q=85).

Coordinates: level-0 pixel ``(i, j)`` covers ``[i, i+1) x [j, j+1)``; its centre is ``(i + 0.5, j + 0.5)``.
:meth:`SyntheticTissue.tissue_at` / :meth:`SyntheticTissue.lesion_at` take continuous level-0 coordinates.

Modules: ``noise`` (constants, lattice value noise, the periodic detail sheets, the colour lookup table), ``tissue``
(``SyntheticTissue``: the fields and the ground truth), ``render`` (its pixels), ``writing`` (pyramidal TIFFs and flat
images, ``slide_spec``), ``cohort`` (``cohort_plan``, ``make_cohort``). A test-and-demo helper: the pipeline itself
never imports it.
"""

from __future__ import annotations

from .cohort import cohort_plan, make_cohort
from .noise import BACKGROUND_RGB
from .tissue import SyntheticTissue
from .writing import atomic_target, slide_levels, slide_spec, write_flat_image, write_slide, written_spec

__all__ = [
    "SyntheticTissue",
    "write_slide",
    "write_flat_image",
    "make_cohort",
    "cohort_plan",
    "slide_levels",
    "slide_spec",
    "written_spec",
    "atomic_target",
    "BACKGROUND_RGB",
]
