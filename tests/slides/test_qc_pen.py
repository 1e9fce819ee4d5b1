"""The pen detector on thumbnails (8 µm/px, as describe runs it): strokes of one colour that cover much of the
tissue, the real CMU-1 tissue with strokes, a second lab's stain and its lesion slides, and the ink-colour prior."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.config import config_from_dict
from pipeline.slides.qc.pen import colour_features, ink_like, pen_pixels
from pipeline.slides.tissue import tissue_mask
from sample_data.artefacts import INKS, LOW, ArtefactTissue, ImageTissue, PenStroke
from sample_data.stain_batch import StainBatch
from sample_data.textured import TexturedTissue

DS = 16  # thumbnail downsample: 8 µm/px at 0.5 µm/px
TILE = 16  # thumbnail pixels per 256-px tile (8 for the small CMU region: 128-px tiles, as its describe test)
TISSUE = config_from_dict({}).tissue


def _thumbnail(slide, mpp: float = 0.5, tile: int = TILE) -> tuple[np.ndarray, np.ndarray]:
    """(thumbnail, tissue mask) of ``slide`` at 1/DS, cut to whole tiles."""
    h, w = slide.height_px // DS // tile * tile, slide.width_px // DS // tile * tile
    thumb = slide.render(0, 0, w, h, downsample=DS)
    return thumb, tissue_mask(thumb, TISSUE, mpp * DS)


def _ink_alpha(slide, shape) -> np.ndarray:
    """The generator's ink opacity at the thumbnail's pixels (block mean of its 1/LOW field)."""
    k, (h, w) = DS // LOW, shape
    return slide.ink_alpha_low[:h * k, :w * k].reshape(h, k, w, k).mean(axis=(1, 3))


def _per_tile(mask: np.ndarray, tile: int) -> np.ndarray:
    h, w = mask.shape
    return mask.reshape(h // tile, tile, w // tile, tile).mean(axis=(1, 3))


def _outcome(slide, mpp: float = 0.5, tile: int = TILE) -> tuple[float, float, float]:
    """(inked tiles kept, clean tissue tiles lost, ink share of the tissue pixels) with the describe rule: a tile goes
    when 15% of it is ink; inked = ink over a quarter of it, clean = no ink; both at least half tissue."""
    thumb, tissue_px = _thumbnail(slide, mpp, tile)
    alpha = _ink_alpha(slide, tissue_px.shape)
    flagged = _per_tile(pen_pixels(thumb, tissue_px), tile) >= 0.15
    tissue, ink = _per_tile(tissue_px, tile) >= 0.5, _per_tile(alpha > 0.1, tile)
    inked, clean = tissue & (ink >= 0.25), tissue & (ink == 0)
    assert inked.sum() >= 10 and clean.sum() >= 20
    return float((~flagged[inked]).mean()), float(flagged[clean].mean()), float((alpha[tissue_px] > 0.1).mean())


def _arcs(colour: str, size: int, opacity: float = 0.75) -> list[PenStroke]:
    """Two wide arcs of one colour around the slide's middle."""
    return [PenStroke(colour, (size * 0.5, size * 0.5), 0.3 * size, start, 1.3 * np.pi, 0.09 * size, opacity)
            for start in (0.0, np.pi)]


@pytest.mark.parametrize("second_lab", [False, True])
@pytest.mark.parametrize("colour", ["black", "blue", "green", "red"])
def test_two_strokes_of_one_colour_over_much_of_the_tissue_are_caught(colour, second_lab):
    """Two strokes of one colour over a quarter or more of the tissue: the ink is no tissue colour mode to the model
    (the 90%-support fit took such ink in before: black + black kept every inked tile). Also on a second lab's
    stain, whose bluer haematoxylin lies near blue ink."""
    tissue = TexturedTissue(3000, 3000, seed=21, tissue_fraction=0.55)
    slide = ArtefactTissue(StainBatch(tissue) if second_lab else tissue, seed=3, strokes=_arcs(colour, 3000),
                           regions=[])
    inked_kept, clean_lost, ink_share = _outcome(slide)
    assert ink_share >= 0.25
    assert inked_kept <= 0.05
    assert clean_lost <= 0.02


