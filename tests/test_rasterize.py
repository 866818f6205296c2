"""Labels to masks: known-answer rasterization across CRSs, repairs, points, weights, bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from conftest import GSD, ORIGIN, TRANSFORM, UTM, write_scene
from rasterio import features
from shapely import affinity
from shapely.geometry import LineString, Point, Polygon, box

from pipeline.config import LabelConfig, TileConfig
from pipeline.errors import InputError
from pipeline.stages.rasterize import gap_weights, load_labels, rasterize_scene
from pipeline.stages.tile import build_index, tile_scene

X0, Y0 = ORIGIN


def _cars(rng, n: int, width_px: int, height_px: int) -> list[Polygon]:
    """Rotated car rectangles (about 4.5 x 1.9 m) scattered over a scene, some across chips."""
    cars = []
    for _ in range(n):
        cx = X0 + rng.uniform(3, width_px * GSD - 3)
        cy = Y0 - rng.uniform(3, height_px * GSD - 3)
        car = box(cx - 2.25, cy - 0.95, cx + 2.25, cy + 0.95)
        cars.append(affinity.rotate(car, rng.uniform(0, 180)))
    return cars


def _tiled(tmp_path: Path, rng, *, shape=(260, 300), nodata_cols: int = 30,
           cfg: TileConfig | None = None) -> tuple[Path, np.ndarray]:
    rows, cols = shape
    data = rng.integers(1, 255, (3, rows, cols), dtype=np.uint8)
    data[:, :, cols - nodata_cols:] = 0
    scene = write_scene(tmp_path / "images" / "s.tif", data, nodata=0)
    cfg = cfg or TileConfig(chip_size=64, overlap=16, min_valid_fraction=0.1)
    return tile_scene(scene, tmp_path / "chips", cfg=cfg), data


def _write(gdf: gpd.GeoDataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        gdf.to_parquet(path)
    else:
        gdf.to_file(path)
    return path


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


# === Known answers ===

def test_masks_equal_whole_scene_rasterization_cut_at_each_chip(tmp_path, rng):
    gpkg, data = _tiled(tmp_path, rng)
    cars = _cars(rng, 40, 300, 260)
    labels_file = _write(gpd.GeoDataFrame(geometry=cars, crs=UTM).to_crs(4326),
                         tmp_path / "labels" / "cars.geojson")
    labels = load_labels([labels_file], cfg=LabelConfig(weight_map=False))
    assert labels.crs == "EPSG:4326"
    out = rasterize_scene(gpkg, labels, tmp_path / "masks", cfg=LabelConfig(weight_map=False))
    # Independent answer: the labels on the whole scene grid, nodata as 255, pixels that two
    # labels claim as background (labels.overlaps).
    truth = features.rasterize(((g, 1) for g in labels.to_crs(UTM).geometry),
                               out_shape=data.shape[1:], transform=TRANSFORM, dtype="uint8",
                               merge_alg=features.MergeAlg.add)
    assert (truth >= 2).any()  # some random cars overlap
    truth = (truth == 1).astype(np.uint8)
    truth[(data == 0).all(axis=0)] = 255
    summary = json.loads(out.read_text())
    chips = gpd.read_file(gpkg)
    assert set(summary["chips"]) == set(chips.chip)
    assert sum(summary["chips"].values()) > 0
    for row in chips.itertuples():
        mask_path = out.parent / f"{row.chip}.tif"
        with rasterio.open(mask_path) as mask, rasterio.open(gpkg.parent / f"{row.chip}.tif") as c:
            assert mask.transform == c.transform and mask.crs == c.crs and mask.nodata == 255
            got = mask.read(1)
        want = truth[row.row_off:row.row_off + 64, row.col_off:row.col_off + 64]
        np.testing.assert_array_equal(got, want, err_msg=row.chip)
        assert summary["chips"][row.chip] == int((want == 1).sum())


def test_label_files_of_any_format_and_crs_merge(tmp_path, rng):
    gpkg, _ = _tiled(tmp_path, rng, nodata_cols=0)
    cars = _cars(rng, 9, 300, 260)
    files = [
        _write(gpd.GeoDataFrame(geometry=cars[:3], crs=UTM).to_crs(4326), tmp_path / "a.geojson"),
        _write(gpd.GeoDataFrame(geometry=cars[3:6], crs=UTM).to_crs(3857), tmp_path / "b.shp"),
        _write(gpd.GeoDataFrame(geometry=cars[6:], crs=UTM), tmp_path / "c.parquet"),
    ]
    labels = load_labels(files, cfg=LabelConfig())
    assert len(labels) == 9 and set(labels.source) == {"a.geojson", "b.shp", "c.parquet"}
    out = rasterize_scene(gpkg, labels, tmp_path / "masks", cfg=LabelConfig(weight_map=False))
    summary = json.loads(out.read_text())
    assert summary["labels"] == 9 and summary["labels_total"] == 9


def test_bowtie_repaired_lines_and_empties_dropped(tmp_path, rng, caplog):
    gpkg, _ = _tiled(tmp_path, rng, nodata_cols=0)
    x, y = X0 + 3, Y0 - 6
    bowtie = Polygon([(x, y), (x + 3, y + 3), (x + 3, y), (x, y + 3)])
    assert not bowtie.is_valid
    gdf = gpd.GeoDataFrame(geometry=[bowtie, LineString([(x, y), (x + 9, y)]), Polygon()],
                           crs=UTM)
    with caplog.at_level(logging.WARNING):
        labels = load_labels([_write(gdf, tmp_path / "l.gpkg")], cfg=LabelConfig())
    assert len(labels) == 1 and labels.repaired.tolist() == [True]
    assert labels.attrs == {"repaired": 1, "dropped": 2}
    assert "repaired 1" in caplog.text and "dropped 2" in caplog.text
    assert labels.geometry[0].area == pytest.approx(4.5)  # two triangles of 2.25 m2
    out = rasterize_scene(gpkg, labels, tmp_path / "masks", cfg=LabelConfig(weight_map=False))
    summary = json.loads(out.read_text())
    assert summary["repaired"] == 1 and summary["dropped"] == 2
    first = _read(out.parent / "s_r00000_c00000.tif")
    assert 150 <= (first == 1).sum() <= 250  # 4.5 m2 / 0.0225 m2 = 200 pixels


def test_points_become_axis_aligned_car_rectangles(tmp_path, rng):
    gpkg, _ = _tiled(tmp_path, rng, nodata_cols=0)
    # A pixel corner, so the footprint edges fall between pixel centres.
    point = Point(X0 + 150 * GSD, Y0 - 150 * GSD)
    labels = load_labels([_write(gpd.GeoDataFrame(geometry=[point], crs=UTM).to_crs(4326),
                                 tmp_path / "p.geojson")], cfg=LabelConfig())
    cfg = LabelConfig(weight_map=False, point_length_m=4.5, point_width_m=1.8)
    out = rasterize_scene(gpkg, labels, tmp_path / "masks", cfg=cfg)
    full = np.zeros((260, 300), np.uint8)
    for row in gpd.read_file(gpkg).itertuples():
        full[row.row_off:row.row_off + 64, row.col_off:row.col_off + 64] = \
            _read(out.parent / f"{row.chip}.tif")
    rr, cc = np.nonzero(full == 1)
    assert (rr.min(), rr.max() + 1, cc.min(), cc.max() + 1) == (144, 156, 135, 165)


def test_gap_weights_follow_unet_formula():
    size, sigma, w0 = 48, 3.0, 10.0
    cars = [box(X0 + 10 * GSD, Y0 - 30 * GSD, X0 + 20 * GSD, Y0 - 10 * GSD),
            box(X0 + 24 * GSD, Y0 - 30 * GSD, X0 + 34 * GSD, Y0 - 10 * GSD),
            box(X0 + 10 * GSD, Y0 - 40 * GSD, X0 + 34 * GSD, Y0 - 35 * GSD)]
    weight = gap_weights(np.array(cars), TRANSFORM, (size, size), margin=13, w0=w0,
                         sigma_px=sigma)
    # Brute force: distance from every pixel centre to each car's pixel centres.
    ids = features.rasterize(((g, i + 1) for i, g in enumerate(cars)), out_shape=(size, size),
                             transform=TRANSFORM, dtype="int32")
    rr, cc = np.mgrid[:size, :size]
    dists = []
    for k in (1, 2, 3):
        pr, pc = np.nonzero(ids == k)
        d = np.sqrt((rr[..., None] - pr) ** 2 + (cc[..., None] - pc) ** 2).min(axis=-1)
        dists.append(d)
    d = np.sort(np.stack(dists), axis=0)
    want = 1 + w0 * np.exp(-((d[0] + d[1]) ** 2) / (2 * sigma ** 2))
    background = ids == 0
    np.testing.assert_allclose(weight[background], want[background], atol=0.01)
    assert weight[20, 21] > 1 + 0.2 * w0  # the 4-pixel gap: d1 + d2 = 5
    assert weight[2, 45] == pytest.approx(1.0, abs=1e-3)  # far from every car


def test_weight_maps_written_zero_on_nodata_and_padding(tmp_path, rng):
    cfg_tile = TileConfig(chip_size=64, overlap=16)
    gpkg, _ = _tiled(tmp_path, rng, shape=(40, 50), nodata_cols=10, cfg=cfg_tile)
    cars = [box(X0 + 5 * GSD, Y0 - 20 * GSD, X0 + 15 * GSD, Y0 - 5 * GSD),
            box(X0 + 18 * GSD, Y0 - 20 * GSD, X0 + 28 * GSD, Y0 - 5 * GSD)]
    labels = load_labels([_write(gpd.GeoDataFrame(geometry=cars, crs=UTM), tmp_path / "c.gpkg")],
                         cfg=LabelConfig())
    out = rasterize_scene(gpkg, labels, tmp_path / "masks", cfg=LabelConfig(sigma_m=0.6))
    mask = _read(out.parent / "s_r00000_c00000.tif")
    with rasterio.open(out.parent / "s_r00000_c00000.weight.tif") as src:
        assert src.dtypes[0] == "float32" and src.transform == TRANSFORM
        weight = src.read(1)
    # Padding (beyond 40 x 50) and nodata columns (40..49) are ignored.
    assert (mask[40:] == 255).all() and (mask[:, 40:] == 255).all()
    assert (mask[:40, :40] != 255).all() and (mask == 1).sum() == 2 * 150
    assert (weight[mask == 255] == 0).all() and (weight[mask == 1] == 1).all()
    assert weight[12, 16] > 5  # the gap between the two cars


def test_all_touched_burns_more(tmp_path, rng):
    gpkg, _ = _tiled(tmp_path, rng, nodata_cols=0)
    labels = load_labels([_write(gpd.GeoDataFrame(geometry=_cars(rng, 10, 300, 260), crs=UTM),
                                 tmp_path / "c.gpkg")], cfg=LabelConfig())
    plain = rasterize_scene(gpkg, labels, tmp_path / "m1", cfg=LabelConfig(weight_map=False))
    touched = rasterize_scene(gpkg, labels, tmp_path / "m2",
                              cfg=LabelConfig(weight_map=False, all_touched=True))
    a = sum(json.loads(plain.read_text())["chips"].values())
    b = sum(json.loads(touched.read_text())["chips"].values())
    assert b > a * 1.1


# === Bad input ===

def test_empty_labels_file(tmp_path, caplog):
    empty = _write(gpd.GeoDataFrame(geometry=[], crs=UTM), tmp_path / "empty.gpkg")
    with pytest.raises(InputError, match=r"empty\.gpkg: labels file is empty"):
        load_labels([empty], cfg=LabelConfig())
    lines = _write(gpd.GeoDataFrame(geometry=[LineString([(X0, Y0), (X0 + 5, Y0)])], crs=UTM),
                   tmp_path / "lines.gpkg")
    with pytest.raises(InputError, match=r"lines\.gpkg: labels file has no polygon or point"):
        load_labels([lines], cfg=LabelConfig())
    good = _write(gpd.GeoDataFrame(geometry=[box(X0, Y0 - 2, X0 + 4, Y0)], crs=UTM),
                  tmp_path / "good.gpkg")
    with caplog.at_level(logging.WARNING):
        labels = load_labels([empty, good], cfg=LabelConfig())
    assert len(labels) == 1 and "empty.gpkg: no usable labels" in caplog.text


def test_labels_outside_every_scene_warn_in_index(tmp_path, rng, caplog):
    gpkg, _ = _tiled(tmp_path, rng, nodata_cols=0)
    far = [box(X0 + 5000, Y0, X0 + 5004, Y0 + 2), box(X0 + 10, Y0 - 10, X0 + 14, Y0 - 8)]
    labels = load_labels([_write(gpd.GeoDataFrame(geometry=far, crs=UTM).to_crs(4326),
                                 tmp_path / "far.geojson")], cfg=LabelConfig())
    out = rasterize_scene(gpkg, labels, tmp_path / "masks", cfg=LabelConfig(weight_map=False))
    summary = json.loads(out.read_text())
    assert summary["labels"] == 1 and summary["label_ids"] == [1]
    with caplog.at_level(logging.WARNING):
        build_index(tmp_path / "chips", tmp_path / "masks", cfg=TileConfig())
    assert "1 of 2 labels fall on no scene" in caplog.text
    index = gpd.read_file(tmp_path / "chips" / "index.gpkg")
    assert index.car_pixels.sum() == sum(summary["chips"].values()) > 0


def test_scene_with_zero_chips_gets_empty_masks(tmp_path):
    scene = write_scene(tmp_path / "nd.tif", np.zeros((3, 80, 80), np.uint8), nodata=0)
    gpkg = tile_scene(scene, tmp_path / "chips", cfg=TileConfig(chip_size=64, overlap=0))
    labels = load_labels([_write(gpd.GeoDataFrame(geometry=[box(X0, Y0 - 2, X0 + 4, Y0)],
                                                  crs=UTM), tmp_path / "c.gpkg")],
                         cfg=LabelConfig())
    out = rasterize_scene(gpkg, labels, tmp_path / "masks", cfg=LabelConfig())
    assert json.loads(out.read_text())["chips"] == {}
    assert [p.name for p in out.parent.iterdir()] == ["masks.json"]


# === Grids that are not north-up metres ===

def _whole_scene_truth(labels, crs, transform, shape) -> np.ndarray:
    return features.rasterize(((g, 1) for g in labels.to_crs(crs).geometry), out_shape=shape,
                              transform=transform, dtype="uint8")


def test_rotated_scene_masks_keep_every_car_pixel(tmp_path, rng):
    # A 30-degree rotated grid: chip footprints and label queries must use all four corners.
    from affine import Affine

    rows, cols = 256, 256
    transform = Affine.translation(X0, Y0) * Affine.rotation(30) * Affine.scale(GSD, -GSD)
    data = rng.integers(1, 255, (3, rows, cols), dtype=np.uint8)
    scene = write_scene(tmp_path / "images" / "rot.tif", data, transform=transform, nodata=None)
    gpkg = tile_scene(scene, tmp_path / "chips", cfg=TileConfig(chip_size=64, overlap=0))
    chips = gpd.read_file(gpkg)
    assert chips.geometry.area.sum() == pytest.approx((rows * GSD) * (cols * GSD), rel=1e-6)
    centres = [transform * (rng.uniform(10, cols - 10), rng.uniform(10, rows - 10))
               for _ in range(40)]
    cars = [affinity.rotate(box(x - 2.25, y - 0.95, x + 2.25, y + 0.95), rng.uniform(0, 180))
            for x, y in centres]
    labels_file = _write(gpd.GeoDataFrame(geometry=cars, crs=UTM).to_crs(4326),
                         tmp_path / "labels" / "cars.gpkg")
    # Overlapping random cars stay merged here: the question is only which pixels are reached.
    cfg = LabelConfig(weight_map=False, overlaps="car")
    labels = load_labels([labels_file], cfg=cfg)
    out = rasterize_scene(gpkg, labels, tmp_path / "masks", cfg=cfg)
    burned = sum(json.loads(out.read_text())["chips"].values())
    truth = _whole_scene_truth(labels, UTM, transform, (rows, cols))
    assert burned == int(truth.sum()) > 0


def test_scene_in_us_feet_uses_metre_settings_in_metres(tmp_path, rng):
    # EPSG:2227 (California zone 3, US survey feet): 0.5 ft pixels are 0.1524 m.
    from affine import Affine
    from rasterio.crs import CRS

    feet = CRS.from_epsg(2227)
    ft = 0.30480060960121924
    transform = Affine(0.5, 0, 6_000_000, 0, -0.5, 2_000_000)
    data = rng.integers(1, 255, (3, 128, 128), dtype=np.uint8)
    scene = write_scene(tmp_path / "images" / "ft.tif", data, transform=transform, crs=feet,
                        nodata=None)
    gpkg = tile_scene(scene, tmp_path / "chips", cfg=TileConfig(chip_size=128, overlap=0))
    assert gpd.read_file(gpkg).gsd.iloc[0] == pytest.approx(0.5 * ft)
    centre = transform * (64, 64)
    labels_file = _write(gpd.GeoDataFrame(geometry=[Point(centre)], crs=feet).to_crs(4326),
                         tmp_path / "labels" / "points.geojson")
    cfg = LabelConfig(weight_map=False, point_length_m=4.5, point_width_m=1.9)
    out = rasterize_scene(gpkg, load_labels([labels_file], cfg=cfg), tmp_path / "masks", cfg=cfg)
    burned = sum(json.loads(out.read_text())["chips"].values())
    # A 4.5 x 1.9 m car on 0.1524 m pixels: about 368 pixels (not 4.5 x 1.9 feet = 34).
    assert burned == pytest.approx(4.5 * 1.9 / (0.5 * ft) ** 2, rel=0.1)


# === Box labels ===

def test_label_boxes_are_envelopes_on_the_scene_grid(tmp_path):
    from pipeline.stages.rasterize import label_boxes

    car = affinity.rotate(box(X0 + 10, Y0 - 12.25, X0 + 11.9, Y0 - 7.75), -30)
    pt = Point(X0 + 30, Y0 - 30)
    cars = gpd.GeoDataFrame({"kind": ["car", "point"]}, geometry=[car, pt], crs=UTM)
    # Labels in degrees: the box is taken on the scene's UTM grid, not in EPSG:4326.
    boxes = label_boxes(cars.to_crs(4326), UTM)
    assert boxes.crs == UTM and list(boxes["kind"]) == ["car", "point"]
    got = boxes.geometry.iloc[0]
    assert got.equals_exact(car.envelope, tolerance=1e-3)
    assert got.area > 1.5 * car.area  # a box around a car at 30 degrees holds much more
    assert boxes.geometry.iloc[1].geom_type == "Point"
    with pytest.raises(InputError, match="no CRS"):
        label_boxes(gpd.GeoDataFrame(geometry=[car]), UTM)


def test_overlapping_boxes_stay_apart_and_their_overlap_is_ignored(tmp_path, rng):
    # Two boxes of cars parked close overlap by 3 px: burned as one blob they would teach
    # the model (and the validation truth) one merged car.
    gpkg, _ = _tiled(tmp_path, rng, shape=(64, 64), nodata_cols=0,
                     cfg=TileConfig(chip_size=64, overlap=16))
    cars = [box(X0 + 5 * GSD, Y0 - 40 * GSD, X0 + 20 * GSD, Y0 - 10 * GSD),
            box(X0 + 17 * GSD, Y0 - 40 * GSD, X0 + 32 * GSD, Y0 - 10 * GSD)]
    labels = load_labels([_write(gpd.GeoDataFrame(geometry=cars, crs=UTM), tmp_path / "c.gpkg")],
                         cfg=LabelConfig())
    from scipy import ndimage

    for overlaps, blobs in (("ignore", 2), ("background", 2), ("car", 1)):
        out = rasterize_scene(gpkg, labels, tmp_path / overlaps,
                              cfg=LabelConfig(overlaps=overlaps))
        mask = _read(out.parent / "s_r00000_c00000.tif")
        weight = _read(out.parent / "s_r00000_c00000.weight.tif")
        assert ndimage.label(mask == 1)[1] == blobs
        overlap = np.zeros_like(mask, bool)
        overlap[10:40, 17:20] = True
        if overlaps == "car":
            assert (mask[overlap] == 1).all() and (mask == 1).sum() == 30 * 27
        else:
            assert (mask[overlap] == 0).all()
            assert (mask == 1).sum() == 2 * 30 * 15 - 2 * 30 * 3
            # Ignored, or taught as the gap between two cars (the U-Net gap weight, > 1).
            assert (weight[overlap] == 0).all() if overlaps == "ignore" \
                else (weight[overlap] > 5).all()
