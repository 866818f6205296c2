"""Vectorizing: one polygon per car, window-size independent, right attributes, nodata respected."""

from __future__ import annotations

import json
import math

import numpy as np
import pyogrio
import pytest
import rasterio.features
import shapely
from affine import Affine
from conftest import GSD, ORIGIN, TRANSFORM, UTM, write_scene
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage
from shapely import affinity
from shapely.geometry import box

from pipeline.config import VectorConfig
from pipeline.io import read_vector
from pipeline.stages.vectorize import COLUMNS, rectangle_attributes, vectorize_scene, write_summary


def car(cx_px: float, cy_px: float, *, length_m=4.5, width_m=1.9, heading_deg=0.0):
    """A car footprint in map coordinates, centred on pixel (col, row), long axis at heading."""
    x = ORIGIN[0] + cx_px * GSD
    y = ORIGIN[1] - cy_px * GSD
    rect = box(x - width_m / 2, y - length_m / 2, x + width_m / 2, y + length_m / 2)
    # shapely rotates counter-clockwise for positive angles; heading is clockwise from north.
    return affinity.rotate(rect, -heading_deg, origin=(x, y))


def burn(shape, geoms, value=1):
    return rasterio.features.rasterize([(g, value) for g in geoms], out_shape=shape,
                                       transform=TRANSFORM, fill=0, dtype="uint8")


def write_pred(out_dir, scene, mask, prob=None):
    """Write out_dir/masks/<scene>.tif and probability/<scene>.tif the way predict does."""
    if prob is None:
        prob = np.where(mask == 255, 255, mask.astype(np.uint16) * 230).astype(np.uint8)
    write_scene(out_dir / "probability" / f"{scene}.tif", prob[None], nodata=255)
    return write_scene(out_dir / "masks" / f"{scene}.tif", mask[None].astype(np.uint8),
                       nodata=255)


def run(out_dir, scene, **kw):
    path = vectorize_scene(out_dir / "masks" / f"{scene}.tif", out_dir, cfg=VectorConfig(**kw))
    return read_vector(path)


def test_rotated_rectangle_attributes(tmp_path):
    truth = car(60, 60, heading_deg=30)
    write_pred(tmp_path, "s", burn((120, 120), [truth]))
    gdf = run(tmp_path, "s")
    assert len(gdf) == 1
    row = gdf.iloc[0]
    assert gdf.crs == UTM
    assert row.area_m2 == pytest.approx(4.5 * 1.9, rel=0.08)
    assert row.length_m == pytest.approx(4.5, abs=0.25)
    assert row.width_m == pytest.approx(1.9, abs=0.25)
    assert row.heading_deg == pytest.approx(30, abs=3)
    assert row.mean_prob == pytest.approx(230 / 254, abs=1e-6)
    assert row.max_prob == pytest.approx(230 / 254, abs=1e-6)
    assert row.scene == "s"
    assert list(gdf.columns) == [*COLUMNS, "geometry"]
    assert gdf.geometry.iloc[0].symmetric_difference(truth).area < truth.length * GSD

    reg = run(tmp_path, "s", regularize=True)
    assert len(shapely.get_coordinates(reg.geometry.iloc[0])) == 5  # a rectangle


def test_axis_aligned_rectangle_known_answer():
    # 3 m east-west by 6 m north-south: heading 0; then east-west long axis: heading 90.
    length, width, heading = rectangle_attributes(box(0, 0, 3, 6))
    assert (length, width, heading) == pytest.approx((6, 3, 0))
    length, width, heading = rectangle_attributes(box(0, 0, 6, 3))
    assert (length, width, heading) == pytest.approx((6, 3, 90))
    _, _, heading = rectangle_attributes(affinity.rotate(box(0, 0, 1, 5), -135, origin=(0, 0)))
    assert heading == pytest.approx(135)


