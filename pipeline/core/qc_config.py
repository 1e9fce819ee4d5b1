"""The ``qc`` and ``annotations`` sections of the run configuration (``pipeline/core/config.py``), kept here so that
module stays short. Used by ``pipeline/slides/qc/`` and ``pipeline/slides/annotations.py``."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from .config_section import Section
from .qc_codes import DETECTOR_NAMES


class QcConfig(Section):
    """Artifact QC (see pipeline/slides/qc/): excluded tissue tiles are not described; the store's ``qc_code`` says
    why. In YAML a bare list is the detectors: ``qc: [pen, blur, debris]``; ``qc: []`` turns QC off."""

    detectors: list[str] = Field(["pen", "blur", "debris"], description="artifact detectors, applied in this order "
                                                                        "(pen, blur, debris; [] = no QC)")
    pen_distance: float = Field(3.25, gt=0, description="pen: robust (Mahalanobis) colour distance from the slide's "
                                                      "tissue beyond which a thumbnail pixel darker than the tissue "
                                                      "is ink (pixels of ink's colour: beyond 2)")
    pen_tile_fraction: float = Field(0.15, gt=0, le=1,
                                     description="pen: a tile is excluded when this share of it is ink")
    blur_ratio: float = Field(0.08, gt=0, lt=1, description="blur: a tile is out of focus when the Laplacian energy "
                                                           "over grey variance of 30% of its stained area (4 x 4 "
                                                           "cells) is below this share of the slide's 75th percentile")
    debris_tile_fraction: float = Field(0.7, gt=0, le=1, description="debris: a tile is excluded when this share of "
                                                                     "it is near-black or near-white")

    @model_validator(mode="before")
    @classmethod
    def _list_is_detectors(cls, data: Any) -> Any:
        return {"detectors": list(data)} if isinstance(data, (list, tuple)) else data

    @model_validator(mode="after")
    def _known_detectors(self):
        unknown = [d for d in self.detectors if d not in DETECTOR_NAMES]
        if unknown or len(set(self.detectors)) != len(self.detectors):
            raise ValueError(f"detectors must be distinct names among {list(DETECTOR_NAMES)}, got {self.detectors}")
        return self


class AnnotationsConfig(Section):
    """QuPath annotations (see pipeline/slides/annotations.py): ``<dir>/<slide_id>.geojson``, level-0 pixels. A tile
    belongs to an annotation when its centre lies inside it. The files' content is part of each slide's fingerprint."""

    dir: str | None = Field(None, description="folder of QuPath GeoJSON exports, one <slide_id>.geojson per slide")
    exclude: list[str] = Field(["Exclude", "Pen", "Artifact"], description="tiles inside annotations of these "
                                                                           "classes are not described")
    include: list[str] = Field([], description="when a slide has annotations of these classes, only tiles inside "
                                               "them are described")
    cam_classes: dict[str, str] = Field({}, description="model label -> annotation class its CAM should point at "
                                                         "(pointing game, IoU in metrics.json); a label not listed "
                                                         "is matched to the annotation class of the same name")
