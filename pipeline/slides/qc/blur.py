"""Out of focus: the energy of the Laplacian of a tile's grey levels over their variance, both over its stained pixels
(glass between loose tissue is left out; sharp pale tissue keeps its ratio, while blur removes fine detail far more
than contrast), with the energy measured per cell of a 4 x 4 grid: the tile's score is the 30% quantile of its cells'
energy, by stained pixels, over the tile's variance. So a tile a third or more out of focus scores as blurred (scored
whole, a tile half in a blurred region kept its sharp half's detail and passed: ``docs/design/qc.md``). A tile is
flagged below ``qc.blur_ratio`` x the slide's reference (the 75th percentile over its tissue tiles).

The score runs in the describe block tasks (it needs full-resolution pixels); the decision runs when the slide is
finalised, over all its tiles' scores. A slide blurred throughout is not flagged (nothing to compare with), and
textureless tissue (fat, mucin) scores low like blur: ``qc.blur_ratio`` trades the two. The compiled kernel and its
numpy fallback make the same integer sums per cell (integer grey), and one numpy function turns them into scores.
"""

from __future__ import annotations

import numpy as np

from ...core.jit import njit

MIN_TILES = 8  # fewer tiles: no reference, nothing flagged
REFERENCE_PERCENTILE = 75.0

GLASS_GREY = 215  # pixels at least this bright (integer grey) are glass: left out (sparse tissue is not blur)
MIN_STAINED = 0.05  # a tile with fewer stained pixels has no score (NaN: never flagged)
GRID_CELLS = 4  # cells per tile side (a 256-px tile: 64-px cells)
CELL_QUANTILE = 0.3  # the tile's score: this quantile of its cells' focus, by stained pixels
MIN_CELL_PIXELS = 16  # a cell with fewer stained pixels has no score of its own
GREY_WEIGHTS = (77, 150, 29)  # integer luma (0.299, 0.587, 0.114) x 256: grey = (77 R + 150 G + 29 B + 128) >> 8
SUMS = 4  # per cell: stained pixels, sum of grey, sum of grey², sum of Laplacian²


def cell_edges(size: int, cells: int) -> np.ndarray:
    """(cells + 1,) pixel edges of ``cells`` bands over rows or columns 1 .. size - 2 (the Laplacian's interior)."""
    return 1 + (np.arange(cells + 1) * (size - 2)) // cells


