"""Inputs exactly (issue 21): the layer of a vector file with several, zones repaired and
checked against the imagery, truth that holds no car where the scenes are.

Real GeoPackages written with geopandas, real GeoTIFFs, the real CLI and Makefile.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import test_batch
from conftest import GSD, ORIGIN, UTM, write_scene
from shapely.geometry import Polygon, box
from test_evaluate import _scene_with_cars, car_px
from test_hostile import cli, make

from pipeline.cli import main
from pipeline.config import Config, EvaluateConfig
from pipeline.errors import InputError, VectorInputError
from pipeline.io import read_vector, split_layer
from pipeline.stages.batch import build_batch, read_zones
from pipeline.stages.evaluate import evaluate

flight = test_batch.flight  # the fixture: two overlapping vectorized scenes, batch built once

X0, Y0 = ORIGIN
CAR = box(X0 + 3, Y0 - 6, X0 + 5, Y0 - 3)  # 2 m x 3 m: about 13 x 20 px at 0.15 m
AOI = box(X0, Y0 - 19.2, X0 + 19.2, Y0)  # the whole 128 px scene


def two_layers(path: Path, first: str = "aoi", second: str = "cars") -> Path:
    """A GeoPackage as QGIS users keep them: an area of interest written before the cars."""
    path.parent.mkdir(parents=True, exist_ok=True)
    gpd.GeoDataFrame({"name": ["site"]}, geometry=[AOI], crs=UTM).to_file(path, layer=first)
    gpd.GeoDataFrame({"kind": ["car"]}, geometry=[CAR], crs=UTM).to_file(path, layer=second)
    return path


# === Which layer ===

def test_split_layer_only_splits_a_layer_name_off_an_existing_file(tmp_path):
    gpkg = two_layers(tmp_path / "site.gpkg")
    assert split_layer(f"{gpkg}:cars") == (gpkg, "cars")
    assert split_layer(gpkg) == (gpkg, None)
    odd = tmp_path / "a:b.gpkg"  # a file so named is the file, not a:layer
    odd.write_bytes(gpkg.read_bytes())
    assert split_layer(odd) == (odd, None)
    assert split_layer(r"C:\data\cars.gpkg") == (Path(r"C:\data\cars.gpkg"), None)
    assert split_layer(f"{gpkg}:sub/dir") == (Path(f"{gpkg}:sub/dir"), None)  # a path
    assert split_layer(tmp_path / "none.gpkg:cars")[1] is None  # no such file


def test_several_layers_take_the_roles_layer_never_the_first(tmp_path):
    gpkg = two_layers(tmp_path / "site.gpkg")
    cars = read_vector(gpkg, role="labels")
    assert list(cars["kind"]) == ["car"]
    assert read_vector(gpkg, role="truth").geometry.iloc[0].equals(CAR)
    assert list(read_vector(f"{gpkg}:aoi")["name"]) == ["site"]
    with pytest.raises(VectorInputError) as err:
        read_vector(gpkg, role="zones")  # neither layer is named zones
    assert str(gpkg) in str(err.value) and "aoi, cars" in str(err.value)
    assert len(str(err.value).splitlines()) == 1
    with pytest.raises(VectorInputError, match=r"no layer 'parking' \(layers: aoi, cars\)"):
        read_vector(f"{gpkg}:parking")
    one = tmp_path / "one.gpkg"
    gpd.GeoDataFrame(geometry=[CAR], crs=UTM).to_file(one, layer="whatever")
    assert len(read_vector(one, role="zones")) == 1  # one layer: that one, whatever its name


def _labelled_project(root: Path, labels: Path) -> Path:
    rng = np.random.default_rng(5)
    write_scene(root / "raw" / "images" / "s0.tif",
                rng.integers(1, 255, (3, 128, 128), dtype=np.uint8))
    (root / "raw" / "labels").mkdir(parents=True, exist_ok=True)
    return labels


def _burned(masks: Path) -> int:
    return sum(json.loads((masks / "s0" / "masks.json").read_text())["chips"].values())


SMALL = ["--set", "tile.chip_size=64", "--set", "tile.overlap=8", "--workers", "1"]


def test_masks_by_hand_burn_the_cars_layer_not_the_aoi(tmp_path):
    images, chips, masks = tmp_path / "raw" / "images", tmp_path / "chips", tmp_path / "masks"
    gpkg = _labelled_project(tmp_path, two_layers(tmp_path / "site.gpkg"))
    assert main(["tile", str(images), str(chips), *SMALL]) == 0
    assert main(["masks", str(chips), str(gpkg), str(masks), "--images", str(images),
                 *SMALL]) == 0
    burned = _burned(masks)
    assert 0 < burned < 600  # one car (~260 px in each chip holding it), not the 16384 px AOI
    # The AOI named as the layer is taken as asked.
    assert main(["masks", str(chips), f"{gpkg}:aoi", str(tmp_path / "m2"), "--images",
                 str(images), *SMALL]) == 0
    assert _burned(tmp_path / "m2") > 10000


def test_make_masks_refuses_labels_with_layers_it_cannot_choose(tmp_path):
    data = tmp_path / "d"
    _labelled_project(data, two_layers(data / "raw" / "labels" / "site.gpkg", second="parked"))
    r = make("masks", f"DATA={data}", "RUN=t", f"MODEL_DIR={tmp_path / 'm'}", "WORKERS=1",
             "SET=tile.chip_size=64 tile.overlap=8")
    assert r.returncode == 2, r.stdout + r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "site.gpkg: 2 layers (aoi, parked)" in errors[0], r.stderr
    assert not list((data / "interim" / "masks").glob("*/masks.json"))


def test_make_masks_takes_the_cars_layer(tmp_path):
    data = tmp_path / "d"
    _labelled_project(data, two_layers(data / "raw" / "labels" / "site.gpkg"))
    r = make("masks", f"DATA={data}", "RUN=t", f"MODEL_DIR={tmp_path / 'm'}", "WORKERS=1",
             "SET=tile.chip_size=64 tile.overlap=8")
    assert r.returncode == 0, r.stdout + r.stderr
    assert 0 < _burned(data / "interim" / "masks") < 600


def _predicted_with_truth(tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "out"
    a = car_px(20, 80)
    _scene_with_cars(out, "s1", [a])
    truth = tmp_path / "truth.gpkg"
    gpd.GeoDataFrame({"name": ["site"]}, geometry=[box(*a.buffer(50).bounds)],
                     crs=UTM).to_file(truth, layer="aoi")
    gpd.GeoDataFrame(geometry=[a], crs=UTM).to_file(truth, layer="cars")
    return out, truth


def test_truth_layer_by_hand_and_the_guard_sees_the_file(tmp_path):
    out, truth = _predicted_with_truth(tmp_path)
    r = cli("evaluate", "--out", str(out), "--truth", f"{truth}:cars")
    assert r.returncode == 0, r.stderr
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert metrics["overall"]["object"]["tp"] == 1 and metrics["overall"]["object"]["fp"] == 0
    # Without a layer, the truth role takes `cars` too (not the AOI, which would be one
    # missed car and a false alarm).
    assert main(["evaluate", "--out", str(out), "--truth", str(truth), "--force"]) == 0
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert metrics["overall"]["object"]["fn"] == 0
    # The guard compares the file part: truth inside OUT/evaluation is refused with a layer too.
    inside = out / "evaluation" / "t.gpkg"
    shutil.copy(truth, inside)
    r = cli("evaluate", "--out", str(out), "--truth", f"{inside}:cars")
    assert r.returncode == 2 and "would write into or over TRUTH" in r.stderr, r.stderr


# === Zones ===

BOWTIE = [(0, 0), (60, 48), (60, 0), (0, 48), (0, 0)]  # metres from the flight's corner


def _zones_file(tmp_path: Path, rings: list[list[tuple[float, float]]], *, dx: float = 0.0
                ) -> Path:
    path = tmp_path / "zones.gpkg"
    polys = [Polygon([(X0 + dx + x, Y0 - y) for x, y in ring]) for ring in rings]
    gpd.GeoDataFrame({"name": [f"z{i}" for i in range(len(polys))]}, geometry=polys,
                     crs=UTM).to_file(path, layer="zones")
    return path


def _copy_out(flight, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(flight["root"] / "out", out)
    return out


def test_a_bow_tie_zone_is_repaired_and_counted(flight, tmp_path, caplog):
    zones = _zones_file(tmp_path, [BOWTIE])
    out = _copy_out(flight, tmp_path)
    with caplog.at_level(logging.WARNING):
        build_batch(flight["root"] / "images", out, model_dir=flight["root"] / "model",
                    cfg=Config(), zones=zones)
    assert "repaired 1 invalid zone" in caplog.text
    table = read_vector(out / "batch" / "zones.gpkg")
    assert table.geometry.iloc[0].is_valid
    assert table.covered_ha.iloc[0] == pytest.approx(60 * 48 / 2 / 1e4, rel=0.02)
    assert table.cars.iloc[0] > 0


def test_a_zone_with_no_area_is_one_line_naming_the_file(tmp_path):
    zones = _zones_file(tmp_path, [[(0, 0), (10, 10), (20, 20), (0, 0)],
                                   [(0, 0), (10, 0), (10, 10), (0, 0)]])
    with pytest.raises(InputError) as err:
        read_zones(zones)
    assert str(err.value).startswith(f"{zones}: zone 1 ")
    assert len(str(err.value).splitlines()) == 1


def test_zones_100_km_off_the_imagery_warn_naming_the_file(flight, tmp_path, caplog):
    zones = _zones_file(tmp_path, [[(0, 0), (60, 0), (60, 48), (0, 48), (0, 0)]], dx=100_000)
    out = _copy_out(flight, tmp_path)
    with caplog.at_level(logging.WARNING):
        build_batch(flight["root"] / "images", out, model_dir=flight["root"] / "model",
                    cfg=Config(), zones=zones)
    lines = [r.getMessage() for r in caplog.records if "imagery" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(f"{zones}: none of the zones meets")


# === Truth ===

def test_empty_truth_warns_and_evaluate_fails_in_one_line(tmp_path, caplog):
    out = tmp_path / "out"
    _scene_with_cars(out, "s1", [car_px(20, 80)])
    truth = tmp_path / "truth.gpkg"
    gpd.GeoDataFrame(geometry=[], crs=UTM).to_file(truth)
    with caplog.at_level(logging.WARNING), pytest.raises(InputError) as err:
        evaluate(out, truth, cfg=EvaluateConfig())
    assert "holds no car" in caplog.text
    assert str(err.value).startswith(f"{truth}: no truth car lies in the footprint")
    assert not (out / "evaluation").exists()


def test_truth_elsewhere_fails_by_hand_in_one_line(tmp_path):
    out = tmp_path / "out"
    _scene_with_cars(out, "s1", [car_px(20, 80)])
    truth = tmp_path / "truth.gpkg"
    far = box(X0 + 100_000, Y0, X0 + 100_002, Y0 + 4)  # 100 km off
    gpd.GeoDataFrame(geometry=[far], crs=UTM).to_file(truth)
    r = cli("evaluate", "--out", str(out), "--truth", str(truth))
    assert r.returncode == 2, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: {truth}: no truth car lies in the footprint of the 1 scenes "
                      "evaluated; check its CRS and extent"], r.stderr
    assert "s1: no truth car" in r.stderr  # the scene's warning


def test_a_scene_removed_from_images_is_not_evaluated(tmp_path):
    out, images = tmp_path / "out", tmp_path / "images"
    a, b = car_px(20, 80), car_px(60, 150)
    _scene_with_cars(out, "s1", [a])
    _scene_with_cars(out, "s2", [b], col_off=60)
    for name in ("s1",):  # s2 was in an earlier batch; IMAGES now holds s1 only
        write_scene(images / f"{name}.tif", np.full((3, 120, 120), 9, np.uint8))
    truth = tmp_path / "truth.gpkg"
    gpd.GeoDataFrame(geometry=[a, b], crs=UTM).to_file(truth)
    assert main(["evaluate", "--out", str(out), "--truth", str(truth), "--images",
                 str(images)]) == 0
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert set(metrics["per_scene"]) == {"s1"}
    assert metrics["overall"]["count"]["truth_cars"] == 1


assert GSD == 0.15  # CAR and AOI are sized for the conftest grid
