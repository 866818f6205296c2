"""The sample generator: file layout and formats, labels that sit on the drawn cars, hard cases
(edge-cut, tree-hidden and shadowed cars, vehicles that are not cars, sparse scenes), other GSDs,
determinism, and the refusal to overwrite a user's data."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
from affine import Affine
from rasterio import features
from rasterio.crs import CRS
from rasterio.windows import Window
from scipy import ndimage
from shapely.geometry import Polygon, box

from pipeline.config import SampleConfig
from pipeline.errors import InputError
from pipeline.stages.sample import (
    CAR_COLOURS,
    generate,
    make_sample,
    plot_scene_with_labels,
    render_scene,
    scene_specs,
)
from pipeline.stages.sample.objects import VEHICLES, Car
from pipeline.stages.sample.plan import MAX_UNDER_TREE
from pipeline.stages.sample.writer import sparse_scenes

# Small scenes (48 x 39 m) keep the suite fast; still several parking rows each.
CFG = SampleConfig(seed=7, train_scenes=3, incoming_scenes=2, width=320, height=260)
CHIP_SIZES = (64, 128, 256, 512)


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("sample")
    make_sample(data, cfg=CFG)
    return data


@pytest.fixture(scope="module")
def renders():
    return generate(CFG)


def _labels(data: Path) -> gpd.GeoDataFrame:
    """All training labels plus truth, in the scenes' CRS."""
    parts = [gpd.read_file(p).to_crs(CFG.epsg) for p in sorted((data / "raw/labels").iterdir())]
    parts.append(gpd.read_file(data / "truth/cars.gpkg"))
    return pd.concat(parts, ignore_index=True)


def _scene_path(data: Path, name: str) -> Path:
    return data / ("raw/images" if name.startswith("train") else "incoming") / f"{name}.tif"


def test_layout_and_geotiff_format(sample_dir):
    manifest = json.loads((sample_dir / "sample-manifest.json").read_text())
    assert manifest["settings"]["seed"] == CFG.seed
    for rel in manifest["files"]:
        assert (sample_dir / rel).is_file(), rel
    scenes = sorted((sample_dir / "raw/images").glob("*.tif"))
    incoming = sorted((sample_dir / "incoming").glob("*.tif"))
    assert [p.name for p in scenes] == ["train_01.tif", "train_02.tif", "train_03.tif"]
    assert [p.name for p in incoming] == ["scene_01.tif", "scene_02.tif"]
    collars, odd = 0, 0
    for path in scenes + incoming:
        with rasterio.open(path) as src:
            assert (src.count, src.dtypes[0], src.nodata) == (3, "uint8", 0)
            assert src.crs.to_epsg() == CFG.epsg and src.crs.is_projected
            assert src.res == pytest.approx((CFG.gsd, CFG.gsd))
            assert src.profile["tiled"] and src.compression.name.lower() == "deflate"
            assert "TIFFTAG_DATETIME" not in src.tags()
            data = src.read()
        invalid = np.all(data == 0, axis=0)
        # Valid pixels never look like nodata: no band of a valid pixel is 0.
        assert data[:, ~invalid].min() >= 1
        collars += invalid.mean() > 0.02
        odd += all(src.width % c and src.height % c for c in CHIP_SIZES)
    assert collars >= 1 and odd >= 1

    labels = [gpd.read_file(p) for p in sorted((sample_dir / "raw/labels").iterdir())]
    assert {p.suffix for p in (sample_dir / "raw/labels").iterdir()} == {".geojson", ".gpkg"}
    assert all(g.crs.to_epsg() == 4326 for g in labels)
    assert set(pd.concat(labels)["scene"]) == {"train_01", "train_02", "train_03"}
    truth = gpd.read_file(sample_dir / "truth/cars.gpkg")
    assert truth.crs.to_epsg() == CFG.epsg
    assert set(truth["scene"]) == {"scene_01", "scene_02"}
    assert (truth.geom_type == "Polygon").all()


