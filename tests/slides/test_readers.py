"""The direct TIFF tile reader returns exactly OpenSlide's pixels (real Aperio, boxes.tiff, synthetic odd sizes), and
describe gives the same descriptors with either reader."""

import json
import os
import shutil

import numpy as np
import pytest

from pipeline.core.config import PipelineConfig, TilingConfig
from pipeline.core.errors import DirectReadUnsupportedError, TileReadError
from pipeline.core.store import read_array, read_attrs
from pipeline.describe.runner import describe_slide
from pipeline.slides.open import read_slide_info
from pipeline.slides.reader_choice import choose_reader, open_reader
from pipeline.slides.readers import OpenSlideReader, TiffTileReader
from pipeline.slides.tiling import read_tile_row, tile_grid


@pytest.fixture(scope="session")
def synthetic_slides(tmp_path_factory) -> dict:
    """Odd sizes, so level edges cut native tiles: an Aperio-style slide whose level 1 has a fractional downsample
    (3001 / 750, 2003 / 500) and a generic pyramidal TIFF whose levels are exactly 2x and 4x (but not tile multiples)."""
    from sample_data.synthetic import SyntheticTissue, write_slide

    out = tmp_path_factory.mktemp("reader-slides")
    return {
        "odd_aperio": write_slide(out / "odd.svs", SyntheticTissue(3001, 2003, seed=3, tissue_fraction=0.6), mpp=0.25),
        "generic": write_slide(out / "generic.tif", SyntheticTissue(3000, 2004, seed=4, tissue_fraction=0.6),
                               mpp=0.25, levels=(1, 2, 4), style="generic"),
    }


def _slide(name, cmu_slide, fixtures_dir, synthetic_slides):
    if name == "cmu":
        return cmu_slide
    if name == "boxes":
        return fixtures_dir / "boxes.tiff"
    return synthetic_slides[name]


