"""Window arithmetic known answers (the property test lives in test_tile.py)."""

import numpy as np
import pytest
from affine import Affine
from rasterio.crs import CRS

from pipeline.geo import GeoArray, axis_offsets, grid_windows, pixel_size, utm_crs_for


def test_axis_offsets_last_window_reaches_edge():
    assert axis_offsets(1001, 256, 32) == [0, 224, 448, 672, 745]
    assert axis_offsets(256, 256, 32) == [0]
    assert axis_offsets(10, 256, 32) == [0]
    with pytest.raises(ValueError):
        axis_offsets(100, 32, 32)


def test_grid_windows_row_major():
    wins = grid_windows(300, 200, 128, 0)
    assert [(w.row_off, w.col_off) for w in wins] == [
        (0, 0), (0, 128), (0, 172), (72, 0), (72, 128), (72, 172)]


def test_utm_zone_and_geoarray():
    assert utm_crs_for(15.2, 45.0) == CRS.from_epsg(32633)
    assert utm_crs_for(-70.5, -33.4) == CRS.from_epsg(32719)
    ga = GeoArray(np.zeros((3, 20, 10)), Affine(0.15, 0, 500000, 0, -0.15, 4000000),
                  CRS.from_epsg(32633))
    assert ga.shape == (20, 10)
    assert ga.gsd == pytest.approx(0.15)
    assert ga.bounds == pytest.approx((500000, 4000000 - 3.0, 500001.5, 4000000))
    assert pixel_size(Affine(2, 0, 0, 0, -2, 0)) == 2