def test_labels_match_the_drawn_cars_to_the_pixel(sample_dir, renders):
    """Rasterized written labels (back from EPSG:4326) equal the car pixels the renderer drew."""
    labels = _labels(sample_dir)
    for name, scene in renders.items():
        own = labels[labels["scene"] == name]
        assert len(own) == len(scene.cars) >= (1 if scene.sparse else 10)
        with rasterio.open(_scene_path(sample_dir, name)) as src:
            ids = features.rasterize(zip(own.geometry, own["car_id"], strict=True),
                                     out_shape=src.shape, transform=src.transform, fill=0,
                                     dtype="int32")
        ids[~scene.valid] = 0  # cars cut by the nodata collar are drawn only where it is valid
        burned = ids > 0
        drawn = scene.car_mask
        iou = (burned & drawn).sum() / (burned | drawn).sum()
        # Only the rounded corners of the bodies differ from the label rectangles.
        assert iou > 0.93, (name, iou)
        # Every car: its label pixels are (almost all) drawn car pixels.
        per_car = ndimage.mean(drawn, ids, index=own["car_id"].to_numpy())
        assert per_car.min() > 0.85, (name, per_car.min())
        # Centroids of whole cars agree to a fraction of a pixel (no half-pixel or axis error).
        whole = own["in_scene"].to_numpy() == 1
        lab_c = np.array(ndimage.center_of_mass(burned, ids, own["car_id"].to_numpy()[whole]))
        drw_c = np.array([(c.cy - 0.5, c.cx - 0.5) for c, w in zip(scene.cars, whole,
                                                                   strict=True) if w])
        assert np.abs(lab_c - drw_c).max() < 0.5


def test_pixels_under_labels_differ_from_surroundings(sample_dir):
    labels = _labels(sample_dir)
    distinct, total = 0, 0
    for name in labels["scene"].unique():
        own = labels[labels["scene"] == name]
        with rasterio.open(_scene_path(sample_dir, name)) as src:
            img = src.read().astype(np.float32)
            ids = features.rasterize(zip(own.geometry, own["car_id"], strict=True),
                                     out_shape=src.shape, transform=src.transform, dtype="int32")
        grey = img.mean(axis=0)
        cars = ids > 0
        # A ring 2-6 px (0.3-0.9 m) around each car, excluding other cars.
        grown = ndimage.grey_dilation(ids, size=13)
        near = ndimage.grey_dilation(ids, size=5)
        ring = np.where((grown > 0) & (near == 0) & ~cars, grown, 0)
        index = own["car_id"].to_numpy()
        in_mean = np.stack([ndimage.mean(img[b], ids, index) for b in range(3)], 1)
        out_mean = np.stack([ndimage.mean(img[b], ring, index) for b in range(3)], 1)
        in_std = ndimage.standard_deviation(grey, ids, index)
        out_std = ndimage.standard_deviation(grey, ring, index)
        ok = (np.linalg.norm(in_mean - out_mean, axis=1) > 12) | (in_std > 1.3 * out_std)
        distinct += int(np.nansum(ok))
        total += len(index)
    assert distinct / total > 0.9, distinct / total


def test_cars_have_real_sizes_colours_and_touching_neighbours(sample_dir):
    labels = _labels(sample_dir)
    assert labels["length_m"].between(3.8, 5.2).all()
    assert labels["width_m"].between(1.6, 2.0).all()
    # The footprint is the car's rectangle: its area is length x width.
    area = labels.geometry.area
    assert np.allclose(area, labels["length_m"] * labels["width_m"], rtol=1e-3)
    shares = labels["colour"].value_counts(normalize=True)
    plain = ["white", "black", "grey", "silver", "anthracite", "darkgrey"]
    assert shares.reindex(plain).sum() > 0.6
    assert set(shares.index) - set(plain), "no coloured cars"
    assert set(shares.index) <= {c[0] for c in CAR_COLOURS}
    headings = labels["heading_deg"] % 180
    assert (np.histogram(headings, bins=6, range=(0, 180))[0] > 0).sum() >= 4, "one heading"
    # Touching or nearly touching pairs (0-0.4 m apart) but no overlapping cars.
    touching = 0
    for _, own in labels.groupby("scene"):
        geoms = own.geometry.to_numpy()
        tree = own.sindex
        left, right = tree.query(geoms, predicate="dwithin", distance=0.4)
        pairs = left < right
        for i, j in zip(left[pairs], right[pairs], strict=True):
            assert geoms[i].intersection(geoms[j]).area < 1e-6
            touching += 1
    assert touching >= 10, touching
    assert (labels["under_tree"] > 0.2).sum() >= 1, "no car under a tree"


def test_hard_cases_are_present(sample_dir, renders):
    """Car-like objects that are not cars, and dark cars on dark asphalt."""
    kinds = {box.kind for scene in renders.values() for box in scene.boxes}
    assert {"container", "dumpster"} <= kinds and len(kinds) >= 3, kinds
    labels = _labels(sample_dir)
    dark_on_dark = 0
    for name in labels["scene"].unique():
        own = labels[(labels["scene"] == name) & labels["colour"].isin(["black", "anthracite"])]
        with rasterio.open(_scene_path(sample_dir, name)) as src:
            grey = src.read().astype(np.float32).mean(axis=0)
            shape, transform = src.shape, src.transform
        for geom in own.geometry:
            ring = features.rasterize([geom.buffer(1.0).difference(geom.buffer(0.3))],
                                      out_shape=shape, transform=transform).astype(bool)
            dark_on_dark += bool(ring.any() and np.median(grey[ring]) < 75)
    assert dark_on_dark >= 1