@pytest.mark.parametrize("offset", [(18, 12), (28, 9), (22, 12)])
def test_touching_cars_split(tmp_path, offset):
    # Two parallel cars touching along a short stretch (side by side, staggered; end to end
    # with a sideways offset): one blob in the mask, two cars out.
    a = car(40, 40)
    b = car(40 + offset[1], 40 + offset[0])
    mask = burn((100, 100), [a]) | burn((100, 100), [b])
    assert ndimage.label(mask, np.ones((3, 3)))[1] == 1  # the masks really touch
    write_pred(tmp_path, "s", mask)
    gdf = run(tmp_path, "s")
    assert len(gdf) == 2
    for truth in (a, b):
        best = max(gdf.geometry, key=lambda g: g.intersection(truth).area)
        assert best.intersection(truth).area / best.union(truth).area > 0.7
    assert len(run(tmp_path, "s", split_touching=False)) == 1


def test_single_car_never_split(tmp_path):
    write_pred(tmp_path, "s", burn((100, 100), [car(50, 50, heading_deg=h) for h in [0]]))
    assert len(run(tmp_path, "s")) == 1
    for i, h in enumerate([0, 17, 45, 72, 90, 130]):
        write_pred(tmp_path, f"h{i}", burn((100, 100), [car(50, 50, heading_deg=h)]))
        assert len(run(tmp_path, f"h{i}")) == 1, h


def _random_cars(rng, size=300, n=20):
    cars = []
    # Force some cars straddling the 64-px window boundaries.
    centres = [(64, 64), (128, 130), (192, 60), (250, 256)]
    while len(centres) < 200 and len(cars) < n:
        centres.append(tuple(rng.uniform(15, size - 15, 2)))
    for cx, cy in centres:
        cand = car(cx, cy, heading_deg=float(rng.uniform(0, 180)))
        if all(cand.distance(c) > 0.5 for c in cars):
            cars.append(cand)
        if len(cars) == n:
            break
    return cars


def test_cars_do_not_depend_on_window_size(tmp_path, rng):
    cars = _random_cars(rng)
    assert len(cars) == 20
    write_pred(tmp_path, "s", burn((300, 300), cars))
    small = run(tmp_path, "s", window=64, halo=64)
    large = run(tmp_path, "s", window=512, halo=64)
    # A halo smaller than a car: blobs cut by the block edge are read again, grown until whole.
    tiny_halo = run(tmp_path, "s", window=64, halo=8)
    assert len(small) == len(large) == len(tiny_halo) == 20
    for g in small.geometry:
        for frame in (large, tiny_halo):
            other = min(frame.geometry, key=lambda h: h.centroid.distance(g.centroid))
            assert g.symmetric_difference(other).area < g.length * GSD
    for truth in cars:  # and every car is where it was drawn
        best = max(small.geometry, key=lambda g: g.intersection(truth).area)
        assert best.intersection(truth).area / best.union(truth).area > 0.7


def test_no_cars_over_nodata(tmp_path):
    blobs_left = [car(30, 40), car(30, 100, heading_deg=60)]
    real = car(120, 70)
    mask = burn((150, 160), blobs_left + [real])
    prob = np.where(mask == 1, 250, 3).astype(np.uint8)
    mask[:, :75] = 255  # left half is nodata in the mask, while prob still shows blobs there
    # A blob the mask calls a car but where the probability raster says nodata.
    extra = car(120, 20, heading_deg=90)
    mask |= burn((150, 160), [extra]) & (mask != 255)
    prob[burn((150, 160), [extra]) == 1] = 255
    write_pred(tmp_path, "s", mask, prob)
    gdf = run(tmp_path, "s")
    assert len(gdf) == 1
    assert gdf.geometry.iloc[0].intersection(real).area > 0.9 * real.area
    assert gdf.iloc[0].mean_prob == pytest.approx(250 / 254)


