"""Tests for sample_data.synthetic: procedural H&E-like slides written as pyramidal tiled JPEG TIFFs."""

from __future__ import annotations

import csv
import os
import pickle

import numpy as np
import pytest

openslide = pytest.importorskip("openslide")

from sample_data.synthetic import (  # noqa: E402
    BACKGROUND_RGB,
    SyntheticTissue,
    cohort_plan,
    make_cohort,
    slide_levels,
    slide_spec,
    write_flat_image,
    write_slide,
)

W, H = 1024, 768


@pytest.fixture(scope="module")
def lesion_tissue() -> SyntheticTissue:
    return SyntheticTissue(W, H, seed=11, lesion=True)


@pytest.fixture(scope="module")
def pyramid_tissue() -> SyntheticTissue:
    # big enough for a 16x level of >= 1 tile; not a multiple of the tile size (edge tiles)
    return SyntheticTissue(4200, 4100, seed=5, lesion=True)


@pytest.fixture(scope="module")
def aperio_slide(tmp_path_factory, pyramid_tissue):
    path = tmp_path_factory.mktemp("aperio") / "s.svs"
    return write_slide(path, pyramid_tissue, mpp=0.25, style="aperio", objective_power=40)


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _read_rgb(slide, loc, level, size) -> np.ndarray:
    return np.asarray(slide.read_region(loc, level, size).convert("RGB"))


# ----------------------------------------------------------------------------------------------- OpenSlide


def test_aperio_slide_opens_with_levels_and_mpp(aperio_slide, pyramid_tissue):
    with openslide.OpenSlide(str(aperio_slide)) as s:
        assert s.properties["openslide.vendor"] == "aperio"
        assert s.dimensions == (4200, 4100)
        assert s.level_count == 3
        assert s.level_dimensions == ((4200, 4100), (1050, 1025), (262, 256))
        np.testing.assert_allclose(s.level_downsamples, (1, 4, 16), rtol=0.01)
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        assert float(s.properties["openslide.mpp-y"]) == pytest.approx(0.25)
        assert float(s.properties["openslide.objective-power"]) == 40
    assert slide_levels(4200, 4100) == [(1.0, 4200, 4100), (4.0, 1050, 1025), (16.0, 262, 256)]


def test_generic_tiff_gets_mpp_from_resolution_tags(tmp_path):
    t = SyntheticTissue(W, H, seed=2)
    path = write_slide(tmp_path / "g.tif", t, mpp=0.5, style="generic")
    with openslide.OpenSlide(str(path)) as s:
        assert s.properties["openslide.vendor"] == "generic-tiff"
        assert s.dimensions == (W, H)
        # 16x level (64x48) is smaller than one tile and is skipped; the 4x level (256x192) is kept
        assert s.level_dimensions == ((W, H), (256, 192))
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5, rel=1e-4)
        assert float(s.properties["openslide.mpp-y"]) == pytest.approx(0.5, rel=1e-4)


@pytest.mark.parametrize("style", ["aperio", "generic"])
def test_no_mpp_anywhere(tmp_path, style):
    t = SyntheticTissue(W, H, seed=3)
    path = write_slide(tmp_path / f"n_{style}.svs", t, mpp=None, style=style)
    with openslide.OpenSlide(str(path)) as s:
        assert s.properties["openslide.vendor"] == ("aperio" if style == "aperio" else "generic-tiff")
        assert "openslide.mpp-x" not in s.properties
        assert "openslide.mpp-y" not in s.properties
        assert s.dimensions == (W, H)