def _poly(obj, gsd: float) -> Polygon:
    return Polygon(Car(obj.cx, obj.cy, obj.length_m, obj.width_m, obj.heading).corners(gsd))


def test_vans_lorries_and_buses_are_drawn_but_never_labelled(renders):
    vehicles = [(scene, b) for scene in renders.values() for b in scene.boxes
                if b.kind in VEHICLES]
    assert len({b.kind for _, b in vehicles}) >= 2, "no long vehicles"
    for scene, veh in vehicles:
        assert 5.9 <= veh.length_m <= 12 and veh.width_m >= 2.0
        # No car label on a distractor, and the distractor was drawn (its pixels changed).
        mine = _poly(veh, scene.gsd)
        assert all(mine.intersection(_poly(c, scene.gsd)).area < 1e-6 for c in scene.cars)
        r, c = int(veh.cy), int(veh.cx)
        assert not scene.car_mask[max(r - 2, 0):r + 3, max(c - 2, 0):c + 3].any()


def test_edge_cut_tree_hidden_and_shadowed_cars_are_labelled_in_full(sample_dir, renders):
    """Labels keep each car's whole outline (as people draw it and as evaluation expects) where
    the scene's edge, its nodata collar or a tree crown hides part of it."""
    labels = _labels(sample_dir)
    full = np.isclose(labels.geometry.area, labels["length_m"] * labels["width_m"], rtol=1e-3)
    assert full.all()
    cut = labels[labels["in_scene"] < 0.9]
    assert len(cut) >= 2, "no car cut by a scene's edge"
    outside = 0
    for name, scene in renders.items():
        t = scene.transform
        rows, cols = scene.valid.shape
        frame = box(t.c, t.f + rows * t.e, t.c + cols * t.a, t.f)
        own = labels[labels["scene"] == name]
        outside += int((~own.geometry.within(frame)).sum())
    assert outside >= 1, "no label reaches past a scene's edge"
    # Partly hidden under trees, never mostly: a labeller still sees the car.
    assert (labels["under_tree"] > 0.1).sum() >= 2
    assert labels["under_tree"].max() <= MAX_UNDER_TREE + 1e-6
    # Building (or tree) shadows fall across some cars.
    assert (labels["in_shadow"] > 0.3).sum() >= 2


def test_sparse_scenes_have_one_to_three_percent_cars():
    assert sparse_scenes(CFG) == {"train_03", "scene_02"}
    assert sparse_scenes(SampleConfig()) == {"train_04", "scene_02"}
    assert sparse_scenes(CFG.model_copy(update={"sparse": False})) == set()
    for seed in (0, 1):
        scene = render_scene(np.random.default_rng(seed), 480, 480, gsd=0.15,
                             transform=Affine(0.15, 0, 500000, 0, -0.15, 4000000),
                             crs=CRS.from_epsg(32633), sparse=True)
        assert 0.01 <= scene.car_fraction() <= 0.03, (seed, scene.car_fraction())


@pytest.mark.parametrize("gsd", [0.10, 0.30])
def test_other_gsds_keep_cars_in_metres(gsd):
    px = int(round(54 / gsd))  # the same 54 m of ground
    scene = render_scene(np.random.default_rng(2), px, px, gsd=gsd,
                         transform=Affine(gsd, 0, 500000, 0, -gsd, 4000000),
                         crs=CRS.from_epsg(32633))
    assert len(scene.cars) > 10
    whole = [c for c in scene.cars if c.in_scene == 1]
    expected = sum(c.length_m * c.width_m for c in whole) / gsd**2
    own = np.zeros(scene.car_mask.shape, np.int32)
    for k, c in enumerate(scene.cars, 1):
        own[features.rasterize([_poly(c, gsd)], out_shape=own.shape).astype(bool)] = k
    in_whole = sum(int((scene.car_mask & (own == k)).sum())
                   for k, c in enumerate(scene.cars, 1) if c.in_scene == 1)
    assert in_whole == pytest.approx(expected, rel=0.12), (in_whole, expected)


