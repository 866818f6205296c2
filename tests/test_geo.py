"""Window layout (``geo.axis_windows``: known answers per edge rule, properties) and grids."""

import itertools

import numpy as np
import pytest
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.crs import CRS

from pipeline.geo import GeoArray, axis_windows, grid_windows, pixel_size, utm_crs_for


def test_fit_last_window_is_shifted_back_to_the_edge():
    assert axis_windows(1001, 256, 32).starts == (0, 224, 448, 672, 745)
    assert axis_windows(1001, 256, 32, edge="fit").spans()[-1] == (745, 1001)
    assert axis_windows(256, 256, 32).starts == (0,)
    assert axis_windows(10, 256, 32).spans() == [(0, 256)]  # shorter than a window: runs past
    with pytest.raises(ValueError):
        axis_windows(100, 32, 32)


def test_past_starts_on_the_lattice_and_shrinks_the_window():
    # 700 px at phase 5 on a 16 px lattice: one window of 720 (not 1280) starting 5 px early.
    assert axis_windows(700, 1280, 160, edge="past", phase=5, multiple=16).spans() == [(-5, 715)]
    layout = axis_windows(3000, 1280, 160, edge="past", phase=0, multiple=16)
    assert (layout.size, layout.starts) == (1120, (0, 960, 1920))
    assert layout.spans()[-1][1] >= 3000  # the last window may run past the edge
    with pytest.raises(ValueError):
        axis_windows(100, 64, 16, edge="past", phase=-1)


def test_clip_cores_stop_at_the_edge():
    assert axis_windows(1000, 300, edge="clip").spans() == [(0, 300), (300, 600), (600, 900),
                                                            (900, 1000)]
    assert axis_windows(0, 300, edge="clip").spans() == []
    wins = grid_windows(500, 250, 200, edge="clip")
    assert [(w.col_off, w.row_off, w.width, w.height) for w in wins] == [
        (0, 0, 200, 200), (200, 0, 200, 200), (400, 0, 100, 200),
        (0, 200, 200, 50), (200, 200, 200, 50), (400, 200, 100, 50)]
    with pytest.raises(ValueError):
        axis_windows(10, 5, edge="overlap")


@settings(max_examples=200, deadline=None)
@given(length=st.integers(1, 3000), lattice=st.integers(0, 6), k=st.integers(1, 40),
       overlap_k=st.integers(0, 20), phase=st.integers(0, 63),
       edge=st.sampled_from(["fit", "past", "clip"]))
def test_every_rule_covers_every_pixel_on_its_stride(length, lattice, k, overlap_k, phase, edge):
    multiple = 2 ** lattice
    size, overlap = k * multiple * 2, min(overlap_k, k) * multiple  # overlap <= half the window
    phase = phase % multiple if edge == "past" else 0
    layout = axis_windows(length, size, overlap, edge=edge, phase=phase, multiple=multiple)
    spans = layout.spans()
    covered = np.zeros(length, dtype=bool)
    for start, stop in spans:
        covered[max(start, 0):max(min(stop, length), 0)] = True
    assert covered.all()  # every pixel in some window
    assert layout.size <= size
    starts = layout.starts
    stride = layout.size - overlap
    if edge == "past":
        assert all((s + phase) % multiple == 0 for s in starts)  # on the lattice
        assert layout.size % multiple == 0 and starts[0] == -phase
        assert all(b - a == stride for a, b in itertools.pairwise(starts))
        assert starts[-1] < length - overlap or len(starts) == 1  # no window only overlap
        assert layout.size - multiple < phase + length or len(starts) > 1  # no all-padding
    else:
        assert starts[0] == 0 and layout.size == size
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        assert all(g == stride for g in gaps[:-1]) and all(0 < g <= stride for g in gaps)
    if edge == "fit" and length >= size:
        assert max(stop for _, stop in spans) == length  # never past the edge
    if edge == "clip":
        assert spans[-1][1] == length and all(0 < b - a <= size for a, b in spans)
        assert all(g == stride for g in [b - a for a, b in itertools.pairwise(starts)])


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
