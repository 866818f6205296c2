"""Tiling known answers: chip pixels, coverage, nodata, odd inputs, GSD, split and statistics."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from affine import Affine
from conftest import GSD, TRANSFORM, UTM, write_scene
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.crs import CRS
from rasterio.windows import Window

from pipeline.config import TileConfig
from pipeline.errors import InputError
from pipeline.geo import grid_windows, pixel_size
from pipeline.stages.tile import build_index, tile_scene


def _chips(gpkg: Path) -> gpd.GeoDataFrame:
    return gpd.read_file(gpkg, engine="pyogrio")


def _fake_masks(chips_dir: Path, masks_dir: Path) -> None:
    """masks.json as rasterize writes it (zero cars), so build_index can be tested alone."""
    for gpkg in chips_dir.glob("*/chips.gpkg"):
        chips = _chips(gpkg)
        out = masks_dir / gpkg.parent.name
        out.mkdir(parents=True, exist_ok=True)
        (out / "masks.json").write_text(json.dumps(
            {"chips": {c: 0 for c in chips["chip"]}, "labels": 0, "repaired": 0, "dropped": 0}))


# === Window arithmetic ===

@settings(max_examples=120, deadline=None)
@given(width=st.integers(1, 1500), height=st.integers(1, 1500), size=st.integers(16, 512),
       overlap=st.integers(0, 511))
def test_grid_windows_cover_every_pixel(width, height, size, overlap):
    overlap = overlap % size
    windows = grid_windows(width, height, size, overlap)
    for length, offs in ((width, {w.col_off for w in windows}),
                         (height, {w.row_off for w in windows})):
        offs = sorted(offs)
        covered_to = 0
        for off in offs:
            # No gap before a window, and windows stay in the grid unless it is smaller.
            assert off <= covered_to
            assert off >= 0 and (off + size <= length or (length <= size and off == 0))
            covered_to = max(covered_to, off + size)
        assert covered_to >= length
    # Row-major, a full grid of windows.
    assert len(windows) == len({w.col_off for w in windows}) * len({w.row_off for w in windows})


# === Pixels ===

def test_chip_pixels_equal_source_window(tmp_path, rng):
    data = rng.integers(1, 255, (3, 150, 200), dtype=np.uint8)
    scene = write_scene(tmp_path / "s.tif", data, nodata=None)
    gpkg = tile_scene(scene, tmp_path / "chips", cfg=TileConfig(chip_size=64, overlap=16))
    chips = _chips(gpkg)
    assert gpkg.name == "chips.gpkg" and chips.crs == UTM
    assert len(chips) == len(grid_windows(200, 150, 64, 16)) == 4 * 3
    for row in chips.itertuples():
        with rasterio.open(gpkg.parent / f"{row.chip}.tif") as chip:
            win = Window(row.col_off, row.row_off, 64, 64)
            np.testing.assert_array_equal(
                chip.read(), data[:, row.row_off:row.row_off + 64, row.col_off:row.col_off + 64])
            assert chip.transform == rasterio.windows.transform(win, TRANSFORM)
            assert chip.crs == UTM and chip.dtypes[0] == "uint8"
            assert chip.profile["compress"] == "zstd" and chip.block_shapes[0] == (64, 64)
            assert chip.dataset_mask().min() == 255
            assert chip.bounds == tuple(row.geometry.bounds[i] for i in (0, 1, 2, 3))
        assert row.chip == f"s_r{row.row_off:05d}_c{row.col_off:05d}"
        assert row.valid_fraction == 1.0 and row.gsd == pytest.approx(GSD)


def test_awkward_size_every_valid_pixel_in_a_chip(tmp_path, rng):
    data = rng.integers(1, 255, (3, 777, 1001), dtype=np.uint8)
    data[:, :40, :300] = 0  # a nodata corner
    scene = write_scene(tmp_path / "odd.tif", data, nodata=0)
    gpkg = tile_scene(scene, tmp_path / "chips", cfg=TileConfig(chip_size=256, overlap=32))
    covered = np.zeros((777, 1001), dtype=bool)
    for row in _chips(gpkg).itertuples():
        assert row.row_off + 256 <= 777 and row.col_off + 256 <= 1001
        covered[row.row_off:row.row_off + 256, row.col_off:row.col_off + 256] = True
    valid = (data != 0).any(axis=0)
    assert covered[valid].all()
    with rasterio.open(gpkg.parent / "odd_r00000_c00000.tif") as chip:
        # Nodata pixels of a kept chip are marked invalid in the chip's mask.
        mask = chip.dataset_mask()
        assert (mask[:40, :256] == 0).all() and (mask[40:] == 255).all()


def test_four_band_uint16_band_order(tmp_path, rng):
    data = rng.integers(1, 4000, (4, 100, 90), dtype=np.uint16)
    scene = write_scene(tmp_path / "u16.tif", data, nodata=0)
    cfg = TileConfig(chip_size=64, overlap=0, bands=[4, 2, 1])
    gpkg = tile_scene(scene, tmp_path / "chips", cfg=cfg)
    row = _chips(gpkg).iloc[-1]
    with rasterio.open(gpkg.parent / f"{row.chip}.tif") as chip:
        assert chip.count == 3 and chip.dtypes[0] == "uint16"
        np.testing.assert_array_equal(
            chip.read(), data[[3, 1, 0], row.row_off:row.row_off + 64,
                              row.col_off:row.col_off + 64])
    with pytest.raises(InputError, match=r"u16\.tif: has 4 bands"):
        tile_scene(scene, tmp_path / "chips2", cfg=TileConfig(bands=[1, 2, 5]))
    assert not (tmp_path / "chips2" / "u16").exists()


def test_scene_smaller_than_chip_is_one_padded_chip(tmp_path, rng):
    data = rng.integers(1, 255, (3, 40, 50), dtype=np.uint8)
    scene = write_scene(tmp_path / "tiny.tif", data, nodata=None)
    gpkg = tile_scene(scene, tmp_path / "chips", cfg=TileConfig(chip_size=64, overlap=16))
    chips = _chips(gpkg)
    assert len(chips) == 1
    with rasterio.open(gpkg.parent / f"{chips.chip[0]}.tif") as chip:
        assert chip.shape == (64, 64)
        np.testing.assert_array_equal(chip.read()[:, :40, :50], data)
        mask = chip.dataset_mask()
        assert (mask[:40, :50] == 255).all()
        assert (mask[40:] == 0).all() and (mask[:, 50:] == 0).all()
    assert chips.valid_fraction[0] == pytest.approx(40 * 50 / 64 ** 2)


def test_min_valid_fraction_skips_mostly_nodata_chips(tmp_path, rng):
    data = rng.integers(1, 255, (3, 128, 128), dtype=np.uint8)
    data[:, :, 64:] = 0
    data[:, 64:, 40:64] = 0  # bottom-left chip is 62% valid
    scene = write_scene(tmp_path / "nd.tif", data, nodata=0)
    chips = _chips(tile_scene(scene, tmp_path / "chips",
                              cfg=TileConfig(chip_size=64, overlap=0, min_valid_fraction=0.7)))
    assert sorted(chips.chip) == ["nd_r00000_c00000"]
    chips = _chips(tile_scene(scene, tmp_path / "chips",
                              cfg=TileConfig(chip_size=64, overlap=0, min_valid_fraction=0.5)))
    assert sorted(chips.chip) == ["nd_r00000_c00000", "nd_r00064_c00000"]
    assert sorted(chips.valid_fraction) == [pytest.approx(40 / 64), 1.0]


def test_all_nodata_scene_gives_empty_chips_and_index_refuses(tmp_path):
    scene = write_scene(tmp_path / "empty.tif", np.zeros((3, 100, 100), np.uint8), nodata=0)
    gpkg = tile_scene(scene, tmp_path / "chips", cfg=TileConfig(chip_size=64, overlap=0))
    chips = _chips(gpkg)
    assert len(chips) == 0 and "valid_fraction" in chips.columns
    assert list(gpkg.parent.iterdir()) == [gpkg]
    with pytest.raises(InputError, match="no chips"):
        build_index(tmp_path / "chips", tmp_path / "masks", cfg=TileConfig())
    assert not (tmp_path / "chips" / "index.gpkg").exists()


# === Bad input ===

def test_not_a_geotiff(tmp_path):
    bad = tmp_path / "notes.tif"
    bad.write_text("this is not an image\n")
    with pytest.raises(InputError, match=r"notes\.tif: not a readable GeoTIFF"):
        tile_scene(bad, tmp_path / "chips", cfg=TileConfig())
    assert not (tmp_path / "chips" / "notes").exists()


def test_truncated_geotiff_fails_cleanly(tmp_path, rng):
    data = rng.integers(0, 255, (3, 256, 256), dtype=np.uint8)
    scene = write_scene(tmp_path / "cut.tif", data, nodata=None)
    blob = scene.read_bytes()
    scene.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InputError, match=r"cut\.tif: "):
        tile_scene(scene, tmp_path / "chips", cfg=TileConfig(chip_size=64, overlap=0))
    assert not any((tmp_path / "chips").glob("*"))


def test_no_crs_and_no_transform(tmp_path, rng):
    data = rng.integers(1, 255, (3, 32, 32), dtype=np.uint8)
    no_crs = write_scene(tmp_path / "nocrs.tif", data, crs=None)
    with pytest.raises(InputError, match=r"nocrs\.tif: GeoTIFF has no CRS"):
        tile_scene(no_crs, tmp_path / "chips", cfg=TileConfig(chip_size=16, overlap=0))
    no_tf = write_scene(tmp_path / "notf.tif", data, transform=Affine.identity())
    with pytest.raises(InputError, match=r"notf\.tif: GeoTIFF has no geotransform"):
        tile_scene(no_tf, tmp_path / "chips", cfg=TileConfig(chip_size=16, overlap=0))
    assert not any((tmp_path / "chips").glob("*"))


def test_failure_keeps_previous_output_and_leaves_no_temp(tmp_path, rng):
    data = rng.integers(1, 255, (3, 64, 64), dtype=np.uint8)
    scene = write_scene(tmp_path / "s.tif", data)
    cfg = TileConfig(chip_size=32, overlap=0)
    gpkg = tile_scene(scene, tmp_path / "chips", cfg=cfg)
    before = sorted(p.name for p in gpkg.parent.iterdir())
    with pytest.raises(InputError):
        tile_scene(scene, tmp_path / "chips", cfg=TileConfig(chip_size=32, overlap=0, bands=[9]))
    assert sorted(p.name for p in gpkg.parent.iterdir()) == before
    assert [p.name for p in (tmp_path / "chips").iterdir()] == ["s"]


def test_geographic_scene_reprojected_to_utm(tmp_path, rng):
    # ~0.15 m pixels at 17.9 E, 36 N (off the zone's central meridian), stored in degrees.
    deg = 0.15 / 111_320
    transform = Affine(deg * 1.24, 0, 17.9, 0, -deg, 36.0)
    data = rng.integers(1, 255, (3, 120, 120), dtype=np.uint8)
    scene = write_scene(tmp_path / "geo.tif", data, transform=transform,
                        crs=CRS.from_epsg(4326), nodata=None)
    gpkg = tile_scene(scene, tmp_path / "chips",
                      cfg=TileConfig(chip_size=64, overlap=0, min_valid_fraction=0.5,
                                     geographic="reproject"))
    chips = _chips(gpkg)
    assert chips.crs == CRS.from_epsg(32633) and len(chips) == 4
    assert np.allclose(chips.gsd, 0.15, rtol=0.01)
    with rasterio.open(gpkg.parent / f"{chips.chip[0]}.tif") as chip:
        assert chip.crs == CRS.from_epsg(32633)
        assert 0.14 < pixel_size(chip.transform) < 0.16  # metres, not degrees
        # The scene's outline is rotated in UTM: the warped-in corners are masked invalid.
        mask = chip.dataset_mask()
        assert 0.8 < (mask > 0).mean() < 1.0
        assert chip.read()[:, mask > 0].mean() == pytest.approx(127, abs=5)
    with pytest.raises(InputError, match=r"geo\.tif: CRS EPSG:4326 is geographic"):
        # By default refused, with the same line predict gives, so the two stages agree.
        tile_scene(scene, tmp_path / "chips2", cfg=TileConfig())


def test_gsd_resampled_to_target(tmp_path):
    transform = Affine(0.3, 0, 500000, 0, -0.3, 4000000)
    ramp = np.tile((1 + 4 * np.arange(50)).astype(np.uint8), (3, 80, 1))
    scene = write_scene(tmp_path / "coarse.tif", ramp, transform=transform, nodata=None)
    gpkg = tile_scene(scene, tmp_path / "chips",
                      cfg=TileConfig(chip_size=64, overlap=0, gsd=0.15))
    chips = _chips(gpkg)
    assert np.allclose(chips.gsd, 0.15)
    # The scene grid doubled: 100 x 160 pixels -> offsets reach 100 - 64 and 160 - 64.
    assert chips.col_off.max() == 36 and chips.row_off.max() == 96
    with rasterio.open(gpkg.parent / "coarse_r00000_c00000.tif") as chip:
        assert chip.transform.a == pytest.approx(0.15)
        row = chip.read(1)[10].astype(int)
        # Bilinear: new in-between values (source values are 1 mod 4), not pixel doubling.
        assert np.abs(np.diff(row[2:60])).max() <= 3
        assert (row[2:60] % 4 != 1).sum() > 20


# === Index, split, statistics ===

def _scene(path: Path, rng, x0: float = 500000.0, size: int = 128) -> Path:
    data = rng.integers(1, 255, (3, size, size), dtype=np.uint8)
    return write_scene(path, data, transform=Affine(GSD, 0, x0, 0, -GSD, 4000000), nodata=0)


def test_split_whole_scenes_when_three_or_more(tmp_path, rng):
    cfg = TileConfig(chip_size=64, overlap=16, val_fraction=0.25, seed=3)
    for k in range(4):
        tile_scene(_scene(tmp_path / f"s{k}.tif", rng, 500000 + 100 * k), tmp_path / "chips",
                   cfg=cfg)
    _fake_masks(tmp_path / "chips", tmp_path / "masks")
    index = _chips(build_index(tmp_path / "chips", tmp_path / "masks", cfg=cfg))
    by_scene = index.groupby("scene")["split"].agg(set)
    assert all(len(s) == 1 for s in by_scene)
    assert sum(s == {"val"} for s in by_scene) == 1
    assert {"car_pixels", "split", "valid_fraction"} <= set(index.columns)
    again = _chips(build_index(tmp_path / "chips", tmp_path / "masks", cfg=cfg))
    assert list(again.split) == list(index.split)  # deterministic from the seed


def test_block_split_single_scene_never_overlaps_across(tmp_path, rng):
    cfg = TileConfig(chip_size=64, overlap=16, val_fraction=0.3, split_block_m=25.0, seed=1)
    tile_scene(_scene(tmp_path / "one.tif", rng, size=600), tmp_path / "chips", cfg=cfg)
    _fake_masks(tmp_path / "chips", tmp_path / "masks")
    index = _chips(build_index(tmp_path / "chips", tmp_path / "masks", cfg=cfg))
    counts = index.split.value_counts()
    assert counts.get("val", 0) >= 1 and counts.get("train", 0) >= 1
    train, val = index[index.split == "train"], index[index.split == "val"]
    for geom in val.geometry:
        assert train.geometry.intersection(geom).area.max() < 1e-9


def test_stats_over_valid_pixels_of_train_chips(tmp_path, rng):
    cfg = TileConfig(chip_size=64, overlap=0, val_fraction=0.0)
    data = np.zeros((3, 128, 128), np.uint8)
    data[0] = rng.integers(90, 111, (128, 128))
    data[1] = rng.integers(1, 201, (128, 128))
    data[2] = 50
    data[:, :20, :] = 0  # nodata must not pull the mean down
    tile_scene(write_scene(tmp_path / "st.tif", data, nodata=0), tmp_path / "chips", cfg=cfg)
    _fake_masks(tmp_path / "chips", tmp_path / "masks")
    build_index(tmp_path / "chips", tmp_path / "masks", cfg=cfg)
    stats = json.loads((tmp_path / "chips" / "stats.json").read_text())
    assert stats["bands"] == [1, 2, 3] and stats["dtype"] == "uint8"
    assert stats["gsd"] == pytest.approx(GSD)
    assert stats["mean"] == pytest.approx([100, 100, 50], rel=0.05)
    assert stats["std"][0] == pytest.approx(np.sqrt((21 ** 2 - 1) / 12), rel=0.1)
    assert stats["std"][2] == 1.0  # a constant band gets std 1, never 0


# === Worker processes ===

def _tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tif"))}


@pytest.mark.parametrize("gsd", [None, GSD * 1.5])  # the scene itself, and a warped grid
def test_worker_processes_write_what_one_process_writes(tmp_path, rng, monkeypatch, gsd):
    """Rows of chips cut by worker processes give the same chip bytes and the same records."""
    import pipeline.stages.tile as tile

    data = rng.integers(1, 255, (3, 300, 260), dtype=np.uint8)
    data[:, :90, :70] = 0  # a nodata corner: chips with an internal mask, and skipped chips
    scene = write_scene(tmp_path / "s.tif", data, nodata=0)
    cfg = TileConfig(chip_size=64, overlap=16, min_valid_fraction=0.3, gsd=gsd)
    runs = {}
    for processes in (1, 3):
        monkeypatch.setattr(tile, "_processes", lambda rows, cols, n=processes: n)
        gpkg = tile_scene(scene, tmp_path / f"chips{processes}", cfg=cfg)
        runs[processes] = (_tree(gpkg.parent), _chips(gpkg))
    (one, rec1), (many, rec3) = runs[1], runs[3]
    assert len(one) > 10 and one == many  # every chip, byte for byte
    assert any(rec1["valid_fraction"] < 1)  # masked chips took part
    assert list(rec1.columns) == list(rec3.columns)
    for column in rec1.columns:
        if column == "geometry":
            assert rec1.geometry.geom_equals_exact(rec3.geometry, 0).all()
        else:
            assert rec1[column].tolist() == rec3[column].tolist()
    assert not list((tmp_path / "chips3").rglob(".*"))  # no scratch left behind


def test_processes_stay_home_in_daemons_and_on_small_scenes(monkeypatch):
    import multiprocessing

    import pipeline.stages.tile as tile

    assert tile._processes(2, 3) == 1  # 6 chips: a worker's start would cost more
    monkeypatch.setattr(multiprocessing.current_process(), "daemon", True, raising=False)
    assert tile._processes(200, 200) == 1  # a Dask worker may not start processes


# === Reading on block rows, and the C-API chip writer ===

def _write_blocks(path: Path, data: np.ndarray, nodata, **layout) -> Path:
    bands, rows, cols = data.shape
    with rasterio.open(path, "w", driver="GTiff", width=cols, height=rows, count=bands,
                       dtype=data.dtype, crs=UTM, transform=TRANSFORM, nodata=nodata,
                       compress="deflate", **layout) as dst:
        dst.write(data)
    return path


@pytest.mark.parametrize("layout", [
    {"tiled": True, "blockxsize": 48, "blockysize": 48},  # block rows off the chip stride
    {"blockysize": 5},  # strips of 5 rows
    {"blockysize": 230},  # strips taller than a chip: read strip by strip (no row buffer)
    "narrow buffer",  # rows do not fit ROW_BUFFER_BYTES: strips of chip groups
])
@pytest.mark.parametrize("processes", [1, 3])
def test_chips_equal_source_windows_for_any_block_layout(tmp_path, rng, monkeypatch, layout,
                                                         processes):
    import pipeline.stages.tile as tile

    data = rng.integers(1, 255, (3, 230, 210), dtype=np.uint8)
    data[:, 100:140, :] = 0  # a nodata band across: masked chips
    if layout == "narrow buffer":
        monkeypatch.setattr(tile, "ROW_BUFFER_BYTES", 1000)
        monkeypatch.setattr(tile, "MAX_STRIP_WIDTH", 100)
        layout = {"tiled": True, "blockxsize": 32, "blockysize": 32}
    monkeypatch.setattr(tile, "_processes", lambda rows, cols, n=processes: n)
    scene = _write_blocks(tmp_path / "s.tif", data, 0, **layout)
    gpkg = tile_scene(scene, tmp_path / "chips",
                      cfg=TileConfig(chip_size=64, overlap=20, min_valid_fraction=0.0))
    chips = _chips(gpkg)
    assert len(chips) == len(grid_windows(210, 230, 64, 20))
    for row in chips.itertuples():
        want = data[:, row.row_off:row.row_off + 64, row.col_off:row.col_off + 64]
        with rasterio.open(gpkg.parent / f"{row.chip}.tif") as chip:
            np.testing.assert_array_equal(chip.read(), want)
            np.testing.assert_array_equal(chip.dataset_mask() > 0, (want != 0).any(axis=0))
        assert row.sum_0 == pytest.approx(want[0, ::4, ::4][(want != 0).any(axis=0)[::4, ::4]]
                                          .astype(float).sum())


def test_footprints_at_once_equal_window_footprint_exactly():
    import pipeline.stages.tile as tile
    from pipeline.geo import window_footprint

    rotated = Affine(0.15 * np.cos(0.3), -0.15 * np.sin(0.3), 500000.123,
                     0.15 * np.sin(0.3), 0.15 * np.cos(0.3), 4000000.7)
    for grid in (TRANSFORM, rotated):
        chips = [rasterio.windows.transform(Window(c, r, 64, 64), grid)
                 for r, c in [(0, 0), (48, 96), (1000, 37)]]
        got = tile._footprints([t[:6] for t in chips], 64)
        for polygon, t in zip(got, chips, strict=True):
            want = window_footprint(Window(0, 0, 64, 64), t)
            assert list(polygon.exterior.coords) == list(want.exterior.coords)
    assert tile._footprints([], 64) == []
