"""Where to label next (issue 22): ranked squares of chip size in the batch and training scenes."""

from __future__ import annotations

import json
import subprocess
import sys

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from conftest import ROOT, copy_run, make
from shapely.geometry import box

from pipeline.cli import main

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


def _known_batch(tmp_path):
    """A 128 x 128 probability raster: one 64 px square near the threshold, one unsure at its
    edge, the rest sure; a metadata-only bundle (no flip check, no training scenes)."""
    import numpy as np
    from conftest import write_scene

    stored = np.full((1, 128, 128), 3, np.uint8)  # p ~ 0.01: sure, no car
    stored[0, 64:, 64:] = 127  # p = 0.5: the model cannot decide
    stored[0, :64, :8] = 140  # p ~ 0.55 on 1/8 of the top-left square
    stored[0, :64, 64:] = 250  # sure cars
    prob = write_scene(tmp_path / "out" / "probability" / "b.tif", stored, nodata=255)
    image = write_scene(tmp_path / "images" / "b.tif", np.full((3, 128, 128), 90, np.uint8))
    return image, prob, _metadata_bundle(tmp_path)


def _metadata_bundle(tmp_path):
    """A bundle of metadata only: 64 px chips at 0.15 m, threshold 0.5 (no flip check)."""
    import hashlib

    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    weights = b"stand-in weights: suggest reads only the metadata here"
    (model / "model.keras").write_bytes(weights)
    (model / "metadata.json").write_text(json.dumps({
        "bands": [1, 2, 3], "normalization": {"mean": [0, 0, 0], "std": [1, 1, 1]},
        "chip_size": 64, "threshold": 0.5, "dtype": "uint8", "gsd": 0.15,
        "model_sha256": hashlib.sha256(weights).hexdigest()}))  # a bundle names its weights
    return model


def _batch_scene(tmp_path, name, stored):
    """A batch scene and its probability raster (uint8, p = value / 254, 255 nodata)."""
    from conftest import write_scene

    _, rows, cols = stored.shape
    prob = write_scene(tmp_path / "out" / "probability" / f"{name}.tif", stored, nodata=255)
    image = write_scene(tmp_path / "images" / f"{name}.tif", np.full((3, rows, cols), 90,
                                                                       np.uint8))
    return image, prob


def _suggest(tmp_path, batch, *sets):
    from pipeline.config import load_config
    from pipeline.stages.suggest import Sources, build_suggestions

    model = _metadata_bundle(tmp_path)
    cfg = load_config(None, ["suggest.flip=false", *sets])
    target = tmp_path / "out" / "suggest" / "label_next.gpkg"
    build_suggestions(target, Sources(batch=tuple(batch)), model_dir=model, cfg=cfg)
    return gpd.read_file(target, layer="label_next")


def test_picks_spread_over_both_clusters_of_uncertainty(tmp_path):
    """One unsure patch across four squares (its neighbours are unsure too) and a weaker one
    far away: the two squares to label are one of each cluster, not two neighbours."""
    stored = np.full((1, 256, 256), 3, np.uint8)  # p ~ 0.01: sure background
    stored[0, 32:96, 32:96] = 127  # p = 0.5 over the corners of squares (0,0)..(64,64)
    stored[0, 0:32, 0:64] = 127  # more of it in (0,0): that square first
    stored[0, 192:256, 192:200] = 127  # an eighth of square (192,192), far away
    image, prob = _batch_scene(tmp_path, "b", stored)
    gdf = _suggest(tmp_path, [(image, prob)], "suggest.top_n=2")
    assert [(r.col_off, r.row_off) for r in gdf.itertuples()] == [(0, 0), (192, 192)]
    assert list(gdf["uncertain"]) == pytest.approx([0.75, 0.125])
    # With a third square to give, the best neighbour comes in (ranks stay by score).
    three = _suggest(tmp_path, [(image, prob)], "suggest.top_n=3")
    assert [(r.col_off, r.row_off) for r in three.itertuples()] == [(0, 0), (64, 0),
                                                                    (192, 192)]
    # Spreading off (spacing 0, no cap) ranks by score alone: two neighbours.
    plain = _suggest(tmp_path, [(image, prob)], "suggest.top_n=2", "suggest.spacing=0",
                     "suggest.per_scene=0")
    assert [(r.col_off, r.row_off) for r in plain.itertuples()] == [(0, 0), (64, 0)]


