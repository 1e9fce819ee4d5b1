"""The feature-map contract's fill of QC-excluded tissue cells (``core.maps.fill_excluded_cells``)."""

import numpy as np

from pipeline.core.maps import FEATURE_MAP_FILL, FILLED_QC_CODES, fill_excluded_cells
from pipeline.core.qc_codes import QC_CODES


def _map_with_hole():
    """A 6 x 8 map: columns 1-3 hold 0.2, columns 4-6 hold 0.8 (K = 2), the rest glass; cells are then cut out."""
    fmap = np.full((6, 8, 2), FEATURE_MAP_FILL, dtype=np.float32)
    fmap[1:5, 1:4] = 0.2
    fmap[1:5, 4:7] = 0.8
    fmap[1:5, 4:7, 1] = 0.9
    return fmap


def test_excluded_cells_take_their_nearest_described_cell_and_glass_stays_glass():
    fmap = _map_with_hole()
    qc = np.zeros((6, 8), np.uint8)
    qc[2, 1] = QC_CODES["pen"]          # left half: its neighbours hold 0.2
    qc[3, 5] = QC_CODES["blur"]         # right half: 0.8 / 0.9
    qc[2, 3] = QC_CODES["annotation_exclude"]
    qc[4, 6] = QC_CODES["annotation_outside"]  # outside the regions of interest: stays background
    holed = fmap.copy()
    holed[qc > 0] = FEATURE_MAP_FILL
    filled, n = fill_excluded_cells(holed, qc)
    assert n == 3
    np.testing.assert_array_equal(filled[2, 1], np.float32([0.2, 0.2]))
    np.testing.assert_array_equal(filled[3, 5], np.float32([0.8, 0.9]))
    np.testing.assert_array_equal(filled[2, 3], np.float32([0.2, 0.2]))  # nearest: (2, 2), not (2, 4)
    np.testing.assert_array_equal(filled[4, 6], [FEATURE_MAP_FILL] * 2)
    glass = np.ones((6, 8), bool)
    glass[1:5, 1:7] = False
    assert (filled[glass] == FEATURE_MAP_FILL).all()  # no glass cell gets a value
    kept = (qc == 0) & ~glass
    np.testing.assert_array_equal(filled[kept], holed[kept])  # described cells untouched
    assert QC_CODES["annotation_outside"] not in FILLED_QC_CODES


def test_nothing_to_fill_returns_the_map_itself():
    fmap = _map_with_hole()
    assert fill_excluded_cells(fmap, None) == (fmap, 0)
    assert fill_excluded_cells(fmap, np.zeros((6, 8), np.uint8))[1] == 0
    empty = np.full((3, 3, 2), FEATURE_MAP_FILL, np.float32)  # no described cell: nothing to take values from
    out, n = fill_excluded_cells(empty, np.full((3, 3), QC_CODES["pen"], np.uint8))
    assert n == 0 and (out == FEATURE_MAP_FILL).all()