def test_area_filters(tmp_path):
    tiny = car(20, 20, length_m=1.0, width_m=1.0)
    roof = car(80, 60, length_m=7.0, width_m=7.0)  # 49 m2, and no way to cut it into cars
    normal = car(20, 80)
    write_pred(tmp_path, "s", burn((120, 120), [tiny, roof, normal]))
    gdf = run(tmp_path, "s", min_area_m2=2.0, max_area_m2=40.0)
    assert len(gdf) == 1
    assert gdf.geometry.iloc[0].intersects(normal)


@pytest.mark.parametrize("fmt", ["gpkg", "geojson", "parquet"])
def test_empty_result_has_schema_and_crs(tmp_path, fmt):
    write_pred(tmp_path, "empty", np.zeros((64, 64), np.uint8))
    path = vectorize_scene(tmp_path / "masks" / "empty.tif", tmp_path,
                           cfg=VectorConfig(format=fmt))
    assert path.name == f"empty.{fmt}"
    gdf = read_vector(path)
    assert len(gdf) == 0
    assert gdf.crs == UTM
    if fmt != "geojson":  # GeoJSON keeps fields only in features: an empty file has none
        assert set(COLUMNS) <= set(gdf.columns)
    if fmt == "gpkg":
        assert pyogrio.read_info(path)["geometry_type"] == "Polygon"


def test_summary_lists_failed_scenes(tmp_path):
    write_pred(tmp_path, "a", burn((100, 100), [car(30, 30), car(70, 70)]))
    run(tmp_path, "a")
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "a.predict.json").write_text(json.dumps({"seconds": 2.5, "status": "ok"}))
    (logs / "a.vectors.json").write_text(json.dumps({"seconds": 0.5, "status": "ok"}))
    (logs / "b.predict.json").write_text(json.dumps({"status": "failed", "error": "b.tif: bad"}))
    import pandas as pd

    table = pd.read_csv(write_summary(tmp_path)).set_index("scene")
    assert table.loc["a", "cars"] == 2
    assert table.loc["a", "seconds"] == pytest.approx(3.0)
    assert table.loc["a", "car_area_m2"] == pytest.approx(2 * 4.5 * 1.9, rel=0.1)
    assert table.loc["a", "status"] == "ok"
    assert table.loc["b", "status"] == "failed"
    assert "b.tif: bad" in table.loc["b", "error"]
    assert math.isnan(table.loc["b", "cars"])


def test_blob_larger_than_halo_is_one_blob_whatever_the_window(tmp_path):
    # A U of touching cars spanning several 64-px windows, read with a halo smaller than a car:
    # its arms meet only outside most blocks, yet it must come out the same as in one window.
    cars = [car(40 + 12 * i, 40) for i in range(6)]  # side by side, overlapping
    cars += [car(40, 70 + 29 * i) for i in range(3)]
    cars += [car(100, 70 + 29 * i) for i in range(3)]
    mask = burn((200, 200), cars)
    assert ndimage.label(mask, np.ones((3, 3)))[1] == 1
    write_pred(tmp_path, "u", mask)
    kw = dict(max_area_m2=1000.0, split_touching=False)
    whole = run(tmp_path, "u", window=512, **kw)
    windowed = run(tmp_path, "u", window=64, halo=8, **kw)
    assert len(whole) == len(windowed) == 1
    assert whole.geometry.iloc[0].symmetric_difference(windowed.geometry.iloc[0]).area < 1e-6


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), window=st.sampled_from([64, 96, 200]),
       halo=st.sampled_from([8, 20, 64]))
def test_window_independence_property(tmp_path, seed, window, halo):
    # Touching and separate cars anywhere: any window and halo give the very same file content.
    r = np.random.default_rng(seed)
    cars = [car(*r.uniform(10, 150, 2), heading_deg=float(r.uniform(0, 180)))
            for _ in range(int(r.integers(5, 25)))]
    scene = f"p{seed}_{window}_{halo}"
    write_pred(tmp_path, scene, burn((160, 160), cars))
    ref = run(tmp_path, scene, window=1024)
    got = run(tmp_path, scene, window=window, halo=halo)
    assert len(ref) == len(got)
    for a, b in zip(ref.geometry, got.geometry, strict=True):
        assert a.equals(b)


