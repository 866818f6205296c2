"""Where to label next (issue 22): ranked squares of chip size in the batch and training scenes."""

from __future__ import annotations

import json
import subprocess
import sys

import geopandas as gpd
import pytest
import rasterio
from conftest import ROOT, copy_run, make
from shapely.geometry import box

from pipeline.cli import main

pytestmark = pytest.mark.slow

COLUMNS = ("rank", "scene", "reason", "score", "set", "uncertain", "flip", "false_cars",
           "missed_cars")


def _check_layer(target, top_n: int = 20) -> gpd.GeoDataFrame:
    gdf = gpd.read_file(target, layer="label_next")
    assert 0 < len(gdf) <= top_n
    assert all(c in gdf.columns for c in COLUMNS)
    assert list(gdf["rank"]) == list(range(1, len(gdf) + 1))
    assert list(gdf["score"]) == sorted(gdf["score"], reverse=True)
    chip_m = 64 * 0.15  # the tiny run's chip size at the sample's GSD
    for row in gdf.itertuples():
        minx, miny, maxx, maxy = row.geometry.bounds
        assert (maxx - minx, maxy - miny) == pytest.approx((chip_m, chip_m))
        assert row.geometry.area == pytest.approx(chip_m * chip_m)
        with rasterio.open(row.image) as src:
            assert gdf.crs == src.crs
            assert box(*src.bounds).buffer(1e-6).contains(row.geometry)
    return gdf


def test_make_all_writes_ranked_squares(tiny_run):
    root, _env, proc = tiny_run
    out = root / "data" / "processed"
    target = out / "suggest" / "label_next.gpkg"
    assert target.exists() and target.with_suffix(".qml").exists()
    gdf = _check_layer(target)
    assert set(gdf["set"]) <= {"batch", "training"}
    assert set(gdf["scene"]) <= ({p.stem for p in (root / "data" / "incoming").glob("*.tif")}
                                 | {p.stem for p in (root / "data" / "raw" / "images").glob(
                                     "*.tif")})
    # The training scenes were predicted into scratch, never into the batch's outputs.
    incoming = {p.stem for p in (root / "data" / "incoming").glob("*.tif")}
    assert {p.stem for p in (out / "probability").glob("*.tif")} == incoming
    assert not list((out / "suggest").glob(".carseg-tmp/*"))
    manifest = json.loads((out / ".carseg.suggest.json").read_text())
    assert "suggest/label_next.gpkg" in json.dumps(manifest)
    # The truncated-car minimum is the model's, recorded with the other post-processing.
    meta = json.loads((root / "model" / "metadata.json").read_text())
    assert "min_truncated_area_m2" in meta["postprocess"]
    assert "table" in meta["postprocess"]["truncated"]
    assert "suggest" in proc.stdout


def test_rerun_is_up_to_date_by_make_and_by_hand(tiny_run, tmp_path):
    root = tmp_path / "run"
    env = copy_run(tiny_run[0], root)
    data, out = root / "data", root / "data" / "processed"
    target = out / "suggest" / "label_next.gpkg"
    before = target.stat().st_mtime_ns

    proc = make("suggest", env_vars=env)
    assert f"{target} is up to date" in proc.stderr
    hand = [sys.executable, "-m", "pipeline", "suggest", "--images", str(data / "incoming"),
            "--out", str(out), "--model-dir", env["MODEL_DIR"], "--data", str(data),
            "--config", env["CONFIG"]]
    run = subprocess.run(hand, capture_output=True, text=True, cwd=ROOT, check=False)
    assert run.returncode == 0, run.stderr
    assert "is up to date" in run.stderr
    assert target.stat().st_mtime_ns == before

    # Another setting redoes it; fewer squares come out.
    assert main(["suggest", "--images", str(data / "incoming"), "--out", str(out),
                 "--model-dir", env["MODEL_DIR"], "--data", str(data), "--config",
                 env["CONFIG"], "--set", "suggest.top_n=3", "--set", "suggest.flip=false"]) == 0
    assert len(_check_layer(target, top_n=3)) == 3

    make("clean", env_vars=env)
    assert not target.exists() and not target.with_suffix(".qml").exists()
