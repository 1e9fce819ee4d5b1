"""JPEG tiles decoded at 1/2 in the DCT domain, against the area average of the full decode, on the real Aperio slide
(RGB JPEG, 240-px tiles) and a generated one (YCbCr 4:2:0, 256-px tiles): how far the pixels and the descriptors
move, and that describe records which decode path ran."""

import numpy as np
import pytest

from pipeline.core.config import DescriptorConfig, PipelineConfig, TilingConfig
from pipeline.core.store import read_array, read_attrs
from pipeline.describe.descriptors import compute_descriptors
from pipeline.describe.runner import describe_slide
from pipeline.slides import jpeg
from pipeline.slides.open import read_slide_info
from pipeline.slides.reader_choice import choose_reader, open_reader
from pipeline.slides.tiling import read_tile_row, tile_grid
from tests.conftest import write_test_slide

# The stain descriptors built on log-transformed (optical density) channels, which the few near-black pixels a scaled
# IDCT rings to dominate: on the real slide they move by 0.3-3 across-tile SDs (a one-pixel shift of the grid moves
# them 0.01-0.03). The stated tolerance for a default is 0.1 SD for every descriptor, so reader.scaled_decode is off
# by default.
SENSITIVE = {"hed_std_h", "hed_std_e", "hed_std_d", "hed_p90_h"}


@pytest.fixture(scope="module")
def generated_slide(tmp_path_factory):
    return write_test_slide(tmp_path_factory.mktemp("jpeg") / "gen.svs", width=3072, height=2304, seed=5)


def _tiles(path, mpp, tile_px, scaled: bool):
    info = read_slide_info(path)
    grid = tile_grid(info, TilingConfig(mpp=mpp, tile_px=tile_px))
    shrink = grid.tile_l0_px / grid.read_downsample / grid.tile_px
    choice = choose_reader(info, "auto", grid.read_level, shrink, scaled_decode=scaled)
    with open_reader(path, choice) as reader:
        tiles = np.concatenate([read_tile_row(reader, grid, row, np.arange(grid.cols)) for row in range(grid.rows)])
    return tiles, choice


@pytest.mark.parametrize("name,mpp,tile_px,max_mean_diff", [("cmu", 0.998, 128, 0.3), ("generated", 0.5, 256, 0.8)])
def test_scaled_decode_is_close_to_the_area_average(name, mpp, tile_px, max_mean_diff, cmu_slide, generated_slide):
    path = cmu_slide if name == "cmu" else generated_slide
    scaled, choice = _tiles(path, mpp, tile_px, scaled=True)
    full, reference = _tiles(path, mpp, tile_px, scaled=False)
    assert choice.kind == "tiff" and choice.jpeg_scale == 2 and choice.decode == "jpeg_dct_1/2"
    assert reference.jpeg_scale == 1 and reference.decode == "full"
    diff = np.abs(scaled.astype(np.int16) - full)
    # measured: mean 0.11 (cmu) / 0.45 (generated) grey levels, 99th percentile 2-3, max ~20 (edges of nuclei)
    assert diff.mean() < max_mean_diff and np.percentile(diff, 99) <= 4
    config = DescriptorConfig()
    d_scaled, d_full = compute_descriptors(scaled, config), compute_descriptors(full, config)
    tissue = full.reshape(len(full), -1).mean(axis=1) < 220
    names = compute_names()
    spread = np.std(d_full[tissue], axis=0) + 1e-12
    moved = np.abs(d_scaled[tissue] - d_full[tissue]).mean(axis=0) / spread  # in across-tile standard deviations
    for i, feature in enumerate(names):
        if feature not in SENSITIVE:  # measured at most 0.094 (cmu) and 0.111 (generated)
            assert moved[i] < 0.15, f"{name}: {feature} moved {moved[i]:.3f} SD"
    # measured: hed_std_e 3.1 and hed_std_h 0.34 SD (cmu); generated: at most 0.085 SD since the H&E generator of
    # 7d617df (0.24 before it). The real slide is the one that keeps scaled decoding off.
    if name == "cmu":
        assert max(moved[names.index(f)] for f in SENSITIVE) > 0.2