def test_picks_never_overlap_and_cover_the_scenes(tmp_path):
    """Two scenes, the first unsure everywhere: no scene gives more than its share while the
    other has squares, and no two picks of a scene overlap or touch."""
    everywhere = np.full((1, 256, 256), 127, np.uint8)
    weak = np.full((1, 256, 256), 3, np.uint8)
    weak[0, 64:128, 64:96] = 127  # half a square of (64,64)
    weak[0, 192:256, 0:16] = 127  # a quarter of (0,192)
    batch = [_batch_scene(tmp_path, "a", everywhere), _batch_scene(tmp_path, "w", weak)]
    gdf = _suggest(tmp_path, batch, "suggest.top_n=4")
    assert list(gdf["scene"]).count("w") == 2  # per_scene 0.5 of 4 leaves w its two
    assert set(zip(gdf.scene, gdf.col_off, gdf.row_off, strict=True)) >= {("w", 64, 64), ("w", 0, 192)}
    for scene, picks in gdf.groupby("scene"):
        geoms = list(picks.geometry)
        for i, a in enumerate(geoms):
            for b in geoms[i + 1:]:
                assert not a.buffer(-1e-6).intersects(b), scene  # not even an edge shared
                assert a.distance(b) > 0, scene


def test_known_answer_ranking(tmp_path):
    from pipeline.config import load_config
    from pipeline.stages.suggest import Sources, build_suggestions

    image, prob, model = _known_batch(tmp_path)
    cfg = load_config(None, ["suggest.flip=false", "suggest.top_n=3"])
    target = tmp_path / "out" / "suggest" / "label_next.gpkg"
    build_suggestions(target, Sources(batch=((image, prob),)), model_dir=model, cfg=cfg)
    gdf = gpd.read_file(target, layer="label_next")
    assert list(gdf["rank"]) == [1, 2, 3]
    first, second = gdf.iloc[0], gdf.iloc[1]
    assert (first.col_off, first.row_off, first.uncertain) == (64, 64, 1.0)
    assert first.reason == "probability near the threshold"
    assert (second.col_off, second.row_off) == (0, 0)
    assert second.uncertain == pytest.approx(1 / 8)
    assert gdf.iloc[2].score == 0.0
    assert target.with_suffix(".qml").read_text().startswith("<!DOCTYPE qgis")


def test_training_share_keeps_the_batch_in(tmp_path):
    from pipeline.stages.suggest import _pick, _Square

    def square(kind, score, i):
        return _Square(kind, tmp_path, kind, (i, 0, 64, 64), None, None, 1.0,
                       {"uncertain": score, "flip": 0.0, "false_cars": 0.0, "missed_cars": 0.0})

    squares = ([square("training", 0.9, i) for i in range(10)]
               + [square("batch", 0.1, i) for i in range(10)])
    picked = _pick(squares, 10, 0.5)
    assert [sq.kind for sq in picked] == ["training"] * 5 + ["batch"] * 5
    assert [sq.kind for sq in _pick(squares[:12], 10, 0.5)] == ["training"] * 8 + ["batch"] * 2
    assert [sq.kind for sq in _pick(squares, 4, 0.0)] == ["batch"] * 4


@pytest.mark.slow
def test_make_all_writes_ranked_squares(tiny_run):
    root, _env, proc = tiny_run
    out = root / "data" / "processed"
    target = out / "suggest" / "label_next.gpkg"
    assert target.exists() and target.with_suffix(".qml").exists()
    gdf = _check_layer(target)
    assert set(gdf["set"]) == {"batch", "training"}  # half each (suggest.training_share)
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
    chosen = meta["postprocess"]["min_truncated_area_m2"]
    with rasterio.open(sorted((out / "masks").glob("*.tif"))[0]) as src:
        tag = src.tags().get("min_truncated_area_m2")
    assert tag == (None if chosen is None else f"{chosen:g}")  # what vectors will use
    assert "suggest" in proc.stdout


@pytest.mark.slow
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