@pytest.mark.parametrize("heading", [0, 30, 90])
def test_cars_in_full_contact_split_and_vans_kept(tmp_path, heading):
    # Side by side and end to end with no neck at all: only the size says there are two cars.
    # A van (6 x 2.4 m, larger than max_car_area_m2) is one vehicle and stays whole.
    rad = math.radians(heading)
    along, across = np.array([math.sin(rad), math.cos(rad)]), np.array([math.cos(rad), -math.sin(rad)])
    def at(offset_m):  # pixel centre (col, row) moved by metres along a map direction
        return 60 + offset_m[0] / GSD, 60 - offset_m[1] / GSD
    cases = {"side": [car(*at(-0.94 * across), heading_deg=heading),
                      car(*at(0.94 * across), heading_deg=heading)],
             "end": [car(*at(-2.24 * along), heading_deg=heading),
                     car(*at(2.24 * along), heading_deg=heading)],
             "van": [car(60, 60, length_m=6.0, width_m=2.4, heading_deg=heading)]}
    for name, cars in cases.items():
        mask = burn((120, 120), cars)
        assert ndimage.label(mask, np.ones((3, 3)))[1] == 1
        write_pred(tmp_path, name, mask)
        gdf = run(tmp_path, name)
        assert len(gdf) == len(cars), name
        for truth in cars:
            best = max(gdf.geometry, key=lambda g: g.intersection(truth).area)
            assert best.intersection(truth).area / best.union(truth).area > 0.75, name


def test_truncated_cars_marked_and_slivers_dropped(tmp_path):
    """Issue 13: cars cut by the valid-data edge are marked; slivers of them are dropped."""
    shape = (120, 160)
    whole = car(40, 60)  # 30 px long, 12.7 px wide: its left side is 5.05 m from the border
    big_cut = car(100, 5)  # a car sticking 2.25 - 0.75 = 1.5 m out of the top: mostly inside
    bottom_sliver = car(70, 125)  # only 1.5 m of its 4.5 m inside the bottom edge
    nodata_sliver = car(142, 70, heading_deg=90)  # mostly over the nodata band on the right
    mask = burn(shape, [whole, big_cut, bottom_sliver, nodata_sliver])
    prob = np.where(mask == 1, 240, 2).astype(np.uint8)
    mask[:, 140:] = 255
    prob[:, 140:] = 255
    write_pred(tmp_path, "s", mask, prob)

    gdf = run(tmp_path, "s", min_area_m2=0.5)
    assert len(gdf) == 2
    by_x = gdf.sort_values("area_m2", ascending=False).reset_index(drop=True)
    kept_whole = gdf[gdf.geometry.intersects(whole)].iloc[0]
    assert not kept_whole.truncated
    assert kept_whole.edge_dist_m == pytest.approx(5.05, abs=0.2)
    kept_cut = gdf[gdf.geometry.intersects(big_cut)].iloc[0]
    assert kept_cut.truncated and kept_cut.edge_dist_m == 0.0
    assert kept_cut.area_m2 >= 5.0
    assert set(by_x.truncated) == {True, False}

    every = run(tmp_path, "s", min_area_m2=0.5, min_truncated_area_m2=0.0)
    assert len(every) == 4
    slivers = every[every.geometry.intersects(bottom_sliver) | every.geometry.intersects(
        nodata_sliver)]
    assert len(slivers) == 2 and slivers.truncated.all()
    assert (slivers.area_m2 < 5.0).all()
    # The sliver at the nodata band touches valid data's edge inside the raster.
    assert slivers.geometry.bounds.maxx.max() == pytest.approx(ORIGIN[0] + 140 * GSD)


