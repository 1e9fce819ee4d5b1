"""Artifact QC with real pixels: pen strokes drawn on the real Aperio slide and on a generated real-texture slide,
a blurred region, debris, the detector registry and ``qc: []``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.core.config import config_from_dict
from pipeline.core.errors import ConfigError
from pipeline.core.parallel import LocalRunner
from pipeline.core.qc_codes import DETECTOR_NAMES, QC_CODES, qc_counts
from pipeline.core.store import read_array, read_attrs, store_path
from pipeline.describe.runner import describe_slides
from pipeline.slides.qc import registry, thumbnail_qc
from pipeline.slides.qc.debris import debris_pixels
from pipeline.slides.tiling import TileGrid
from sample_data.artefacts import ArtefactTissue, ImageTissue, PenStroke
from sample_data.synthetic.writing import write_slide

INKED_MIN = 0.25  # a tile is "inked" when ink covers at least a quarter of it


def _describe(slide_path, out, qc=("pen", "blur", "debris"), tile_px=256):
    config = config_from_dict({"qc": list(qc), "tiling": {"tile_px": tile_px}})
    summary = describe_slides([slide_path], out, config, runner=LocalRunner(), progress=False)
    assert summary["done"] == 1, json.loads((out / "manifest.json").read_text())
    return store_path(out, slide_path.stem)


def _stained_share(slide, grid) -> np.ndarray:
    """(rows, cols) share of each tile's level-0 pixels that are stained (not near-white) before the artefacts."""
    rgb = slide.base.render(0, 0, slide.width_px, slide.height_px)
    stained = rgb.min(axis=-1) < 215
    n = int(round(grid.tile_l0_px))
    return np.array([[stained[r * n:(r + 1) * n, c * n:(c + 1) * n].mean() for c in range(grid.cols)]
                     for r in range(grid.rows)])


def _outcome(store, slide):
    """(inked tiles excluded share, clean tissue tiles lost share, counts) against the generator's ground truth.

    Inked: tissue tiles (the tissue mask's) ink covers a quarter of at least; clean: tiles at least half stained
    tissue before the strokes were drawn, with no ink and no blur."""
    grid = TileGrid.from_dict(read_attrs(store)["tile_grid"])
    tissue = read_array(store, "tissue_fraction") >= 0.5
    excluded = read_array(store, "qc_code") != 0
    ink = slide.ink_fraction_at_tiles(grid)
    inked = tissue & (ink >= INKED_MIN)
    clean = tissue & (ink == 0) & (slide.blur_fraction_at_tiles(grid) == 0) & (_stained_share(slide, grid) >= 0.5)
    return (excluded[inked].mean(), excluded[clean].mean(), int(inked.sum()), int(clean.sum()))


@pytest.fixture(scope="module")
def inked_cmu(tmp_path_factory, cmu_slide):
    """The real CMU-1 Aperio region (0.499 µm/px) with a blue, a green, a black and a red stroke across its tissue,
    written as a pyramidal Aperio-style TIFF with the same mpp."""
    import openslide

    with openslide.OpenSlide(str(cmu_slide)) as handle:
        rgb = np.asarray(handle.read_region((0, 0), 0, handle.dimensions).convert("RGB"))
    h, w = rgb.shape[:2]
    strokes = [PenStroke(colour, (w * cx, h * cy), 0.3 * min(w, h), start, 0.8 * np.pi, 0.05 * min(w, h), 0.75)
               for colour, cx, cy, start in (("blue", 0.35, 0.3, 0.0), ("green", 0.65, 0.55, 1.5),
                                              ("black", 0.4, 0.75, 3.0), ("red", 0.6, 0.3, 4.5))]
    slide = ArtefactTissue(ImageTissue(rgb), seed=1, strokes=strokes, regions=[])
    path = tmp_path_factory.mktemp("inked_cmu") / "cmu_inked.svs"
    write_slide(path, slide, mpp=0.499, levels=(1, 4), tile_px=256, quality=90, objective_power=20)
    return path, slide


def test_pen_on_the_real_aperio_slide_is_excluded(inked_cmu, tmp_path):
    path, slide = inked_cmu
    store = _describe(path, tmp_path / "out", tile_px=128)  # 64 µm tiles: ~400 tissue tiles on this small region
    inked_excluded, clean_lost, n_inked, n_clean = _outcome(store, slide)
    print(f"CMU: {n_inked} inked tiles, {inked_excluded:.1%} excluded; {n_clean} clean, {clean_lost:.1%} lost")
    assert n_inked >= 15 and n_clean >= 30
    assert inked_excluded >= 0.95
    assert clean_lost <= 0.02
    codes = read_array(store, "qc_code")
    assert np.isnan(read_array(store, "descriptors")[codes != 0]).all()  # excluded tiles are not described
    assert not read_array(store, "tissue_mask")[codes != 0].any()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["slides"]["cmu_inked"]["qc"]["pen"] == int((codes == QC_CODES["pen"]).sum())


@pytest.fixture(scope="module")
def artefact_slide(tmp_path_factory):
    """A generated real-texture slide with two strokes and two blurred regions (ground truth from the generator)."""
    from sample_data.textured import TexturedTissue

    slide = ArtefactTissue(TexturedTissue(3000, 3000, seed=11, tissue_fraction=0.6), seed=5, pens=2, blurs=2,
                           colours=("blue", "black"))
    path = tmp_path_factory.mktemp("artefacts") / "textured_artefacts.svs"
    write_slide(path, slide, mpp=0.5, levels=(1, 4), tile_px=256, quality=85, objective_power=20)
    return path, slide