def test_read_region_matches_render(aperio_slide, pyramid_tissue):
    with openslide.OpenSlide(str(aperio_slide)) as s:
        # level 0, a region crossing tile borders, inside tissue and across the lesion
        bx, by, bw, bh = pyramid_tissue.lesion_box_l0
        x, y = bx + bw // 2 - 150, by + bh // 2 - 100
        got = _read_rgb(s, (x, y), 0, (300, 200))
        ref = pyramid_tissue.render(x, y, 300, 200)
        assert _mad(got, ref) < 6
        assert ref.std() > 10  # real content, not a flat colour
        # the bottom-right edge tiles
        got = _read_rgb(s, (4200 - 120, 4100 - 90), 0, (120, 90))
        assert _mad(got, pyramid_tissue.render(4200 - 120, 4100 - 90, 120, 90)) < 6
        # level 1 (4x): location is given in level-0 coordinates
        got = _read_rgb(s, (1600, 1200), 1, (300, 200))
        assert _mad(got, pyramid_tissue.render(400, 300, 300, 200, downsample=4)) < 8
        # a wrong region is clearly different (the comparison has teeth)
        assert _mad(got, pyramid_tissue.render(0, 0, 300, 200, downsample=4)) > 10


# ----------------------------------------------------------------------------------------------- rendering


def test_render_shape_dtype_and_determinism(lesion_tissue):
    a = lesion_tissue.render(100, 50, 333, 222)
    assert a.shape == (222, 333, 3) and a.dtype == np.uint8
    again = SyntheticTissue(W, H, seed=11, lesion=True).render(100, 50, 333, 222)
    assert np.array_equal(a, again)
    other_seed = SyntheticTissue(W, H, seed=12, lesion=True).render(100, 50, 333, 222)
    assert not np.array_equal(a, other_seed)


@pytest.mark.parametrize("ds", [1, 4, 16, 2.5])
def test_render_split_consistency(lesion_tissue, ds):
    x0, y0, w, h = (37, 21, 700, 500) if ds == 1 else (5, 3, 240, 180)
    whole = lesion_tissue.render(x0, y0, w, h, downsample=ds)
    sx, sy = w // 3 + 1, h // 2 + 3
    left = lesion_tissue.render(x0, y0, sx, h, downsample=ds)
    right = lesion_tissue.render(x0 + sx, y0, w - sx, h, downsample=ds)
    assert np.array_equal(whole, np.concatenate([left, right], axis=1))
    top = lesion_tissue.render(x0, y0, w, sy, downsample=ds)
    bottom = lesion_tissue.render(x0, y0 + sy, w, h - sy, downsample=ds)
    assert np.array_equal(whole, np.concatenate([top, bottom], axis=0))


def test_downsample_4_is_box_filtered_level0(lesion_tissue):
    lo = lesion_tissue.render(40, 30, 100, 80, downsample=4).astype(np.int32)
    hi = lesion_tissue.render(160, 120, 400, 320).astype(np.int32)
    box = (hi.reshape(80, 4, 100, 4, 3).sum(axis=(1, 3)) + 8) // 16
    assert np.array_equal(lo, box)


def test_pickle_roundtrip(lesion_tissue):
    t2 = pickle.loads(pickle.dumps(lesion_tissue))
    assert t2 == lesion_tissue
    assert np.array_equal(t2.render(0, 0, 64, 64), lesion_tissue.render(0, 0, 64, 64))


def test_ground_truth_matches_pixels(lesion_tissue):
    img = lesion_tissue.render(0, 0, W, H).astype(np.float64)
    yy, xx = np.mgrid[0:H, 0:W] + 0.5
    tissue = lesion_tissue.tissue_at(xx, yy)
    lesion = lesion_tissue.lesion_at(xx, yy)
    assert 0.35 < tissue.mean() < 0.65  # tissue_fraction=0.5
    assert not lesion[~tissue].any()
    frac = lesion.sum() / tissue.sum()
    assert 0.07 < frac < 0.25
    # glass is near-white, tissue is not
    bg = np.asarray(BACKGROUND_RGB, float)
    glass_dev = np.abs(img[~tissue] - bg).sum(axis=1)
    assert np.median(glass_dev) < 6
    assert np.median(np.abs(img[tissue] - bg).sum(axis=1)) > 60
    # lesion_box_l0 bounds the lesion mask tightly
    x, y, w, h = lesion_tissue.lesion_box_l0
    ys, xs = np.nonzero(lesion)
    assert x <= xs.min() and y <= ys.min() and xs.max() < x + w and ys.max() < y + h
    assert (xs.max() - xs.min() + 1) >= w - 4 and (ys.max() - ys.min() + 1) >= h - 4