def test_edge_distance_against_ragged_nodata(tmp_path):
    """The footprint follows a stair-step nodata edge; distances are measured to it exactly."""
    shape = (200, 200)
    mask = burn(shape, [car(100, 100)])
    rows, cols = np.indices(shape)
    mask[cols + rows < 80] = 255  # a diagonal nodata corner, top-left
    write_pred(tmp_path, "s", mask)
    gdf = run(tmp_path, "s", window=64, halo=16)
    assert len(gdf) == 1
    geom = gdf.geometry.iloc[0]
    # Independent answer: the nearest nodata pixel (as a square) or the raster border.
    r, c = np.nonzero(mask == 255)
    nodata = shapely.union_all([box(ORIGIN[0] + cc * GSD, ORIGIN[1] - (rr + 1) * GSD,
                                    ORIGIN[0] + (cc + 1) * GSD, ORIGIN[1] - rr * GSD)
                                for rr, cc in zip(r, c, strict=True)])
    border = min(geom.bounds[0] - ORIGIN[0], ORIGIN[1] - geom.bounds[3],
                 ORIGIN[0] + 200 * GSD - geom.bounds[2], geom.bounds[1] - (ORIGIN[1] - 200 * GSD))
    expected = min(border, geom.distance(nodata))
    assert expected < border  # the stair-step edge is the nearest one here
    assert gdf.edge_dist_m.iloc[0] == pytest.approx(expected, abs=1e-6)
    assert not gdf.truncated.iloc[0]


def test_car_geopackage_carries_qgis_default_style(tmp_path):
    import sqlite3
    import xml.etree.ElementTree as ET

    write_pred(tmp_path, "s", burn((100, 100), [car(50, 50)]))
    path = vectorize_scene(tmp_path / "masks" / "s.tif", tmp_path, cfg=VectorConfig())
    assert len(read_vector(path)) == 1  # the style table does not hide the car layer
    assert pyogrio.list_layers(path)[0][0] == "cars"
    with sqlite3.connect(path) as con:
        rows = con.execute("SELECT f_table_name, f_geometry_column, useAsDefault, styleQML "
                           "FROM layer_styles").fetchall()
        registered = con.execute("SELECT data_type FROM gpkg_contents WHERE table_name = "
                                 "'layer_styles'").fetchone()
    assert registered == ("attributes",)
    [(table, geom_col, default, qml)] = rows
    assert (table, geom_col, default) == ("cars", "geom", 1)
    renderer = ET.fromstring(qml.split("\n", 1)[1]).find("renderer-v2")
    assert renderer.get("attr") == "mean_prob"
    assert len(renderer.find("ranges")) == 4


def test_scene_in_us_feet_gives_sizes_in_metres(tmp_path):
    # EPSG:2227 (US survey feet), 0.5 ft pixels: a 4.5 x 1.9 m car must come out in metres and
    # pass the metre-based area filters (in feet it would be 10.8 times too large).
    from affine import Affine
    from rasterio.crs import CRS

    ft = 0.30480060960121924
    transform = Affine(0.5, 0, 6_000_000, 0, -0.5, 2_000_000)
    x, y = transform * (60, 60)
    rect = box(x - 1.9 / 2 / ft, y - 4.5 / 2 / ft, x + 1.9 / 2 / ft, y + 4.5 / 2 / ft)
    mask = rasterio.features.rasterize([(rect, 1)], out_shape=(120, 120), transform=transform,
                                       dtype="uint8")
    feet = CRS.from_epsg(2227)
    prob = (mask * 230).astype(np.uint8)
    write_scene(tmp_path / "probability" / "f.tif", prob[None], transform=transform, crs=feet,
                nodata=255)
    write_scene(tmp_path / "masks" / "f.tif", mask[None], transform=transform, crs=feet,
                nodata=255)
    gdf = run(tmp_path, "f")
    assert len(gdf) == 1
    row = gdf.iloc[0]
    assert gdf.crs == feet
    assert row.area_m2 == pytest.approx(4.5 * 1.9, rel=0.1)
    assert row.length_m == pytest.approx(4.5, abs=0.3)
    assert row.width_m == pytest.approx(1.9, abs=0.3)
    # 60 px of 0.1524 m to the top and bottom edges, less half the car's 4.5 m: 6.9 m.
    assert row.edge_dist_m == pytest.approx(60 * 0.5 * ft - 4.5 / 2, abs=0.3)


