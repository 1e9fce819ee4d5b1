"""DICOM WSI through wsidicom: OpenSlide's fixture series read with OpenSlide's pixels, the real Aperio slide
converted to a DICOM series OpenSlide cannot open (RLE, with wsidicomizer) read back and described with exactly the
SVS's pixels and descriptors, folders of instances as one slide, and series no reader opens explained."""

import json
import shutil

import numpy as np
import pytest

from pipeline.core.config import PipelineConfig
from pipeline.core.errors import CorruptSlideError, DirectReadUnsupportedError, UnsupportedFormatError
from pipeline.core.store import read_array, read_attrs
from pipeline.describe.runner import describe_slide
from pipeline.slides.dicom import DicomReader, is_dicom, series_files
from pipeline.slides.open import find_slides, read_slide_info, slide_fingerprint
from pipeline.slides.reader_choice import choose_reader, open_reader
from pipeline.slides.readers import OpenSlideReader


@pytest.fixture()
def boxes_series(fixtures_dir, tmp_path):
    """OpenSlide's two-instance DICOM fixture (JPEG level + uncompressed thumbnail) in a folder of its own."""
    folder = tmp_path / "boxes"
    folder.mkdir()
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        shutil.copy(fixtures_dir / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def cmu_rle_series(cmu_slide, tmp_path_factory):
    """The real Aperio slide as a DICOM series with RLE frames (lossless; a transfer syntax OpenSlide lacks)."""
    pytest.importorskip("wsidicomizer", reason="wsidicomizer is a dev dependency")
    from wsidicom.codec.settings import Channels, RleSettings
    from wsidicomizer import WsiDicomizer
    from wsidicomizer.wsidicomizer import SourceIdentifier

    folder = tmp_path_factory.mktemp("dicom") / "cmu-1-small-region"
    folder.mkdir()
    WsiDicomizer.convert(cmu_slide, folder, include_label=False, include_overview=False, include_thumbnail=False,
                         encoding=RleSettings(channels=Channels.RGB), tile_size=256, workers=1,
                         preferred_source=SourceIdentifier.TIFFSLIDE)  # opentile would need a system libturbojpeg
    return folder


def test_fixture_series_reads_openslides_pixels(boxes_series):
    for path in (boxes_series, boxes_series / "boxes_0.dcm"):  # the folder, or one of its instances
        info = read_slide_info(path)
        assert (info.backend, info.vendor, info.level_dimensions) == ("openslide", "dicom", ((16, 16),))
        assert info.mpp == pytest.approx(0.499)
        choice = choose_reader(info, "auto", read_level=0)
        assert choice.kind == "dicom" and "identical to OpenSlide" in choice.reason
        with open_reader(path, choice) as dicom, OpenSlideReader(boxes_series / "boxes_0.dcm") as reference:
            assert isinstance(dicom, DicomReader)
            for region in [(0, 0, 0, 16, 16), (0, -3, 5, 10, 20), (0, 10, 12, 9, 9), (0, 40, 0, 4, 4)]:
                np.testing.assert_array_equal(dicom.read_region(*region), reference.read_region(*region))
    assert read_slide_info(boxes_series).slide_id == "boxes"
    assert choose_reader(read_slide_info(boxes_series), "openslide").kind == "openslide"
    with pytest.raises(DirectReadUnsupportedError):
        choose_reader(read_slide_info(boxes_series), "tiff")


def test_series_openslide_cannot_open_reads_the_svs_pixels(cmu_rle_series, cmu_slide):
    info = read_slide_info(cmu_rle_series)
    assert (info.backend, info.vendor) == ("dicom", "dicom")
    reference = read_slide_info(cmu_slide)
    assert info.level_dimensions == reference.level_dimensions and info.mpp == pytest.approx(reference.mpp)
    choice = choose_reader(info, "auto", read_level=0)
    assert choice.kind == "dicom" and "OpenSlide cannot open" in choice.reason
    width, height = info.level_dimensions[0]
    with open_reader(cmu_rle_series, choice) as dicom, OpenSlideReader(cmu_slide) as svs:
        np.testing.assert_array_equal(dicom.read_region(0, 0, 0, width, height), svs.read_region(0, 0, 0, width, height))
        for region in [(0, width - 100, height - 50, 300, 200), (0, -20, -20, 64, 64)]:  # off the edges: white
            np.testing.assert_array_equal(dicom.read_region(*region), svs.read_region(*region))


def test_described_dicom_series_equals_the_svs(cmu_rle_series, cmu_slide, tmp_path):
    config = PipelineConfig().with_overrides(tiling__mpp=1.0, tiling__tile_px=128, tissue__fraction_min=0.2,
                                             reader__kind="openslide")
    svs_store = describe_slide(cmu_slide, tmp_path / "svs", config)
    dicom_store = describe_slide(cmu_rle_series, tmp_path / "dicom", config.with_overrides(reader__kind="auto"))
    assert dicom_store.stem == "cmu-1-small-region"  # named after the folder of instances
    assert read_attrs(dicom_store)["reader"] == "dicom"
    record = json.loads((tmp_path / "dicom" / "manifest.json").read_text())["slides"]["cmu-1-small-region"]
    assert record["status"] == "done" and record["reader"] == "dicom"
    for name in ("tissue_mask", "descriptors"):
        np.testing.assert_array_equal(read_array(dicom_store, name), read_array(svs_store, name))
    assert np.isfinite(read_array(dicom_store, "descriptors")[..., 0]).sum() >= 10


def test_folders_of_instances_are_one_slide(boxes_series, tmp_path):
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    shutil.copytree(boxes_series, cohort / "case-7")
    (cohort / "notes").mkdir()  # a folder without instances is not a slide
    slides, ignored = find_slides([cohort])
    assert slides == [cohort / "case-7"] and ignored == []
    assert find_slides([boxes_series])[0] == [boxes_series]  # the series folder given itself
    assert is_dicom(boxes_series) and is_dicom(boxes_series / "boxes_1.dcm") and not is_dicom(cohort / "notes")
    assert series_files(boxes_series / "boxes_1.dcm") == sorted(boxes_series.glob("*.dcm"))
    before = slide_fingerprint(boxes_series)
    (boxes_series / "boxes_1.dcm").write_bytes((boxes_series / "boxes_1.dcm").read_bytes() + b"\0")
    assert slide_fingerprint(boxes_series) != before  # any instance changing makes the slide stale


def test_series_no_reader_opens_is_explained(boxes_series, fixtures_dir, tmp_path):
    import pydicom

    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        ds = pydicom.dcmread(boxes_series / name)
        del ds.ImageType
        ds.save_as(boxes_series / name)
    with pytest.raises(UnsupportedFormatError) as err:
        read_slide_info(boxes_series)
    message = str(err.value)
    assert "boxes_0.dcm lacks ImageType (0008,0008)" in message and "Couldn't get image flavor" in message
    assert "wsidicom" in message and "Fix:" in message
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "scan.dcm").write_bytes((fixtures_dir / "boxes_0.dcm").read_bytes()[:3000])
    with pytest.raises(CorruptSlideError, match="damaged DICOM"):
        read_slide_info(cut)