def test_no_single_threshold_segments_the_cars(sample_dir):
    """The best global threshold on any band or on brightness, either direction, has IoU < 0.5."""
    labels = _labels(sample_dir)
    car_hist = np.zeros((4, 256))
    bg_hist = np.zeros((4, 256))
    for name in labels["scene"].unique():
        own = labels[labels["scene"] == name]
        with rasterio.open(_scene_path(sample_dir, name)) as src:
            img = src.read()
            mask = features.rasterize(own.geometry, out_shape=src.shape,
                                      transform=src.transform).astype(bool)
        valid = ~np.all(img == 0, axis=0)
        planes = [*img, np.rint(img.astype(np.float32).mean(axis=0)).astype(np.uint8)]
        for k, plane in enumerate(planes):
            car_hist[k] += np.bincount(plane[mask & valid], minlength=256)
            bg_hist[k] += np.bincount(plane[~mask & valid], minlength=256)
    best = 0.0
    for k in range(4):
        cars_total = car_hist[k].sum()
        for tp, fp in ((np.cumsum(car_hist[k][::-1])[::-1], np.cumsum(bg_hist[k][::-1])[::-1]),
                       (np.cumsum(car_hist[k]), np.cumsum(bg_hist[k]))):
            iou = tp / (cars_total + fp)  # TP / (TP + FP + FN)
            best = max(best, float(iou.max()))
    assert 0.05 < best < 0.5, best


def test_same_seed_same_bytes_other_seed_other_scenes(tmp_path):
    cfg = SampleConfig(seed=3, train_scenes=2, incoming_scenes=1, width=160, height=128)
    a = json.loads(make_sample(tmp_path / "a", cfg=cfg).read_text())
    b = json.loads(make_sample(tmp_path / "b", cfg=cfg).read_text())
    assert a == b  # sha256 of every raster, GeoJSON and GeoPackage
    assert (tmp_path / "a/truth/cars.gpkg").read_bytes() == \
        (tmp_path / "b/truth/cars.gpkg").read_bytes()
    c = json.loads(make_sample(tmp_path / "c", cfg=cfg.model_copy(update={"seed": 4})).read_text())
    for rel, entry in a["files"].items():
        if rel.endswith(".tif"):
            assert c["files"][rel]["sha256"] != entry["sha256"], rel
    # A second run over an identical sample is fine and changes nothing.
    make_sample(tmp_path / "a", cfg=cfg)
    assert json.loads((tmp_path / "a/sample-manifest.json").read_text()) == a


def test_never_overwrites_changed_files_without_force(tmp_path):
    cfg = SampleConfig(seed=5, train_scenes=1, incoming_scenes=1, width=96, height=80)
    make_sample(tmp_path, cfg=cfg)
    scene = tmp_path / "raw/images/train_01.tif"
    scene.write_bytes(b"my own data")
    with pytest.raises(InputError, match="train_01.tif"):
        make_sample(tmp_path, cfg=cfg)
    assert scene.read_bytes() == b"my own data"
    assert not list(tmp_path.glob(".sample-staging*")), "staging left behind"
    make_sample(tmp_path, cfg=cfg, force=True)
    with rasterio.open(scene) as src:
        assert src.count == 3


def test_the_package_parts_import_on_their_own():
    """A newcomer reads the sample part by part: each module imports by itself."""
    import importlib

    import pipeline.stages.sample as pkg

    for part in ("objects", "shapes", "plan", "render", "labels", "writer", "plot"):
        importlib.import_module(f"pipeline.stages.sample.{part}")
    for name in pkg.__all__:
        assert getattr(pkg, name) is not None, name
    assert pkg.GENERATOR_VERSION >= 2


def test_scene_sizes_follow_the_config():
    specs = scene_specs(SampleConfig(width=1000, height=1000, train_scenes=2, incoming_scenes=2))
    sizes = {name: (w, h) for _, name, w, h, _ in specs}
    assert sizes["train_01"] == (1000, 1000)
    w, h = sizes["train_02"]
    assert all(w % c and h % c for c in CHIP_SIZES)
    assert sum(collar for *_, collar in specs) >= 2


def test_plot_scene_with_labels(sample_dir, tmp_path):
    scene = sample_dir / "raw/images/train_01.tif"
    png = plot_scene_with_labels(scene, sorted((sample_dir / "raw/labels").iterdir()),
                                 tmp_path / "a.png", window=Window(20, 10, 200, 150))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    truth = gpd.read_file(sample_dir / "truth/cars.gpkg")
    png2 = plot_scene_with_labels(sample_dir / "incoming/scene_01.tif", truth, tmp_path / "b.png")
    assert png2.stat().st_size > 10_000