def test_the_models_chosen_minimum_area_and_probability_apply_unless_set(tmp_path):
    # Predict records the model's post-processing (chosen on validation) in the mask's tags.
    small = car(40, 40, length_m=2.5, width_m=1.8)  # 4.5 m2
    faint = car(80, 80)  # a whole car, but its probability is low
    mask = burn((120, 120), [small, faint])
    prob = np.where(burn((120, 120), [faint]) == 1, 100, mask.astype(np.uint16) * 230)
    write_pred(tmp_path, "s", mask, prob.astype(np.uint8))
    assert len(run(tmp_path, "s")) == 2  # no choice recorded: 3 m2, no probability floor
    with rasterio.open(tmp_path / "masks" / "s.tif", "r+") as dst:
        dst.update_tags(min_area_m2="6", min_mean_prob="0.5")
    assert len(run(tmp_path, "s")) == 0  # 4.5 m2 < 6; mean probability 100/254 < 0.5
    assert len(run(tmp_path, "s", min_area_m2=4.0, min_mean_prob=0.0)) == 2  # the user's say


# === Splitting touching cars: real rasters of cars at several headings and GSDs ===

def _car_m(cx: float, cy: float, *, heading: float, length=4.5, width=1.8):
    """A car footprint in metres (x east, y north), long axis at ``heading`` from north."""
    rect = box(cx - width / 2, cy - length / 2, cx + width / 2, cy + length / 2)
    return affinity.rotate(rect, -heading, origin=(cx, cy))


def _blob_raster(cars, gsd: float, size_m: float = 30.0) -> np.ndarray:
    """Burn car footprints (metres, centred on 0) on a grid of ``gsd`` the way masks are burned."""
    n = int(round(size_m / gsd))
    transform = Affine(gsd, 0, -size_m / 2, 0, -gsd, size_m / 2)
    return rasterio.features.rasterize([(g, 1) for g in cars], out_shape=(n, n),
                                       transform=transform, fill=0, dtype="uint8").astype(bool)


def _count_cars(mask: np.ndarray, gsd: float, **kw) -> list[int]:
    """Cars per 8-connected blob after split_component, as vectorize splits them."""
    from pipeline.splitting import split_component

    cfg = VectorConfig(**kw).resolve()
    comps, n = ndimage.label(mask, structure=np.ones((3, 3)))
    counts = []
    for i, sl in enumerate(ndimage.find_objects(comps), start=1):
        comp = comps[sl] == i
        if comp.sum() * gsd * gsd < cfg.min_area_m2:
            continue
        counts.append(int(split_component(comp, gsd=gsd, cfg=cfg).max()))
    return counts


def _along_across(heading: float):
    rad = math.radians(heading)
    return (np.array([math.sin(rad), math.cos(rad)]), np.array([math.cos(rad), -math.sin(rad)]))


HEADINGS = [0, 30, 45, 90]
GSDS = [0.13, 0.15]


@pytest.mark.parametrize("gsd", GSDS)
@pytest.mark.parametrize("heading", [0, 17, 30, 45, 72, 90, 135])
@pytest.mark.parametrize("size", [(4.5, 1.8), (3.7, 1.65), (5.1, 2.0), (6.0, 2.4)])
def test_split_one_car_never_split(heading, gsd, size):
    mask = _blob_raster([_car_m(0, 0, heading=heading, length=size[0], width=size[1])], gsd)
    assert _count_cars(mask, gsd) == [1]


