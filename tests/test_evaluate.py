"""Evaluation: optimal one-to-one matching, pixel metrics on the mask grid, nodata ignored."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio.features
from conftest import GSD, ORIGIN, TRANSFORM, UTM, write_scene
from shapely.geometry import box

from pipeline.config import EvaluateConfig, VectorConfig
from pipeline.errors import InputError
from pipeline.stages.evaluate import evaluate, match_objects
from pipeline.stages.vectorize import vectorize_scene


def test_hungarian_beats_greedy():
    # IoU(T1,P1)=0.9 is the best pair, but taking it leaves T2 with nothing; the optimal
    # assignment T1-P2 (0.54) and T2-P1 (0.55) matches both.
    t1, t2 = box(0, 0, 10, 1), box(4, 0, 12, 1)
    p1, p2 = box(1, 0, 10, 1), box(-3, 0, 7, 1)
    cfg = EvaluateConfig(iou_threshold=0.5)
    iou = {(t, p): ti.intersection(pi).area / ti.union(pi).area
           for t, ti in enumerate([t1, t2]) for p, pi in enumerate([p1, p2])}
    assert iou[(0, 0)] > 0.85 and iou[(1, 1)] < 0.5 and min(iou[(0, 1)], iou[(1, 0)]) > 0.5
    # Greedy by best IoU first (or by file order, T1 first): one match only.
    greedy, used_t, used_p = [], set(), set()
    for (t, p), v in sorted(iou.items(), key=lambda kv: -kv[1]):
        if v >= 0.5 and t not in used_t and p not in used_p:
            greedy.append((t, p))
            used_t.add(t)
            used_p.add(p)
    assert len(greedy) == 1
    matches, best = match_objects([t1, t2], [p1, p2], cfg=cfg)
    assert [(t, p) for t, p, _ in matches] == [(0, 1), (1, 0)]
    assert matches[0][2] == pytest.approx(iou[(0, 1)])
    assert best[0] == pytest.approx(iou[(0, 0)])


def test_centroid_matching():
    truth = [box(0, 0, 2, 4), box(10, 0, 12, 4)]
    pred = [box(0.5, 0.5, 2.5, 4.5), box(13, 0, 15, 4)]  # second is 3 m off
    matches, _ = match_objects(truth, pred, cfg=EvaluateConfig(match_by="centroid",
                                                               max_centroid_m=1.5))
    assert [(t, p) for t, p, _ in matches] == [(0, 0)]
    assert match_objects([], pred, cfg=EvaluateConfig())[0] == []


def car_px(row, col, h=30, w=13):
    x0, y0 = ORIGIN[0] + col * GSD, ORIGIN[1] - row * GSD
    return box(x0, y0 - h * GSD, x0 + w * GSD, y0)


@pytest.fixture
def predicted(tmp_path):
    """One 120x120 scene: predicted cars A (right), B (false positive); truth A, C (missed),
    E under nodata (ignored), F far away (other scene); truth stored in EPSG:4326."""
    out = tmp_path / "out"
    a, b, c, e = car_px(10, 10), car_px(60, 60), car_px(10, 60), car_px(80, 5)
    shape = (120, 120)
    mask = rasterio.features.rasterize([(a, 1), (b, 1)], out_shape=shape, transform=TRANSFORM,
                                       dtype="uint8")
    mask[70:, :40] = 255  # nodata corner holding E
    prob = np.where(mask == 255, 255, np.where(mask == 1, 200, 20)).astype(np.uint8)
    prob[rasterio.features.rasterize([(c, 1)], out_shape=shape, transform=TRANSFORM) == 1] = 100
    write_scene(out / "masks" / "s1.tif", mask[None], nodata=255)
    write_scene(out / "probability" / "s1.tif", prob[None], nodata=255)
    vectorize_scene(out / "masks" / "s1.tif", out, cfg=VectorConfig())
    far = box(ORIGIN[0] + 500, ORIGIN[1] - 500, ORIGIN[0] + 502, ORIGIN[1] - 496)
    truth = gpd.GeoDataFrame({"id": [1, 2, 3, 4]}, geometry=[a, c, e, far], crs=UTM)
    path = tmp_path / "truth.geojson"
    truth.to_crs(4326).to_file(path)
    return out, path, (a, b, c)


def test_evaluate_known_answer(predicted):
    out, truth, (a, b, c) = predicted
    metrics_path = evaluate(out, truth, cfg=EvaluateConfig())
    metrics = json.loads(metrics_path.read_text())
    scene = metrics["per_scene"]["s1"]
    assert scene["truth_cars"] == 2  # E lies over nodata, F in no scene
    assert scene["pred_cars"] == 2
    assert scene["count_error"] == 0
    obj = metrics["overall"]["object"]
    assert (obj["tp"], obj["fp"], obj["fn"]) == (1, 1, 1)
    assert obj["precision"] == obj["recall"] == obj["f1"] == pytest.approx(0.5)
    px = metrics["overall"]["pixel"]
    car = 30 * 13
    # A is right, B is all false positive, C all false negative (the 4326 round trip may
    # move an edge by a fraction of a pixel, hence the tolerance).
    assert px["tp"] == pytest.approx(car, abs=30)
    assert px["fp"] == pytest.approx(car, abs=30)
    assert px["fn"] == pytest.approx(car, abs=30)
    assert px["iou"] == pytest.approx(1 / 3, abs=0.03)

    with open(out / "evaluation" / "thresholds.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["threshold"]) for r in rows] == pytest.approx(
        [0.05 * i for i in range(1, 20)])
    by_t = {round(float(r["threshold"]), 2): r for r in rows}
    # prob 20/254 = 0.08 on background, 100/254 = 0.39 on C, 200/254 = 0.79 on A and B.
    assert float(by_t[0.3]["recall"]) == pytest.approx(1.0, abs=0.05)
    assert float(by_t[0.5]["recall"]) == pytest.approx(0.5, abs=0.05)
    assert float(by_t[0.5]["precision"]) == pytest.approx(0.5, abs=0.05)
    assert float(by_t[0.85]["recall"]) == 0.0

    with open(out / "evaluation" / "objects.csv") as fh:
        objects = list(csv.DictReader(fh))
    assert sorted((o["kind"], o["matched"]) for o in objects) == [
        ("pred", "False"), ("pred", "True"), ("truth", "False"), ("truth", "True")]
    assert (out / "evaluation" / "per_scene.csv").exists()
    sizes = metrics["overall"]["recall_by_size"]
    assert sum(s["truth_cars"] for s in sizes) == 2


def test_evaluate_bad_truth(predicted, tmp_path):
    out, _, _ = predicted
    bad = tmp_path / "bad.gpkg"
    bad.write_text("not a geopackage")
    with pytest.raises(InputError, match="bad.gpkg"):
        evaluate(out, bad, cfg=EvaluateConfig())
    assert not (out / "evaluation").exists()


def test_strips_do_not_change_metrics(predicted, monkeypatch):
    out, truth, _ = predicted
    whole = json.loads(evaluate(out, truth, cfg=EvaluateConfig()).read_text())
    monkeypatch.setattr("pipeline.stages.evaluate.STRIP_ROWS", 17)  # strips cut through every car
    strips = json.loads(evaluate(out, truth, cfg=EvaluateConfig()).read_text())
    assert strips["overall"] == whole["overall"]
    assert (out / "evaluation" / "thresholds.csv").read_text().count("\n") == 20


def _scene_with_cars(out: Path, name: str, cars: list, *, col_off: int = 0,
                     nodata_cols: int = 0) -> None:
    from affine import Affine

    transform = Affine(GSD, 0, ORIGIN[0] + col_off * GSD, 0, -GSD, ORIGIN[1])
    shape = (120, 120)
    mask = rasterio.features.rasterize([(g, 1) for g in cars], out_shape=shape,
                                       transform=transform, dtype="uint8") if cars else \
        np.zeros(shape, np.uint8)
    if nodata_cols:
        mask[:, -nodata_cols:] = 255
    write_scene(out / "masks" / f"{name}.tif", mask[None], transform=transform, nodata=255)
    write_scene(out / "probability" / f"{name}.tif",
                np.where(mask == 1, 200, np.where(mask == 255, 255, 10)).astype(np.uint8)[None],
                transform=transform, nodata=255)
    vectorize_scene(out / "masks" / f"{name}.tif", out, cfg=VectorConfig(min_area_m2=0.5))


def test_car_in_two_overlapping_scenes_counts_once(tmp_path):
    # Scenes s1 (cols 0..120) and s2 (cols 60..180) overlap; car A lies in the overlap and is
    # found in both; car G is only in s2.
    out = tmp_path / "out"
    a, g = car_px(20, 80), car_px(60, 150)
    _scene_with_cars(out, "s1", [a])
    _scene_with_cars(out, "s2", [a, g], col_off=60)
    truth = tmp_path / "truth.gpkg"
    gpd.GeoDataFrame(geometry=[a, g], crs=UTM).to_file(truth)
    metrics = json.loads(evaluate(out, truth, cfg=EvaluateConfig()).read_text())
    overall = metrics["overall"]
    assert overall["count"]["truth_cars"] == 2  # not 3
    assert (overall["object"]["tp"], overall["object"]["fp"], overall["object"]["fn"]) == (2, 0, 0)


def test_truth_car_mostly_outside_valid_data_is_ignored_not_fn_plus_fp(tmp_path):
    # Car H reaches 4 px into the valid area (of 13 px width): the prediction sees that sliver.
    out = tmp_path / "out"
    h = car_px(20, 96)  # cols 96..109 with nodata from col 100: 4 of 13 columns visible
    _scene_with_cars(out, "s1", [h], nodata_cols=20)
    truth = tmp_path / "truth.gpkg"
    gpd.GeoDataFrame(geometry=[h], crs=UTM).to_file(truth)
    metrics = json.loads(evaluate(out, truth, cfg=EvaluateConfig()).read_text())
    obj = metrics["overall"]["object"]
    assert (obj["tp"], obj["fp"], obj["fn"]) == (0, 0, 0)
    assert metrics["per_scene"]["s1"]["ignored_truth_cars"] == 1


def test_box_labels_get_iou_03_envelope_and_centroid_scores(predicted):
    out, truth, _ = predicted
    metrics = json.loads(evaluate(out, truth, cfg=EvaluateConfig()).read_text())
    variants = metrics["overall"]["object_variants"]
    assert set(variants) == {"iou_0.3", "iou_0.5", "envelope_iou_0.5", "centroid"}
    assert variants["iou_0.5"]["tp"] == metrics["overall"]["object"]["tp"] == 1


def test_scene_without_valid_pixels_is_left_out_not_a_perfect_scene(tmp_path):
    # s2 is all nodata: nothing was looked at there, so it is neither 0-for-0 nor a scene.
    out = tmp_path / "out"
    a = car_px(20, 80)
    _scene_with_cars(out, "s1", [a])
    _scene_with_cars(out, "s2", [], col_off=200, nodata_cols=120)
    truth = tmp_path / "truth.gpkg"
    gpd.GeoDataFrame(geometry=[a], crs=UTM).to_file(truth)
    metrics = json.loads(evaluate(out, truth, cfg=EvaluateConfig()).read_text())
    assert set(metrics["per_scene"]) == {"s1"}
    assert metrics["overall"]["scenes"] == 1
    assert metrics["overall"]["empty_scenes"] == ["s2"]
    with open(out / "evaluation" / "per_scene.csv") as fh:
        assert [r["scene"] for r in csv.DictReader(fh)] == ["s1"]


def test_only_empty_scenes_is_one_clear_error(tmp_path):
    out = tmp_path / "out"
    _scene_with_cars(out, "s2", [], nodata_cols=120)
    truth = tmp_path / "truth.gpkg"
    gpd.GeoDataFrame(geometry=[car_px(20, 80)], crs=UTM).to_file(truth)
    with pytest.raises(InputError, match="no predicted scene has a valid pixel"):
        evaluate(out, truth, cfg=EvaluateConfig())
    assert not (out / "evaluation").exists()