def grid_cells(h: int, w: int, cells: int = GRID_CELLS) -> int:
    """Cells per side for an h x w tile: ``cells``, fewer when the cells would be under 8 px."""
    return int(max(1, min(cells, (min(h, w) - 2) // 8)))


def cell_sums_numpy(tiles: np.ndarray, cells: int, glass: int = GLASS_GREY) -> np.ndarray:
    """(n, cells, cells, 4) int64 sums over each cell's stained interior pixels of uint8 RGB tiles (n, h, w, 3):
    count, grey, grey², Laplacian² (the numpy reference of the compiled kernel)."""
    n, h, w, _ = tiles.shape
    rows, cols = cell_edges(h, cells)[:-1] - 1, cell_edges(w, cells)[:-1] - 1
    out = np.empty((n, cells, cells, SUMS), np.int64)
    for start in range(0, n, 16):  # a few tiles at a time: the per-pixel int64 arrays stay small
        grey = (np.array(GREY_WEIGHTS, np.int32) * tiles[start:start + 16]).sum(axis=-1, dtype=np.int32) + 128 >> 8
        centre = grey[:, 1:-1, 1:-1].astype(np.int64)
        lap = 4 * centre - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1] - grey[:, 1:-1, :-2] - grey[:, 1:-1, 2:]
        stained = (centre < glass).astype(np.int64)
        for k, values in enumerate((stained, stained * centre, stained * centre * centre, stained * lap * lap)):
            out[start:start + 16, ..., k] = np.add.reduceat(np.add.reduceat(values, rows, axis=1), cols, axis=2)
    return out


@njit
def _grey_row(rgb_row, grey_row, w):  # pragma: no cover - compiled
    for x in range(w):
        grey_row[x] = (77 * np.int32(rgb_row[3 * x]) + 150 * np.int32(rgb_row[3 * x + 1])
                       + 29 * np.int32(rgb_row[3 * x + 2]) + 128) >> 8


@njit
def _cell_sums_kernel(tiles, row_edges, col_edges, glass, grey, columns, sums):  # pragma: no cover - compiled
    """Fills ``sums`` (n, cells, cells, 4) int64. Scratch: ``grey`` (h, w) int32, ``columns`` (4, w) int32 (the sums
    of each pixel column down one band of cells). The inner loop runs along a whole row, branchless (the stained
    weight 0/1 is multiplied in), so it vectorises; grey rows are made one ahead of the Laplacian (still in cache)."""
    n, h, w, _ = tiles.shape
    cells = len(row_edges) - 1
    for t in range(n):
        _grey_row(tiles[t, 0].reshape(3 * w), grey[0], w)
        _grey_row(tiles[t, 1].reshape(3 * w), grey[1], w)
        for cy in range(cells):
            columns[:] = 0
            for y in range(row_edges[cy], row_edges[cy + 1]):
                _grey_row(tiles[t, y + 1].reshape(3 * w), grey[y + 1], w)
                up, mid, down = grey[y - 1], grey[y], grey[y + 1]
                for x in range(1, w - 1):
                    g = mid[x]
                    m = np.int32(g < glass)
                    v = 4 * g - up[x] - down[x] - mid[x - 1] - mid[x + 1]
                    columns[0, x] += m
                    columns[1, x] += m * g
                    columns[2, x] += m * g * g
                    columns[3, x] += m * v * v
            for cx in range(cells):
                for k in range(4):
                    total = 0
                    for x in range(col_edges[cx], col_edges[cx + 1]):
                        total += columns[k, x]
                    sums[t, cy, cx, k] = total


def cell_sums(tiles: np.ndarray, cells: int) -> np.ndarray:
    """(n, cells, cells, 4) int64 per-cell sums (``cell_sums_numpy``), compiled when numba is there (and the int32
    column sums cannot overflow: Laplacian² <= 1020² per pixel, bands of at most 2000 rows)."""
    n, h, w, _ = tiles.shape
    if _cell_sums_kernel is None or h - 2 > 2000 * cells:
        return cell_sums_numpy(tiles, cells)
    sums = np.zeros((n, cells, cells, SUMS), np.int64)
    _cell_sums_kernel(tiles, cell_edges(h, cells), cell_edges(w, cells), np.int32(GLASS_GREY),
                      np.empty((h, w), np.int32), np.empty((SUMS, w), np.int32), sums)
    return sums


def scores_from_sums(sums: np.ndarray, interior_px: int, quantile: float = CELL_QUANTILE) -> np.ndarray:
    """(n,) float32 tile scores from (n, cells, cells, 4) sums: the ``quantile``, weighted by stained pixels, of the
    cells' mean squared Laplacian over the grey variance of the whole tile's stained pixels; NaN when under
    ``MIN_STAINED`` of the tile is stained."""
    flat = sums.reshape(len(sums), -1, SUMS).astype(np.float64)
    count, total, total2, energy = np.moveaxis(flat, -1, 0)
    stained = count.sum(axis=1)
    mean = total.sum(axis=1) / np.maximum(stained, 1.0)
    variance = np.maximum(total2.sum(axis=1) / np.maximum(stained, 1.0) - mean * mean, 1.0)
    has = count >= MIN_CELL_PIXELS
    focus = np.where(has, energy / np.maximum(count, 1.0) / variance[:, None], np.inf)
    weight = np.where(has, count, 0.0)
    order = np.argsort(focus, axis=1, kind="stable")
    cumulative = np.cumsum(np.take_along_axis(weight, order, axis=1), axis=1)
    reached = cumulative >= quantile * cumulative[:, -1:]
    pick = np.take_along_axis(order, np.argmax(reached, axis=1)[:, None], axis=1)[:, 0]
    score = np.take_along_axis(focus, pick[:, None], axis=1)[:, 0]
    valid = (stained >= MIN_STAINED * interior_px) & (weight.sum(axis=1) > 0)
    return np.where(valid, score, np.nan).astype(np.float32)


def focus_scores(tiles: np.ndarray) -> np.ndarray:
    """(n,) float32 focus of uint8 RGB tiles (n, h, w, 3): the 30% quantile (by stained pixels) of their cells'
    Laplacian energy over the tile's grey variance; NaN for a tile that is nearly all glass."""
    tiles = np.ascontiguousarray(tiles, dtype=np.uint8)
    if len(tiles) == 0 or tiles.shape[1] < 3 or tiles.shape[2] < 3:
        return np.full(len(tiles), np.nan, np.float32)
    h, w = tiles.shape[1:3]
    return scores_from_sums(cell_sums(tiles, grid_cells(h, w)), (h - 2) * (w - 2))


def blurred_tiles(scores: np.ndarray, ratio: float = 0.08) -> np.ndarray:
    """Bool (n,): scores below ``ratio`` x the reference of these scores (a slide's tissue tiles)."""
    scores = np.asarray(scores, dtype=np.float64)
    valid = np.isfinite(scores)
    if valid.sum() < MIN_TILES:
        return np.zeros(scores.shape, dtype=bool)
    reference = np.percentile(scores[valid], REFERENCE_PERCENTILE)
    return valid & (scores < ratio * reference)


def _detector():
    from . import Detector

    return Detector("blur", "tile", score=focus_scores, decide=lambda scores, qc: blurred_tiles(scores, qc.blur_ratio))


DETECTOR = _detector()