def test_strokes_on_the_real_cmu_tissue(cmu_slide):
    """The real Aperio region with two black strokes (the hardest colour: it only darkens the tissue's own hue) and
    with a blue and a red one: inked tiles go, at most 2% of the clean tissue tiles with them."""
    import openslide

    with openslide.OpenSlide(str(cmu_slide)) as handle:
        rgb = np.asarray(handle.read_region((0, 0), 0, handle.dimensions).convert("RGB"))
    size = min(rgb.shape[:2])
    for strokes in (_arcs("black", size), _arcs("blue", size)[:1] + _arcs("red", size)[1:]):
        slide = ArtefactTissue(ImageTissue(rgb), seed=1, strokes=strokes, regions=[])
        inked_kept, clean_lost, _ = _outcome(slide, mpp=0.499, tile=8)
        assert inked_kept <= 0.05
        assert clean_lost <= 0.02
    clean = ArtefactTissue(ImageTissue(rgb), seed=1, strokes=[], regions=[])
    thumb, tissue_px = _thumbnail(clean, 0.499, 8)
    assert pen_pixels(thumb, tissue_px)[tissue_px].mean() <= 0.02  # its own edge carries a little real teal ink


@pytest.mark.parametrize("seed", [31, 32])
def test_a_second_labs_stain_is_not_ink(seed):
    """Lesion slides in the second lab's stain (bluer haematoxylin, more of it, a yellow lamp): their pale eosin lies
    far from a model that the dense lesion pulls over, but it is lighter than the tissue and has no ink's colour
    (the distance alone flagged 11% of such benign tissue)."""
    tissue = TexturedTissue(3000, 3000, seed=seed, lesion=True, tissue_fraction=0.5, lesion_fraction=0.25)
    for slide in (tissue, StainBatch(tissue)):
        thumb, tissue_px = _thumbnail(slide)
        assert tissue_px.sum() > 5000
        assert pen_pixels(thumb, tissue_px)[tissue_px].mean() <= 0.01


def test_ink_like_colours():
    """Every marker colour, over glass or over pink tissue, is ink-like where the ink is dense; tissue of both labs'
    stains hardly ever. (Thin ink over dense tissue need not be: the prior only keeps a stroke's bulk out of the fit.)"""
    glass, pink = np.array([240.0, 238, 242]), np.array([235.0, 150, 200])
    for colour, transmittance in INKS.items():
        for under in (glass, pink):
            for opacity in (0.75, 0.85):
                rgb = under * (1 - opacity + opacity * np.asarray(transmittance))
                assert ink_like(colour_features(np.rint(rgb).astype(np.uint8)[None]))[0], (colour, under, opacity)
    tissue = TexturedTissue(3000, 3000, seed=33, lesion=True, tissue_fraction=0.5)
    for slide in (tissue, StainBatch(tissue)):
        thumb, tissue_px = _thumbnail(slide)
        assert ink_like(colour_features(thumb[tissue_px])).mean() <= 0.05


def test_robust_fit_of_a_constant_feature_stays_finite():
    """A colour feature constant over the fit makes its covariance singular: the pseudo-inverse takes over."""
    from pipeline.slides.qc.pen import robust_fit

    x = np.random.default_rng(0).normal(size=(500, 3))
    x[:, 2] = 0.7
    centre, precision = robust_fit(x, 0.9)
    assert np.isfinite(centre).all() and np.isfinite(precision).all()
    assert centre[2] == 0.7 and np.allclose(precision[2], 0.0)
    regular_centre, regular_precision = robust_fit(np.random.default_rng(1).normal(size=(500, 3)), 0.9)
    assert np.abs(regular_centre).max() < 0.2 and np.allclose(np.diag(regular_precision), 1.0, atol=0.35)