def test_pen_and_blur_on_a_generated_slide(artefact_slide, tmp_path):
    path, slide = artefact_slide
    store = _describe(path, tmp_path / "out")
    inked_excluded, clean_lost, n_inked, n_clean = _outcome(store, slide)
    assert n_inked >= 10 and inked_excluded >= 0.95
    assert clean_lost <= 0.02
    grid = TileGrid.from_dict(read_attrs(store)["tile_grid"])
    tissue = read_array(store, "tissue_fraction") >= 0.5
    # the regions' interiors: tiles at least 90% blurred (the benchmark also counts half-blurred ones)
    blurred = tissue & (slide.blur_fraction_at_tiles(grid) >= 0.9) & (slide.ink_fraction_at_tiles(grid) == 0)
    codes = read_array(store, "qc_code")
    assert blurred.sum() >= 3
    assert (codes[blurred] == QC_CODES["blur"]).mean() >= 0.9
    assert np.isnan(read_array(store, "descriptors")[codes == QC_CODES["blur"]]).all()
    assert read_attrs(store)["qc"] == qc_counts(codes, tissue)

    off = _describe(path, tmp_path / "off", qc=())
    assert not read_array(off, "qc_code").any()
    assert np.array_equal(read_array(off, "tissue_mask"), tissue)  # qc: [] describes every tissue tile


def test_debris_pixels_and_tiles():
    thumb = np.full((40, 40, 3), (200, 120, 180), np.uint8)
    thumb[:10, :10] = 20    # dirt
    thumb[30:, 30:] = 245   # a bubble the tissue mask closed over
    tissue_px = np.ones((40, 40), bool)
    flagged = debris_pixels(thumb, tissue_px)
    assert flagged[:10, :10].all() and flagged[30:, 30:].all() and flagged.sum() == 200
    grid = TileGrid(400, 400, 0.5, 0.5, 100, 100, 4, 4, 100.0, 100.0, 0, 1.0)  # tiles of 10x10 thumbnail px
    codes = thumbnail_qc(thumb, tissue_px, 10.0, grid, np.ones((4, 4), bool), config_from_dict({"qc": ["debris"]}).qc)
    expected = np.zeros((4, 4), np.uint8)
    expected[0, 0] = expected[3, 3] = QC_CODES["debris"]
    assert np.array_equal(codes, expected)


def test_registry_and_config():
    assert set(registry()) == set(DETECTOR_NAMES) == {"pen", "blur", "debris"}
    assert all(QC_CODES[name] == d.code for name, d in registry().items())
    assert config_from_dict({"qc": []}).qc.detectors == []
    assert config_from_dict({}).qc.detectors == ["pen", "blur", "debris"]
    with pytest.raises(ConfigError, match="qc"):
        config_from_dict({"qc": ["pen", "ink"]})
    on, off = config_from_dict({}), config_from_dict({"qc": []})
    assert on.stage_hash("describe") != off.stage_hash("describe")


def test_a_clean_slide_keeps_its_tissue(tmp_path):
    """No ink, no blur: QC leaves (almost) every tissue tile (the colour model covers every tissue colour mode)."""
    from sample_data.textured import TexturedTissue

    path = tmp_path / "clean.svs"
    write_slide(path, TexturedTissue(3000, 3000, seed=11, tissue_fraction=0.6), mpp=0.5, levels=(1, 4), tile_px=256,
                quality=85, objective_power=20)
    store = _describe(path, tmp_path / "out")
    tissue = read_array(store, "tissue_fraction") >= 0.5
    assert tissue.sum() >= 40
    assert (read_array(store, "qc_code")[tissue] != 0).mean() <= 0.02


def test_chi2_quantile_matches_scipy():
    """The pen model's closed-form chi-square quantiles (p = 3, no scipy.stats import) are scipy's."""
    from scipy.stats import chi2

    from pipeline.slides.qc.pen import chi2_quantile

    for q in (0.01, 0.5, 0.975, 0.999):
        assert chi2_quantile(q, 3) == pytest.approx(chi2.ppf(q, 3), rel=1e-12)
    assert chi2_quantile(0.5, 2) == pytest.approx(chi2.ppf(0.5, 2), rel=1e-12)


def test_robust_fit_ignores_a_minority_of_outliers():
    """Outliers under 1 - support (here 7% against 10%) do not move the fit (pen_pixels refits for more ink)."""
    from pipeline.slides.qc.pen import _squared_distance, robust_fit

    rng = np.random.default_rng(0)
    tissue = rng.multivariate_normal([0, 0, 0], np.diag([1.0, 4.0, 0.25]), size=4000)
    ink = rng.normal([6, -6, 3], 0.3, size=(300, 3))
    centre, precision = robust_fit(np.vstack([tissue, ink]), 0.9)
    assert np.allclose(centre, 0, atol=0.15)
    assert np.allclose(np.linalg.inv(precision), np.diag([1.0, 4.0, 0.25]), rtol=0.15, atol=0.05)
    assert (np.sqrt(_squared_distance(ink, centre, precision)) > 3.25).all()
    assert (np.sqrt(_squared_distance(tissue, centre, precision)) > 3.25).mean() < 0.02
