"""A second lab's stain on a slide's pixels: other haematoxylin and eosin vectors, other stain amounts and a
slightly yellow lamp (Beer-Lambert in optical density), for stain-batch cohorts and tests.

``restain(rgb, lab)`` recolours pixels; ``StainBatch(tissue, lab)`` wraps a generated slide (``SyntheticTissue`` or
``TexturedTissue``) so that ``write_slide`` writes it in that lab's stain.  The first lab is the H&E of the generated
slides (vectors measured with Macenko on CMU-1); its pixels are unmixed on its vectors plus their cross product (the
residual keeps its own axis) and remixed on the second lab's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FIRST_LAB_VECTORS = ((0.51, 0.77, 0.39), (0.19, 0.85, 0.50))  # H, E optical density (CMU-1, torchstain Macenko)


@dataclass(frozen=True)
class Lab:
    """A lab's stain: unit H and E optical-density vectors, stain amounts relative to the first lab, lamp gains."""

    name: str = "lab_b"
    h_vector: tuple[float, float, float] = (0.64, 0.72, 0.27)
    e_vector: tuple[float, float, float] = (0.08, 0.88, 0.46)
    h_amount: float = 1.3
    e_amount: float = 0.75
    lamp: tuple[float, float, float] = (0.99, 0.96, 0.90)


SECOND_LAB = Lab()


def _unit(v) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def od_map(lab: Lab = SECOND_LAB) -> np.ndarray:
    """(3, 3) matrix M with OD_lab = M @ OD_first (column vectors)."""
    h1, e1 = (_unit(v) for v in FIRST_LAB_VECTORS)
    r = _unit(np.cross(h1, e1))
    first = np.stack([h1, e1, r], axis=1)
    second = np.stack([_unit(lab.h_vector), _unit(lab.e_vector), r], axis=1)
    return second @ np.diag([lab.h_amount, lab.e_amount, 1.0]) @ np.linalg.inv(first)


def restain(rgb: np.ndarray, lab: Lab = SECOND_LAB) -> np.ndarray:
    """uint8 (..., 3) pixels in ``lab``'s stain (glass stays glass, dimmed by the lamp)."""
    od = -np.log((rgb.astype(np.float32) + 0.5) / 255.5)
    out = np.exp(-(od @ od_map(lab).T.astype(np.float32))) * 255.5 - 0.5
    out *= np.asarray(lab.lamp, np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class StainBatch:
    """A generated slide rendered in another lab's stain; ``write_slide`` and ``slide_spec`` take it like the slide."""

    def __init__(self, tissue, lab: Lab = SECOND_LAB):
        self.tissue = tissue
        self.lab = lab
        # slide_spec hashes the seed: a restained slide must not pass for the original one
        self.seed = int(tissue.seed) * 7919 + sum(map(ord, lab.name))

    def __getattr__(self, name):
        return getattr(self.__dict__["tissue"], name) if "tissue" in self.__dict__ else super().__getattribute__(name)

    def __reduce__(self):
        return (StainBatch, (self.tissue, self.lab))

    def render(self, x0: int, y0: int, w: int, h: int, downsample: float = 1.0) -> np.ndarray:
        return restain(self.tissue.render(x0, y0, w, h, downsample=downsample), self.lab)


def stain_batch_ids(slide_ids: list[str]) -> set[str]:
    """The half of a cohort that gets the second lab's stain: every other slide in id order (both classes)."""
    return set(sorted(slide_ids)[1::2])


def stain_batch_wrap(n_per_class: int, seed: int = 0, lab: Lab = SECOND_LAB):
    """``wrap`` for ``sample_data.synthetic.make_cohort``: the slides of ``stain_batch_ids`` in ``lab``'s stain."""
    batch = stain_batch_ids([f"slide_{i:03d}" for i in range(2 * int(n_per_class))])
    return lambda slide_id, tissue: StainBatch(tissue, lab) if slide_id in batch else tissue
