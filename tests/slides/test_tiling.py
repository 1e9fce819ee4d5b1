import numpy as np
import openslide
import pytest

from pipeline.core.config import TilingConfig
from pipeline.core.errors import MissingMppError, ResolutionTooLowError
from pipeline.slides.open import read_slide_info
from pipeline.slides.tiling import TileGrid, iter_tile_batches, read_tile_row, tile_grid


def test_grid_geometry_real_slide(cmu_slide):
    grid = tile_grid(read_slide_info(cmu_slide), TilingConfig(mpp=0.5, tile_px=256))
    assert grid.tile_l0_px == pytest.approx(256 * 0.5 / 0.499)
    assert (grid.rows, grid.cols) == (11, 8)  # whole tiles only: 2967 / 256.51, 2220 / 256.51
    assert grid.read_level == 0
    x, y, w, h = grid.tile_box_l0(10, 7)
    assert x + w <= 2220 and y + h <= 2967
    assert TileGrid.from_dict(grid.to_dict()) == grid


def test_stride_gives_overlapping_grid(cmu_slide):
    grid = tile_grid(read_slide_info(cmu_slide), TilingConfig(mpp=0.5, tile_px=256, stride_px=128))
    assert grid.stride_l0_px == pytest.approx(grid.tile_l0_px / 2)
    assert grid.cols == int((2220 - grid.tile_l0_px) // grid.stride_l0_px) + 1 == 16


def test_pyramid_level_chosen_for_target(fixtures_dir):
    info = read_slide_info(fixtures_dir / "boxes.tiff")  # 352.8 µm/px, levels 1, 2, 4.016, 8.086
    grid = tile_grid(info, TilingConfig(mpp=1000, tile_px=16))
    assert grid.downsample == pytest.approx(2.8346, rel=1e-3)
    assert grid.read_level == 1 and grid.read_downsample == 2.0
    grid = tile_grid(info, TilingConfig(mpp=3000, tile_px=8))
    assert grid.read_level == 3


def test_coarse_slide_rejected_unless_target_is_coarser(fixtures_dir):
    info = read_slide_info(fixtures_dir / "boxes.tiff")
    with pytest.raises(ResolutionTooLowError) as err:
        tile_grid(info, TilingConfig(mpp=0.5))
    assert "352.8" in str(err.value) and "boxes.tiff" in str(err.value)


def test_missing_mpp(fixtures_dir):
    with pytest.raises(MissingMppError):
        tile_grid(read_slide_info(fixtures_dir / "boxes.png"), TilingConfig())


def test_chunks_cover_grid_once():
    grid = TileGrid(1000, 700, 0.5, 0.5, 32, 32, rows=21, cols=31, tile_l0_px=32, stride_l0_px=32,
                    read_level=0, read_downsample=1.0)
    covered = np.zeros(grid.shape, dtype=int)
    for r0, r1, c0, c1 in grid.chunks(8):
        assert r1 - r0 <= 8 and c1 - c0 <= 8 and r0 % 8 == 0 and c0 % 8 == 0
        covered[r0:r1, c0:c1] += 1
    assert (covered == 1).all()


def test_tiles_at_integer_downsample_equal_block_mean(cmu_slide):
    """At exactly 2x the scan resolution a tile is the 2x2 block mean of level-0 pixels (direct numpy)."""
    info = read_slide_info(cmu_slide)
    grid = tile_grid(info, TilingConfig(mpp=0.499 * 2, tile_px=64))
    assert grid.tile_l0_px == pytest.approx(128)
    with openslide.OpenSlide(str(cmu_slide)) as handle:
        tiles = read_tile_row(handle, grid, 5, np.array([2, 3, 6]))
        raw = np.asarray(handle.read_region((int(round(3 * grid.stride_l0_px)), int(round(5 * grid.stride_l0_px))),
                                            0, (128, 128)))[..., :3].astype(float)
    expected = raw.reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))
    assert tiles.shape == (3, 64, 64, 3) and tiles.dtype == np.uint8
    assert np.abs(tiles[1] - expected).max() <= 1.0