def compute_names() -> list[str]:
    from pipeline.describe.descriptors import descriptor_names

    return list(descriptor_names(DescriptorConfig()))


def test_full_size_stream_decodes_to_tifffiles_pixels(cmu_slide, generated_slide):
    """The rebuilt stream (Adobe colour-space marker + the TIFF's JPEG tables) decodes exactly like tifffile."""
    import tifffile

    for path in (cmu_slide, generated_slide):
        with tifffile.TiffFile(path) as tif, open(path, "rb") as fh:
            page = tif.pages[0]
            prefix = jpeg.stream_prefix(page.jpegtables, rgb=int(page.photometric) == 2)
            for index in (0, len(page.dataoffsets) // 2, len(page.dataoffsets) - 1):
                fh.seek(page.dataoffsets[index])
                data = fh.read(page.databytecounts[index])
                expected = page.decode(data, index, jpegtables=page.jpegtables)[0][0]
                stream = jpeg.full_stream(prefix, data)
                np.testing.assert_array_equal(jpeg.decode_scaled(stream, page.tilewidth, page.tilelength, 1), expected)
                half = jpeg.decode_scaled(stream, page.tilewidth, page.tilelength, 2)
                assert half.shape == (page.tilelength // 2, page.tilewidth // 2, 3)


def test_scale_for():
    assert jpeg.scale_for(2.0, 256, 256) == 2 and jpeg.scale_for(1.99, 256, 256) == 1
    assert jpeg.scale_for(5.0, 256, 256) == 4 and jpeg.scale_for(16.0, 256, 256) == 8
    assert jpeg.scale_for(8.0, 240, 240) == 8 and jpeg.scale_for(8.0, 244, 244) == 4  # tiles must divide
    assert jpeg.scale_for(8.0, 256, 256, max_scale=2) == 2


def test_describe_records_the_decode_path(generated_slide, tmp_path):
    base = PipelineConfig().with_overrides(tiling__mpp=0.5, tiling__tile_px=128, tissue__fraction_min=0.2)
    assert base.reader.scaled_decode is False  # off by default (see SENSITIVE)
    scaled = base.with_overrides(reader__scaled_decode=True)
    assert scaled.stage_hash("describe") != base.stage_hash("describe")  # different pixels: stale stores
    attrs = {}
    for label, config in (("full", base), ("scaled", scaled)):
        store = describe_slide(generated_slide, tmp_path / label, config)
        attrs[label] = read_attrs(store)
        attrs[label]["values"] = read_array(store, "descriptors")
    assert attrs["full"]["pixel_decode"] == "full"
    assert attrs["scaled"]["pixel_decode"] == "jpeg_dct_1/2" and "1/2" in attrs["scaled"]["pixel_decode_reason"]
    a, b = attrs["scaled"]["values"], attrs["full"]["values"]
    assert np.array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(a[..., :3], b[..., :3], atol=1.5)  # RGB means within 1.5 grey levels


def test_direct_reader_takes_simplejpeg_for_full_size_tiles_when_exact(cmu_slide, generated_slide):
    from pipeline.slides.readers import OpenSlideReader, TiffTileReader

    for path in (cmu_slide, generated_slide):
        info = read_slide_info(path)
        with TiffTileReader(path, info.level_dimensions, info.level_downsamples) as direct, \
                OpenSlideReader(path) as reference:
            np.testing.assert_array_equal(direct.read_region(0, 100, 200, 700, 500),
                                          reference.read_region(0, 100, 200, 700, 500))
            # checked on the first tile, then used for the level (the check is shared by a process's readers of the
            # file since 6b37937, so other levels read by earlier tests may be there too)
            assert direct._levels[0].fast_jpeg is True
