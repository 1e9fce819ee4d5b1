"""Stain normalisation: each slide's stain is estimated once on its tissue, a cohort target is fitted, and one fixed
per-slide colour transform is applied to every tile before descriptors.

* ``macenko``: stain vectors and concentration maxima (Macenko's fit, as torchstain's), applied as one 3x3 map in
  optical density;
* ``reinhard``: CIELAB means and spreads of the tissue (scikit-image colour conversions);
* ``estimate``: the checks around both (too little tissue, a dark/fluorescence image, stains that are not H&E) and
  the per-slide transform; ``transform``: applying it to a batch of tiles;
* ``cohort``: the first describe pass (every slide's estimate, cached) and the cohort target.
"""

from .estimate import estimate_stain, fit_target, slide_transform
from .transform import apply_stain_transform

__all__ = ["estimate_stain", "fit_target", "slide_transform", "apply_stain_transform"]