def test_lesion_is_darker_and_more_purple(lesion_tissue):
    img = lesion_tissue.render(0, 0, W, H).astype(np.float64)
    yy, xx = np.mgrid[0:H, 0:W] + 0.5
    tissue = lesion_tissue.tissue_at(xx, yy)
    lesion = lesion_tissue.lesion_at(xx, yy)
    les = img[lesion].mean(axis=0)
    stroma = img[tissue & ~lesion].mean(axis=0)
    assert les.mean() < stroma.mean() - 25  # darker
    # purple/blue: blue dominates red in the lesion, red dominates blue in pink stroma
    assert les[2] - les[0] > 15
    assert stroma[0] - stroma[2] > 5
    # higher nuclear density: many more very dark pixels
    dark = img.sum(axis=2) < 330
    assert dark[lesion].mean() > 3 * dark[tissue & ~lesion].mean()


def test_class0_has_no_lesion_but_same_kind_of_tissue():
    t0 = SyntheticTissue(W, H, seed=11, lesion=False)
    t1 = SyntheticTissue(W, H, seed=11, lesion=True)
    assert t0.lesion_box_l0 is None
    assert not t0.lesion_at(np.arange(W) + 0.5, np.full(W, H / 2)).any()
    yy, xx = np.mgrid[0:H, 0:W] + 0.5
    assert np.array_equal(t0.tissue_at(xx, yy), t1.tissue_at(xx, yy))  # class 1 = class 0 + lesion
    a, b = t0.render(0, 0, W, H), t1.render(0, 0, W, H)
    outside = ~t1.lesion_at(xx, yy)
    # identical away from the lesion (its soft edge may reach a few px beyond the mask)
    from scipy import ndimage

    far = ~ndimage.binary_dilation(~outside, iterations=8)
    assert np.array_equal(a[far], b[far])
    assert not np.array_equal(a, b)


def test_blank_slide_is_near_white(tmp_path):
    t = SyntheticTissue(W, H, seed=4, tissue_fraction=0.0)
    img = t.render(0, 0, W, H).astype(np.float64)
    assert np.abs(img.reshape(-1, 3).mean(axis=0) - BACKGROUND_RGB).max() < 1.0
    assert img.min() >= 225
    assert 0.5 < img.std() < 5  # slight glass noise, not flat
    assert not t.tissue_at(np.array([W / 2]), np.array([H / 2])).any()
    assert t.lesion_box_l0 is None
    path = write_slide(tmp_path / "blank.svs", t)
    with openslide.OpenSlide(str(path)) as s:
        got = _read_rgb(s, (0, 0), 0, (W, H)).astype(np.float64)
    assert got.min() >= 220 and np.abs(got.mean(axis=(0, 1)) - BACKGROUND_RGB).max() < 2


@pytest.mark.parametrize("fmt", ["png", "jpeg", "tiff"])
def test_write_flat_image(tmp_path, fmt):
    from PIL import Image

    t = SyntheticTissue(300, 200, seed=1, lesion=True)
    path = write_flat_image(tmp_path / f"flat.{fmt}", t, fmt=fmt)
    with Image.open(path) as im:
        assert im.size == (300, 200)
        arr = np.asarray(im.convert("RGB"))
    ref = t.render(0, 0, 300, 200)
    if fmt == "jpeg":
        assert _mad(arr, ref) < 6
    else:
        assert np.array_equal(arr, ref)
    assert not list(tmp_path.glob("*.partial"))


def test_write_is_atomic_on_failure(tmp_path, monkeypatch):
    import sample_data.synthetic as syn

    t = SyntheticTissue(600, 600, seed=1)

    def boom(*a, **k):
        raise RuntimeError("render failed")

    monkeypatch.setattr(syn.SyntheticTissue, "render", boom)
    with pytest.raises(RuntimeError):
        write_slide(tmp_path / "x.svs", t)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------- cohort