@pytest.mark.parametrize("gsd", GSDS)
@pytest.mark.parametrize("heading", HEADINGS)
@pytest.mark.parametrize("gap_px", [0, 1])
def test_split_two_cars_side_by_side(heading, gsd, gap_px):
    # Long sides touching (or one pixel apart): the 3.6 x 4.5 m blob is two cars, not three
    # 1.5 m strips.
    along, across = _along_across(heading)
    step = 1.8 + gap_px * gsd
    cars = [_car_m(*(-step / 2 * across), heading=heading),
            _car_m(*(step / 2 * across), heading=heading)]
    mask = _blob_raster(cars, gsd)
    assert sum(_count_cars(mask, gsd)) == 2


@pytest.mark.parametrize("gsd", GSDS)
@pytest.mark.parametrize("heading", HEADINGS)
def test_split_two_cars_nose_to_tail(heading, gsd):
    along, _ = _along_across(heading)
    cars = [_car_m(*(-2.25 * along), heading=heading), _car_m(*(2.25 * along), heading=heading)]
    mask = _blob_raster(cars, gsd)
    assert ndimage.label(mask, np.ones((3, 3)))[1] == 1
    assert _count_cars(mask, gsd) == [2]


@pytest.mark.parametrize("gsd", GSDS)
@pytest.mark.parametrize("heading", HEADINGS)
def test_split_row_of_five_touching(heading, gsd):
    # A parking row: five cars side by side in full contact, slightly different sizes.
    _, across = _along_across(heading)
    widths = [1.8, 1.75, 1.85, 1.8, 1.7]
    lengths = [4.5, 4.3, 4.7, 4.4, 4.2]
    offsets = np.cumsum([0] + [(a + b) / 2 for a, b in zip(widths[:-1], widths[1:], strict=True)])
    offsets -= offsets.mean()
    cars = [_car_m(*(o * across), heading=heading, length=ln, width=w)
            for o, ln, w in zip(offsets, lengths, widths, strict=True)]
    mask = _blob_raster(cars, gsd)
    assert ndimage.label(mask, np.ones((3, 3)))[1] == 1
    assert _count_cars(mask, gsd) == [5]


def _ragged(mask: np.ndarray, gsd: float, seed: int) -> np.ndarray:
    """A car mask as a network gives it: ragged edges, small holes, a waist at the windscreen."""
    rng = np.random.default_rng(seed)
    out = mask.copy()
    edge = out & ~ndimage.binary_erosion(out)
    out[edge & (rng.random(out.shape) < 0.35)] = False  # ragged rim
    out |= ndimage.binary_dilation(out) & (rng.random(out.shape) < 0.15)  # bumps
    inner = ndimage.binary_erosion(out, iterations=3)
    for r, c in np.argwhere(inner)[rng.choice(int(inner.sum()), 3, replace=False)]:
        out[r:r + 2, c:c + 2] = False  # holes (glints, a sunroof)
    return out


