"""The second lab's stain: Beer-Lambert recolouring of real H&E, and the cohort hook of make_cohort."""

from __future__ import annotations

import numpy as np
import openslide

from pipeline.slides.stain.macenko import macenko_estimate
from sample_data.stain_batch import FIRST_LAB_VECTORS, SECOND_LAB, StainBatch, od_map, restain, stain_batch_wrap
from sample_data.synthetic import SyntheticTissue, make_cohort, slide_spec
from tests.conftest import shared_file


def test_od_map_moves_the_first_labs_vectors_to_the_seconds():
    m = od_map()
    for first, second, amount in zip(FIRST_LAB_VECTORS, (SECOND_LAB.h_vector, SECOND_LAB.e_vector),
                                     (SECOND_LAB.h_amount, SECOND_LAB.e_amount)):
        moved = m @ (np.asarray(first) / np.linalg.norm(first))
        assert np.allclose(moved, amount * np.asarray(second) / np.linalg.norm(second))


def test_restained_real_tile_has_the_second_labs_stain():
    from PIL import Image

    tile = np.asarray(Image.open(shared_file("histolab", "tiles", "tissue-level2-4640-4649-8736-8746.png"))
                      .convert("RGB"))
    other = restain(tile)
    assert other.dtype == np.uint8 and other.shape == tile.shape
    white = np.full((1, 1, 3), 255, np.uint8)
    assert np.abs(restain(white)[0, 0] - 255 * np.array(SECOND_LAB.lamp)).max() <= 1  # no stain: only the lamp
    he = {}
    for name, image in (("first", tile), ("second", other)):
        glass_rgb = np.percentile(image.reshape(-1, 3), 99, axis=0) + 1
        he[name] = np.array(macenko_estimate(image.reshape(-1, 3), glass_rgb, 0.15, 1.0)["stain_vectors"])
    h_shift = np.degrees(np.arccos(he["first"][0] @ he["second"][0]))
    assert h_shift > 5  # the haematoxylin of the second lab is bluer
    assert np.degrees(np.arccos(he["second"][0] @ np.asarray(SECOND_LAB.h_vector) / np.linalg.norm(
        SECOND_LAB.h_vector))) < h_shift


def test_cohort_with_a_stain_batch(tmp_path):
    out = make_cohort(tmp_path / "cohort", n_per_class=2, width_px=768, height_px=640, mpp=0.5, seed=3,
                      wrap=stain_batch_wrap(2, 3))
    means = {}
    for path in sorted(out.glob("*.svs")):
        with openslide.OpenSlide(str(path)) as slide:
            means[path.stem] = np.asarray(slide.read_region((0, 0), 0, (40, 40)).convert("RGB")).reshape(-1, 3).mean(0)
    # the glass corner of slides 1 and 3 is lit by the second lab's yellower lamp
    for sid, mean in means.items():
        yellow = mean[0] - mean[2]
        assert (yellow > 6) == (sid in {"slide_001", "slide_003"}), (sid, mean)
    tissue = SyntheticTissue(768, 640, seed=1)
    assert slide_spec(StainBatch(tissue), 0.5, (1,), 256, 85) != slide_spec(tissue, 0.5, (1,), 256, 85)