def _regions(level_w: int, level_h: int, ds: float, rng) -> list[tuple[int, int, int, int]]:
    """(x_l0, y_l0, w, h): corners, edges running off the level, fully outside, 1 px, random interior."""
    regions = [(0, 0, min(level_w, 300), min(level_h, 300)),
               (0, 0, level_w, level_h),
               (int((level_w - 37) * ds), int((level_h - 23) * ds), 90, 60),   # crosses the right and bottom edges
               (int(level_w * ds) + 50, 0, 20, 20),                            # entirely outside
               (int(level_w // 2 * ds), int(level_h // 2 * ds), 1, 1)]
    for _ in range(6):
        w, h = int(rng.integers(1, min(level_w, 400) + 1)), int(rng.integers(1, min(level_h, 400) + 1))
        regions.append((int(rng.integers(0, level_w) * ds), int(rng.integers(0, level_h) * ds), w, h))
    return regions


@pytest.mark.parametrize("name", ["cmu", "boxes", "odd_aperio", "generic"])
def test_direct_reader_returns_openslides_pixels(name, cmu_slide, fixtures_dir, synthetic_slides):
    path = _slide(name, cmu_slide, fixtures_dir, synthetic_slides)
    info = read_slide_info(path)
    rng = np.random.default_rng(7)
    with TiffTileReader(path, info.level_dimensions, info.level_downsamples) as direct, OpenSlideReader(path) as ref:
        for level, (w, h) in enumerate(info.level_dimensions):
            ds = info.level_downsamples[level]
            for region in _regions(w, h, ds, rng):
                np.testing.assert_array_equal(direct.read_region(level, *region), ref.read_region(level, *region),
                                              err_msg=f"{name} level {level} region {region}")
            # level-pixel positions as the tile grid asks for them
            for _ in range(4):
                x, y = int(rng.integers(-5, w)), int(rng.integers(-5, h))
                np.testing.assert_array_equal(direct.read_level(level, x, y, 70, 50), ref.read_level(level, x, y, 70, 50))
        # level 0 (and whole-number downsamples) are decoded natively, not handed to OpenSlide
        assert direct.tiles_decoded > 0
        whole = [lvl for lvl, ds in enumerate(info.level_downsamples) if float(ds).is_integer()]
        before = direct.delegated_regions
        for level in whole:
            direct.read_region(level, int(3 * info.level_downsamples[level]), 0, 64, 64)
        assert direct.delegated_regions == before


def test_each_native_tile_decoded_once_per_task(synthetic_slides):
    path = synthetic_slides["odd_aperio"]
    info = read_slide_info(path)
    width, height = info.level_dimensions[0]
    with TiffTileReader(path, info.level_dimensions, info.level_downsamples) as direct, OpenSlideReader(path) as ref:
        # strips of 100 rows: most native 256-px tile rows are cut by two or three strips
        strips = [direct.read_level(0, 0, y, width, min(100, height - y)) for y in range(0, height, 100)]
        native_tiles = -(-width // 256) * -(-height // 256)
        assert direct.tiles_decoded == native_tiles
        np.testing.assert_array_equal(np.concatenate(strips), ref.read_region(0, 0, 0, width, height))


def test_large_region_decoded_on_threads_equals_serial_and_decodes_each_tile_once(synthetic_slides, monkeypatch):
    """A region of many native tiles (a thumbnail's level) is decoded on two threads: the same pixels as one thread
    and as OpenSlide, each native tile decoded once, and a second read served from the cache."""
    from pipeline.slides import readers

    path = synthetic_slides["odd_aperio"]
    info = read_slide_info(path)
    width, height = info.level_dimensions[0]
    native_tiles = -(-width // 256) * -(-height // 256)
    assert native_tiles >= readers.THREADED_TILES
    from pipeline.core.threads import map_threads

    reads, pooled = {}, []

    def counting_map_threads(fn, items):
        pooled.append(len(items))
        return map_threads(fn, items)

    monkeypatch.setattr(readers, "map_threads", counting_map_threads)
    for threaded in (True, False):
        monkeypatch.setattr(readers, "THREADED_TILES", 32 if threaded else 10**9)
        with TiffTileReader(path, info.level_dimensions, info.level_downsamples, decode_threads=True) as direct:
            reads[threaded] = direct.read_region(0, 0, 0, width, height)
            assert direct.tiles_decoded == native_tiles
            np.testing.assert_array_equal(direct.read_region(0, 0, 0, width, 300), reads[threaded][:300])
            assert direct.tiles_decoded == native_tiles  # the top rows came from the cache
    assert pooled == [-(-height // 256)]  # one call, a row of tiles per item, only on the threaded read
    np.testing.assert_array_equal(reads[True], reads[False])
    with OpenSlideReader(path) as ref:
        np.testing.assert_array_equal(reads[True], ref.read_region(0, 0, 0, width, height))


def test_readers_of_one_file_share_its_parsed_pages(cmu_slide, synthetic_slides, tmp_path):
    """A process parses a file's TIFF pages once for all its readers (a slide is opened by its probe, its thumbnail
    and each block); a file written moments ago is parsed afresh each time, as other per-file checks are."""
    info = read_slide_info(cmu_slide)
    with TiffTileReader(cmu_slide, info.level_dimensions, info.level_downsamples) as first, \
            TiffTileReader(cmu_slide, info.level_dimensions, info.level_downsamples) as second:
        assert all(a is b for a, b in zip(first._levels, second._levels, strict=True))
        np.testing.assert_array_equal(first.read_region(0, 0, 0, 300, 200), second.read_region(0, 0, 0, 300, 200))
    fresh = shutil.copy(synthetic_slides["generic"], tmp_path / "fresh.tif")
    fresh_info = read_slide_info(fresh)
    with TiffTileReader(fresh, fresh_info.level_dimensions, fresh_info.level_downsamples) as first, \
            TiffTileReader(fresh, fresh_info.level_dimensions, fresh_info.level_downsamples) as second:
        assert first._levels[0] is not second._levels[0]


def test_the_completeness_check_and_the_readers_share_one_parse(synthetic_slides, tmp_path, monkeypatch):
    """Opening a slide (its completeness check) and reading it directly parse the TIFF once per process."""
    import tifffile

    from pipeline.slides import open as open_module
    from pipeline.slides import tiff_pages

    monkeypatch.setattr(open_module, "RECENT_S", 0.0)  # the copy was just written: remembered anyway
    monkeypatch.setattr(open_module, "_COMPLETE_TIFFS", {})
    monkeypatch.setattr(tiff_pages, "_PARSED", {})
    parses = []

    class CountingTiffFile(tifffile.TiffFile):
        def __init__(self, *args, **kwargs):
            parses.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tifffile, "TiffFile", CountingTiffFile)
    path = shutil.copy(synthetic_slides["generic"], tmp_path / "once.tif")
    info = read_slide_info(path)
    with TiffTileReader(path, info.level_dimensions, info.level_downsamples) as first, \
            TiffTileReader(path, info.level_dimensions, info.level_downsamples) as second:
        assert len(parses) == 1
        with OpenSlideReader(path) as ref:
            np.testing.assert_array_equal(first.read_region(0, 0, 0, 300, 200), ref.read_region(0, 0, 0, 300, 200))
        assert second._levels[0] is first._levels[0]


def _own_level_zero(reader: TiffTileReader):
    """The reader's level-0 page as its own writable copy (the parsed pages are shared by a process's readers)."""
    import dataclasses

    page = reader._levels[0]
    reader._levels = [dataclasses.replace(page, offsets=page.offsets.copy(), bytecounts=page.bytecounts.copy()),
                      *reader._levels[1:]]
    return reader._levels[0]


def test_missing_tile_is_background_and_damaged_tile_falls_back(synthetic_slides):
    path = synthetic_slides["generic"]
    info = read_slide_info(path)
    with OpenSlideReader(path) as ref:
        expected = ref.read_region(0, 200, 200, 400, 300)
    with TiffTileReader(path, info.level_dimensions, info.level_downsamples) as direct:
        assert not direct._levels[0].offsets.flags.writeable  # shared with the process's other readers
        _own_level_zero(direct).bytecounts[1] = 0  # native tile (0, 1) left out of the file: x 256-511, y 0-255
        region = direct.read_region(0, 200, 200, 400, 300)
        assert (region[:56, 56:312] == 255).all()
        np.testing.assert_array_equal(region[56:], expected[56:])
    for fallback in (False, True):
        with TiffTileReader(path, info.level_dimensions, info.level_downsamples, fallback=fallback) as direct:
            page = _own_level_zero(direct)
            page.offsets[1] = page.offsets[1] + 7  # tile 1 now starts mid-stream
            if not fallback:
                with pytest.raises(TileReadError, match="level 0"):
                    direct.read_region(0, 200, 200, 400, 300)
            else:
                np.testing.assert_array_equal(direct.read_region(0, 200, 200, 400, 300), expected)
                assert direct.fallback_regions == 1


def test_choose_reader(cmu_slide, fixtures_dir, synthetic_slides):
    auto = choose_reader(read_slide_info(cmu_slide), "auto", read_level=0)
    assert auto.kind == "tiff" and auto.fallback
    small = choose_reader(read_slide_info(fixtures_dir / "small.svs"), "auto")  # thumbnail page of the same size
    assert small.kind == "tiff"
    png = read_slide_info(fixtures_dir / "boxes.png")
    assert choose_reader(png, "auto").kind == "openslide" and "image fallback" in choose_reader(png, "auto").reason
    dicom = choose_reader(read_slide_info(fixtures_dir / "boxes_0.dcm"), "auto")  # tests/slides/test_dicom.py
    assert dicom.kind == "dicom" and "wsidicom" in dicom.reason
    with pytest.raises(DirectReadUnsupportedError) as err:
        choose_reader(png, "tiff")
    assert "boxes.png" in str(err.value) and "--reader" in str(err.value)
    odd = read_slide_info(synthetic_slides["odd_aperio"])
    fractional = choose_reader(odd, "auto", read_level=1)
    assert fractional.kind == "openslide" and "fractional" in fractional.reason
    assert choose_reader(odd, "auto", read_level=0).kind == "tiff"
    assert choose_reader(odd, "openslide").kind == "openslide"


def test_auto_probes_the_levels_the_slide_is_read_at(synthetic_slides, monkeypatch):
    """With the thumbnail's downsample, only the tile level and the thumbnail's level are compared with OpenSlide
    (each probe costs a tile decode in both readers); without it, every level."""
    from pipeline.slides import reader_choice

    monkeypatch.setattr(reader_choice, "_PROBED", {})  # no verdict remembered from earlier tests
    info = read_slide_info(synthetic_slides["generic"])
    assert info.level_count == 3
    probed: list[int] = []
    real = OpenSlideReader.read_region
    monkeypatch.setattr(OpenSlideReader, "read_region",
                        lambda self, level, *rest: probed.append(level) or real(self, level, *rest))
    assert choose_reader(info, "auto", read_level=0).kind == "tiff"
    assert probed == list(range(info.level_count))
    probed.clear()
    coarsest = info.level_downsamples[-1]
    assert choose_reader(info, "auto", read_level=0, thumbnail_downsample=coarsest * 1.5).kind == "tiff"
    assert probed == [0, info.level_count - 1]
    probed.clear()
    assert choose_reader(info, "auto", read_level=0, thumbnail_downsample=0.5).kind == "tiff"  # thumbnail at level 0
    assert probed == [0]


def test_slides_coded_alike_share_the_probes_verdict(synthetic_slides, cmu_slide, tmp_path, monkeypatch):
    """A slide whose probed tiles are coded like those of a slide probed in this process (stream prefix, tile headers,
    tile size, vendor) takes that verdict without opening OpenSlide; its reason says so, and its pixels are still
    OpenSlide's. A slide coded otherwise is probed."""
    from sample_data.synthetic import SyntheticTissue, write_slide

    from pipeline.slides import reader_choice

    monkeypatch.setattr(reader_choice, "_PROBED", {})
    probed: list[str] = []
    real = OpenSlideReader.read_region
    monkeypatch.setattr(OpenSlideReader, "read_region",
                        lambda self, *args: probed.append(self.path) or real(self, *args))
    first = read_slide_info(synthetic_slides["generic"])
    assert choose_reader(first, "auto", read_level=0, thumbnail_downsample=4.0).kind == "tiff"
    assert len(probed) == 2  # the tile level and the thumbnail's
    second_path = write_slide(tmp_path / "alike.tif", SyntheticTissue(3000, 2004, seed=11, tissue_fraction=0.6),
                              mpp=0.25, levels=(1, 2, 4), style="generic")
    second = read_slide_info(second_path)
    probed.clear()
    choice = choose_reader(second, "auto", read_level=0, thumbnail_downsample=4.0)
    assert choice.kind == "tiff" and probed == [] and choice.reason.endswith(reader_choice.REMEMBERED_NOTE)
    with open_reader(second_path, choice) as direct, OpenSlideReader(second_path) as reference:
        np.testing.assert_array_equal(direct.read_region(0, 1024, 768, 300, 200),
                                      reference.read_region(0, 1024, 768, 300, 200))
    other = read_slide_info(cmu_slide)  # a scanner's JPEG tables and frame headers
    probed.clear()
    assert choose_reader(other, "auto", read_level=0, thumbnail_downsample=4.0).kind == "tiff" and probed
    assert len(reader_choice._PROBED) == 2


def test_readers_of_one_file_share_the_simplejpeg_check(synthetic_slides, monkeypatch):
    """The first reader of a file checks simplejpeg against tifffile on a level's first tile; later readers of the
    unchanged file in this process reuse the verdict and give the same pixels."""
    import pipeline.slides.open as open_module

    monkeypatch.setattr(open_module, "RECENT_S", 0.0)  # the test slide was just written: share its verdicts anyway
    path = synthetic_slides["generic"]
    info = read_slide_info(path)
    with TiffTileReader(path, info.level_dimensions, info.level_downsamples) as first:
        pixels = first.read_region(0, 0, 0, 300, 200)
        verdict = first._levels[0].fast_jpeg
    assert verdict is not None
    with TiffTileReader(path, info.level_dimensions, info.level_downsamples) as second:
        assert second._levels[0].fast_jpeg == verdict  # known before its first tile
        np.testing.assert_array_equal(second.read_region(0, 0, 0, 300, 200), pixels)
    with OpenSlideReader(path) as reference:
        np.testing.assert_array_equal(reference.read_region(0, 0, 0, 300, 200), pixels)


def test_slides_of_one_encoding_share_the_simplejpeg_check(synthetic_slides, cmu_slide, tmp_path, monkeypatch):
    """A second slide whose tiles have the same encoding (stream prefix and tile headers) as a checked one decodes its
    first tile with simplejpeg at once: tifffile's decode, the check's other half, is not run again; the pixels are
    still OpenSlide's. A slide of another encoding is checked on its own."""
    from sample_data.synthetic import SyntheticTissue, write_slide

    from pipeline.slides import readers, tiff_pages

    monkeypatch.setattr(readers, "_FAST_JPEG_BY_ENCODING", {})
    monkeypatch.setattr(tiff_pages, "_PARSED", {})  # fresh pages: no level verdict from earlier tests
    first_path = synthetic_slides["generic"]
    second_path = write_slide(tmp_path / "same-encoding.tif", SyntheticTissue(3000, 2004, seed=9, tissue_fraction=0.6),
                              mpp=0.25, levels=(1, 2, 4), style="generic")
    info = read_slide_info(first_path)
    with TiffTileReader(first_path, info.level_dimensions, info.level_downsamples) as first:
        first.read_region(0, 0, 0, 300, 200)
        assert first._levels[0].fast_jpeg is True
    assert len(readers._FAST_JPEG_BY_ENCODING) == 1
    info = read_slide_info(second_path)
    with TiffTileReader(second_path, info.level_dimensions, info.level_downsamples) as second, \
            OpenSlideReader(second_path) as reference:
        level = second._levels[0]
        assert level.fast_jpeg is None  # its own page, not checked yet

        def no_tifffile_decode(*args, **kwargs):
            raise AssertionError("the verdict of this encoding is known: tifffile should not decode")

        monkeypatch.setattr(level, "decode", no_tifffile_decode)
        np.testing.assert_array_equal(second.read_region(0, 0, 0, 300, 200), reference.read_region(0, 0, 0, 300, 200))
        assert level.fast_jpeg is True
    odd = read_slide_info(synthetic_slides["odd_aperio"])  # written by the same encoder: no check of its own
    with TiffTileReader(odd.path, odd.level_dimensions, odd.level_downsamples) as same:
        same.read_region(0, 0, 0, 300, 200)
    assert len(readers._FAST_JPEG_BY_ENCODING) == 1
    real = read_slide_info(cmu_slide)  # a scanner's Aperio SVS: shared JPEG tables, its own frame headers
    with TiffTileReader(real.path, real.level_dimensions, real.level_downsamples) as other:
        other.read_region(0, 0, 0, 300, 200)
        assert other._levels[0].fast_jpeg is True
    assert len(readers._FAST_JPEG_BY_ENCODING) == 2


def test_jpeg_headers_end_at_the_scan_header(synthetic_slides):
    from pipeline.slides import jpeg

    info = read_slide_info(synthetic_slides["generic"])
    with TiffTileReader(info.path, info.level_dimensions, info.level_downsamples) as reader:
        lp = reader._levels[0]
        tile = os.pread(reader._fd, int(lp.bytecounts[0]), int(lp.offsets[0]))
    head = jpeg.headers(tile)
    assert head is not None and head.startswith(jpeg.SOI) and b"\xff\xc0" in head and b"\xff\xda" in head
    assert len(head) < len(tile) and tile.startswith(head)
    assert jpeg.headers(b"not a jpeg") is None and jpeg.headers(tile[:len(head) - 1]) is None


def test_forced_direct_reader_at_fractional_level_still_matches(synthetic_slides):
    """Level 1 of the odd slide is 4.0037x: rows at sub-pixel positions come from OpenSlide, so tiles stay equal."""
    path = synthetic_slides["odd_aperio"]
    info = read_slide_info(path)
    grid = tile_grid(info, TilingConfig(mpp=1.3, tile_px=64))
    assert grid.read_level == 1 and not float(grid.read_downsample).is_integer()
    cols = np.arange(grid.cols)
    with open_reader(path, choose_reader(info, "tiff")) as direct, OpenSlideReader(path) as ref:
        for row in (0, 3, grid.rows - 1):
            np.testing.assert_array_equal(read_tile_row(direct, grid, row, cols), read_tile_row(ref, grid, row, cols))
        assert direct.delegated_regions >= 2  # rows 3 and the last start at fractional level positions


@pytest.mark.parametrize("name,mpp,tile_px,read_level", [
    ("cmu", 1.0, 128, 0),          # real Aperio JPEG (YCbCr 4:2:0, JPEG tables), 240-px native tiles, 0.499 µm/px
    ("odd_aperio", 0.5, 256, 0),   # tiles cross the right/bottom edge tiles of a 3001 x 2003 slide
    ("generic", 1.3, 64, 2),       # level 2 at exactly 4x, 750 x 501 px
])
def test_describe_same_descriptors_with_both_readers(name, mpp, tile_px, read_level, cmu_slide, fixtures_dir,
                                                     synthetic_slides, tmp_path):
    path = _slide(name, cmu_slide, fixtures_dir, synthetic_slides)
    results = {}
    for kind in ("openslide", "tiff"):
        config = PipelineConfig().with_overrides(reader__kind=kind, tiling__mpp=mpp, tiling__tile_px=tile_px,
                                                 tissue__fraction_min=0.2)
        store = describe_slide(path, tmp_path / kind, config)
        attrs = read_attrs(store)
        assert attrs["reader"] == kind and attrs["tile_grid"]["read_level"] == read_level
        record = json.loads((tmp_path / kind / "manifest.json").read_text())["slides"][store.stem]
        assert record["reader"] == kind and record["reader_fallback_regions"] == 0
        results[kind] = (read_array(store, "descriptors"), read_array(store, "tissue_mask"))
    (d_os, m_os), (d_tiff, m_tiff) = results["openslide"], results["tiff"]
    np.testing.assert_array_equal(m_os, m_tiff)
    assert np.isfinite(d_os[..., 0]).sum() >= 10
    np.testing.assert_allclose(d_tiff, d_os, rtol=1e-6, atol=1e-6, equal_nan=True)


class _Assembling(TiffTileReader):
    """The direct reader without the shrink-while-decoding path: the strip is assembled, then shrunk."""

    def shrink_for(self, level, factor):
        return 1


@pytest.mark.parametrize("name", ["odd_aperio", "generic"])
@pytest.mark.parametrize("mpp,tile_px", [(0.5, 64), (1.0, 50), (0.5, 100)])
def test_tiles_shrunk_while_decoding_equal_the_assembled_strips(name, mpp, tile_px, synthetic_slides):
    """Every tile of the grid (edges that cut native tiles included) is the same whichever way it is shrunk."""
    path = synthetic_slides[name]
    info = read_slide_info(path)
    grid = tile_grid(info, TilingConfig(mpp=mpp, tile_px=tile_px))
    args = (info.level_dimensions, info.level_downsamples)
    with TiffTileReader(path, *args) as direct, _Assembling(path, *args) as assembled:
        factor = grid.tile_l0_px / grid.read_downsample / grid.tile_px
        assert direct.shrink_for(grid.read_level, factor) == round(factor)  # 2 or 4: the path is taken
        assert direct.shrink_for(grid.read_level, 3.0) == 1  # 3 does not divide the 256-px native tiles
        for row in range(grid.rows):
            cols = np.arange(grid.cols)
            np.testing.assert_array_equal(read_tile_row(direct, grid, row, cols), read_tile_row(assembled, grid, row, cols),
                                          err_msg=f"{name} row {row}")


def test_shrunk_read_of_a_missing_or_damaged_tile(synthetic_slides):
    path = synthetic_slides["generic"]
    info = read_slide_info(path)
    args = (info.level_dimensions, info.level_downsamples)
    with OpenSlideReader(path) as ref:
        expected = ref.read_level_shrunk(0, 100, 100, 200, 150, 2)  # reduce_box of OpenSlide's pixels
    with TiffTileReader(path, *args) as direct:
        _own_level_zero(direct).bytecounts[1] = 0  # native tile (0, 1) left out: white
        region = direct.read_level_shrunk(0, 100, 100, 200, 150, 2)
        assert (region[:28, 28:156] == 255).all()
        np.testing.assert_array_equal(region[28:], expected[28:])
    for fallback in (False, True):
        with TiffTileReader(path, *args, fallback=fallback) as direct:
            page = _own_level_zero(direct)
            page.offsets[1] = page.offsets[1] + 7  # tile 1 now starts mid-stream
            if not fallback:
                with pytest.raises(TileReadError, match="level 0"):
                    direct.read_level_shrunk(0, 100, 100, 200, 150, 2)
            else:
                np.testing.assert_array_equal(direct.read_level_shrunk(0, 100, 100, 200, 150, 2), expected)
                assert direct.fallback_regions == 1


def test_a_process_keeps_the_pages_of_its_recent_files_only(synthetic_slides, tmp_path, monkeypatch):
    """Parsed pages are kept for ``PAGES_REMEMBERED`` files at most (a large slide's tile offsets take megabytes):
    past that the memory starts again, and a file still in it is served without parsing."""
    from pipeline.slides import open as open_module
    from pipeline.slides import tiff_pages

    monkeypatch.setattr(open_module, "RECENT_S", 0.0)  # fresh copies: remembered anyway
    monkeypatch.setattr(tiff_pages, "_PARSED", {})
    monkeypatch.setattr(tiff_pages, "PAGES_REMEMBERED", 3)
    info = read_slide_info(synthetic_slides["generic"])
    copies = [shutil.copy(synthetic_slides["generic"], tmp_path / f"copy-{i}.tif") for i in range(4)]
    pages = []
    for path in copies:
        with TiffTileReader(path, info.level_dimensions, info.level_downsamples) as reader:
            pages.append(reader._levels)
        assert len(tiff_pages._PARSED) <= 3
    assert len(tiff_pages._PARSED) == 1  # the fourth file found the memory full and started it again
    with TiffTileReader(copies[-1], info.level_dimensions, info.level_downsamples) as reader:
        assert all(page is kept for page, kept in zip(reader._levels, pages[-1], strict=True))