def test_tiles_at_native_resolution_are_exact(fixtures_dir):
    info = read_slide_info(fixtures_dir / "boxes.tiff")
    grid = tile_grid(info, TilingConfig(mpp=info.mpp * 2, tile_px=25))  # level 1 exactly
    assert grid.read_level == 1
    with openslide.OpenSlide(str(fixtures_dir / "boxes.tiff")) as handle:
        tiles = read_tile_row(handle, grid, 1, np.array([0, 1, 2]))
        level1 = np.asarray(handle.read_region((0, 0), 1, handle.level_dimensions[1]))[..., :3]
    for i, col in enumerate([0, 1, 2]):
        np.testing.assert_array_equal(tiles[i], level1[25:50, col * 25:(col + 1) * 25])


def test_batches_cover_tissue_tiles_in_order(cmu_slide):
    info = read_slide_info(cmu_slide)
    grid = tile_grid(info, TilingConfig(mpp=2.0, tile_px=32))
    tissue = np.zeros(grid.shape, dtype=bool)
    tissue[1, 2] = tissue[1, 5] = tissue[3, 0] = tissue[4, 4] = True
    block = (0, grid.rows, 0, grid.cols)
    with openslide.OpenSlide(str(cmu_slide)) as handle:
        batches = list(iter_tile_batches(handle, grid, tissue, block, batch_tiles=3))
        single = read_tile_row(handle, grid, 3, np.array([0]))
    assert [len(p) for p, _ in batches] == [3, 1]
    positions = np.concatenate([p for p, _ in batches])
    assert positions.tolist() == [[1, 2], [1, 5], [3, 0], [4, 4]]
    np.testing.assert_array_equal(batches[0][1][2], single[0])


def test_rows_straddling_batches_keep_every_tile_and_position(cmu_slide):
    """Rows are written straight into batches; a row longer than what is left of a batch is split across two."""
    info = read_slide_info(cmu_slide)
    grid = tile_grid(info, TilingConfig(mpp=2.0, tile_px=32))
    tissue = np.zeros(grid.shape, dtype=bool)
    tissue[0, 1] = True
    tissue[2, 0:5] = True
    tissue[3, 3] = True
    block = (0, grid.rows, 0, grid.cols)
    with openslide.OpenSlide(str(cmu_slide)) as handle:
        batches = list(iter_tile_batches(handle, grid, tissue, block, batch_tiles=2))
        expected = np.concatenate([read_tile_row(handle, grid, r, np.flatnonzero(tissue[r])) for r in (0, 2, 3)])
    assert [len(p) for p, _ in batches] == [2, 2, 2, 1]
    positions = np.concatenate([p for p, _ in batches])
    assert positions.tolist() == [[0, 1], [2, 0], [2, 1], [2, 2], [2, 3], [2, 4], [3, 3]]
    np.testing.assert_array_equal(np.concatenate([t for _, t in batches]), expected)


def test_a_row_is_read_in_runs_that_skip_the_tiles_between(cmu_slide):
    """Columns with at least a whole tile (and SKIP_MIN_PX read-level pixels) between them are read apart: the native
    tiles between are not decoded, and every tile has the pixels a read of its run alone gives."""
    from pipeline.slides.reader_choice import choose_reader, open_reader
    from pipeline.slides.tiling import SKIP_MIN_PX, column_runs

    info = read_slide_info(cmu_slide)
    grid = tile_grid(info, TilingConfig(mpp=0.7, tile_px=128))  # 179.6 level-0 px a tile: not on native tiles
    assert [r.tolist() for r in column_runs(grid, np.array([0, 1, 3, 6, 7, 9]))] == [[0, 1, 3], [6, 7, 9]]
    assert SKIP_MIN_PX <= 2 * grid.tile_l0_px / grid.read_downsample < 2 * SKIP_MIN_PX  # a 2-tile gap, not 1
    choice = choose_reader(info, "tiff", grid.read_level)
    cols = np.array([0, 1, 6, 7])
    with open_reader(cmu_slide, choice) as runs_read, open_reader(cmu_slide, choice) as span_read:
        tiles = read_tile_row(runs_read, grid, 3, cols)
        whole_span = read_tile_row(span_read, grid, 3, np.arange(0, 8))
        assert runs_read.tiles_decoded < span_read.tiles_decoded
    for piece, tile_indices in (([0, 1], [0, 1]), ([6, 7], [2, 3])):
        with open_reader(cmu_slide, choice) as alone:
            np.testing.assert_array_equal(tiles[tile_indices], read_tile_row(alone, grid, 3, np.array(piece)))
    np.testing.assert_array_equal(tiles, whole_span[cols])  # the same pixels as one read over the span here