@pytest.mark.parametrize("gsd", GSDS)
@pytest.mark.parametrize("heading", HEADINGS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_irregular_single_car_stays_one(heading, gsd, seed):
    along, across = _along_across(heading)
    car_ = _car_m(0, 0, heading=heading)
    # The windscreen is dark: the network's mask narrows there from one side (a waist).
    notch = _car_m(*(0.6 * along + 0.55 * across), heading=heading, length=0.5, width=0.9)
    mask = _blob_raster([car_], gsd) & ~_blob_raster([notch], gsd)
    mask = _ragged(mask, gsd, seed)
    assert sum(_count_cars(mask, gsd)) == 1


@pytest.mark.parametrize("gsd", GSDS)
@pytest.mark.parametrize("heading", HEADINGS)
def test_split_pinched_car_is_not_cut_into_fragments(heading, gsd):
    # The network's mask of one car pinched to a neck at the windscreen from both sides: two
    # 2.2 m halves of ~4.2 m2 each are fragments of one car (issue 13: ~4.8 m2, 2.8 m long),
    # not two cars.
    along, across = _along_across(heading)
    car_ = _car_m(0, 0, heading=heading, length=5.0, width=1.9)
    notches = [_car_m(*(s * 0.75 * across), heading=heading, length=0.6, width=0.9)
               for s in (-1, 1)]
    mask = _blob_raster([car_], gsd) & ~_blob_raster(notches, gsd)
    assert ndimage.label(mask, np.ones((3, 3)))[1] == 1
    assert _count_cars(mask, gsd) == [1]


@pytest.mark.parametrize("gsd", GSDS)
@pytest.mark.parametrize("heading", [20, 30, 45, 60])
def test_split_box_of_one_rotated_car_stays_one(heading, gsd):
    # A model taught by box labels predicts a car's axis-aligned box: at 45 degrees that is a
    # 4.5 m square of 20 m2, larger than any car, yet one car, never two half-boxes.
    mask = _blob_raster([_car_m(0, 0, heading=heading).envelope], gsd)
    assert _count_cars(mask, gsd) == [1]


@pytest.mark.parametrize("gsd", GSDS)
def test_split_boxes_of_cars_side_by_side(gsd):
    # Boxes of two axis-aligned cars side by side (a parking row along the grid): still two.
    cars = [_car_m(-0.95, 0, heading=0, width=1.9), _car_m(0.95, 0, heading=0, width=1.9)]
    mask = _blob_raster([c.envelope for c in cars], gsd)
    assert _count_cars(mask, gsd) == [2]


def test_rectangles_from_a_box_trained_mask_keep_their_attributes(tmp_path):
    # vectors.regularize: each car as its minimum rotated rectangle (car-shaped where the mask
    # is), every attribute column kept and computed from the rectangle.
    truth = car(60, 60, heading_deg=30)
    mask = burn((120, 120), [truth])
    mask[58:62, 40:44] = 0  # a ragged bite out of the mask: the rectangle fills it
    prob = np.where(mask == 1, 200, 10).astype(np.uint8)
    write_pred(tmp_path, "s", mask, prob)
    plain, rect = run(tmp_path, "s"), run(tmp_path, "s", regularize=True)
    assert len(plain) == len(rect) == 1 and list(rect.columns) == [*COLUMNS, "geometry"]
    geom = rect.geometry.iloc[0]
    assert len(shapely.get_coordinates(geom)) == 5
    assert geom.area == pytest.approx(shapely.minimum_rotated_rectangle(
        plain.geometry.iloc[0]).area)
    assert rect.area_m2.iloc[0] == pytest.approx(geom.area)
    assert rect.area_m2.iloc[0] > plain.area_m2.iloc[0]
    assert rect.heading_deg.iloc[0] == pytest.approx(30, abs=3)
    for col in ("scene", "mean_prob", "max_prob", "truncated"):
        assert rect[col].iloc[0] == plain[col].iloc[0], col
    assert rect.edge_dist_m.iloc[0] == pytest.approx(plain.edge_dist_m.iloc[0], abs=0.5)


def test_truncated_minimum_from_the_model_unless_set(tmp_path):
    """Issue 22: the model's learnt minimum for cut cars (the mask's tag, written by predict)
    drops a 6.8 m2 cut car; without it the 5 m2 default keeps it; a user's setting wins."""
    import rasterio

    mask = burn((120, 160), [car(80, 9)])  # 3.6 m of a 4.5 m car inside the top edge
    path = write_pred(tmp_path, "s", mask)
    assert len(run(tmp_path, "s", min_area_m2=0.5)) == 1
    with rasterio.open(path, "r+") as dst:
        dst.update_tags(min_truncated_area_m2="8")
    assert len(run(tmp_path, "s", min_area_m2=0.5)) == 0
    assert len(run(tmp_path, "s", min_area_m2=0.5, min_truncated_area_m2=2.0)) == 1