def test_make_cohort_labels_and_rerun(tmp_path):
    out = make_cohort(tmp_path / "cohort", n_per_class=2, width_px=768, height_px=640, mpp=0.5, seed=3)
    slides = sorted(out.glob("*.svs"))
    assert len(slides) == 4
    with open(out / "labels.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["slide_id", "label"]
    labels = {sid: int(lab) for sid, lab in rows[1:]}
    assert sorted(labels) == [p.stem for p in slides]
    assert sorted(labels.values()) == [0, 0, 1, 1]
    tissues = {}
    for p in slides:
        with openslide.OpenSlide(str(p)) as s:
            assert s.properties["openslide.vendor"] == "aperio"
            assert s.dimensions == (768, 640)
            assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
            img = _read_rgb(s, (0, 0), 0, (768, 640))
        tissues[p.stem] = img
    # class-1 slides have far more purple 16x16 blocks (lesion) than class-0 slides (pink stroma + nuclei)
    def purple_fraction(v: np.ndarray) -> float:
        b = v.astype(np.float64).reshape(40, 16, 48, 16, 3).mean(axis=(1, 3))
        return float((b[..., 2] - b[..., 0] > 25).mean())

    purple = {k: purple_fraction(v) for k, v in tissues.items()}
    assert min(purple[k] for k, lab in labels.items() if lab == 1) > 0.02
    assert max(purple[k] for k, lab in labels.items() if lab == 0) < 0.012
    # slides differ from each other (seeded shapes)
    imgs = list(tissues.values())
    assert not np.array_equal(imgs[0], imgs[1])

    mtimes = {p: os.stat(p).st_mtime_ns for p in slides}
    labels_mtime = os.stat(out / "labels.csv").st_mtime_ns
    make_cohort(tmp_path / "cohort", n_per_class=2, width_px=768, height_px=640, mpp=0.5, seed=3)
    assert {p: os.stat(p).st_mtime_ns for p in slides} == mtimes
    assert os.stat(out / "labels.csv").st_mtime_ns == labels_mtime
    # a different size rewrites the slides
    make_cohort(tmp_path / "cohort", n_per_class=2, width_px=640, height_px=640, mpp=0.5, seed=3)
    with openslide.OpenSlide(str(slides[0])) as s:
        assert s.dimensions == (640, 640)


def test_make_cohort_rewrites_slides_whose_plan_changed(tmp_path):
    """Slide i of a 2-per-class cohort and of a 3-per-class cohort can differ (the label shuffle depends on the
    cohort size): growing the cohort must rewrite those, keep the rest, and leave every file matching labels.csv."""
    kw = {"width_px": 320, "height_px": 256, "seed": 0}
    small = {sid: tissue for sid, _, tissue in cohort_plan(n_per_class=2, **kw)}
    large = {sid: tissue for sid, _, tissue in cohort_plan(n_per_class=3, **kw)}
    changed = {sid for sid in small if small[sid].lesion != large[sid].lesion}
    assert changed and changed != set(small)  # this seed exercises both cases
    out = make_cohort(tmp_path / "cohort", n_per_class=2, mpp=0.5, **kw)
    mtimes = {sid: os.stat(out / f"{sid}.svs").st_mtime_ns for sid in small}
    make_cohort(out, n_per_class=3, mpp=0.5, **kw)
    for sid in small:
        rewritten = os.stat(out / f"{sid}.svs").st_mtime_ns != mtimes[sid]
        assert rewritten == (sid in changed), sid
    with open(out / "labels.csv", newline="") as f:
        labels = {row["slide_id"]: int(row["label"]) for row in csv.DictReader(f)}
    for sid, tissue in large.items():
        with openslide.OpenSlide(str(out / f"{sid}.svs")) as s:
            assert s.properties["aperio.Spec"] == slide_spec(tissue, 0.5, (1, 4, 16), 256, 85)
        assert labels[sid] == int(tissue.lesion)
