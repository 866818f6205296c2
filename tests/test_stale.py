"""Reruns after an input went away: the stage that used it must not call itself up to date.

Real CLI runs (in process) on tiny real GeoTIFFs and vector files.
"""

from __future__ import annotations

import geopandas as gpd
import numpy as np
from conftest import ORIGIN, UTM, write_scene
from shapely.geometry import box

from pipeline.cli import main

SMALL = ["--set", "tile.chip_size=64", "--set", "tile.overlap=8"]


def test_a_removed_training_scene_leaves_the_chip_index(tmp_path):
    rng = np.random.default_rng(1)
    images, chips, masks = tmp_path / "images", tmp_path / "chips", tmp_path / "masks"
    for i in range(2):
        write_scene(images / f"s{i}.tif", rng.integers(1, 255, (3, 128, 128), dtype=np.uint8))
    labels = tmp_path / "labels" / "cars.gpkg"
    labels.parent.mkdir()
    x0, y0 = ORIGIN
    gpd.GeoDataFrame(geometry=[box(x0 + 3, y0 - 6, x0 + 5, y0 - 3)], crs=UTM).to_file(labels)
    settings = tmp_path / "settings"

    def chain() -> set[str]:
        assert main(["tile", str(images), str(chips), "--settings", str(settings / "tile.json"),
                     *SMALL, "--workers", "1"]) == 0
        assert main(["masks", str(chips), str(labels.parent), str(masks), "--images",
                     str(images), "--settings", str(settings / "masks.json"), *SMALL,
                     "--workers", "1"]) == 0
        assert main(["index", str(chips), str(masks), "--settings",
                     str(settings / "masks.json"), *SMALL]) == 0
        return set(gpd.read_file(chips / "index.gpkg")["scene"])

    assert chain() == {"s0", "s1"}
    (images / "s1.tif").unlink()
    # Its chips and masks are pruned; the index (and so training) must not list them still.
    assert chain() == {"s0"}


def test_a_removed_label_file_redoes_the_masks(tmp_path):
    import json

    images, chips, masks, labels = (tmp_path / d for d in ("images", "chips", "masks", "labels"))
    write_scene(images / "s0.tif", np.full((3, 128, 128), 90, np.uint8))
    labels.mkdir()
    x0, y0 = ORIGIN
    for name, dx in (("a.gpkg", 3), ("b.gpkg", 12)):
        gpd.GeoDataFrame(geometry=[box(x0 + dx, y0 - 6, x0 + dx + 2, y0 - 3)],
                         crs=UTM).to_file(labels / name)
    run = ["--settings", str(tmp_path / "masks.json"), *SMALL, "--workers", "1"]
    assert main(["tile", str(images), str(chips), *SMALL, "--workers", "1"]) == 0

    def car_pixels() -> int:
        assert main(["masks", str(chips), str(labels), str(masks), "--images", str(images),
                     *run]) == 0
        return sum(json.loads((masks / "s0" / "masks.json").read_text())["chips"].values())

    both = car_pixels()
    (labels / "b.gpkg").unlink()  # a wrong label file taken out: its cars must go too
    assert 0 < car_pixels() < both


def test_a_deleted_warped_vrt_is_written_again(tmp_path):
    import rasterio
    from test_batch import batch_stage, write_rotated_flight

    from pipeline.config import Config

    write_rotated_flight(tmp_path)

    def batch() -> None:
        assert batch_stage(tmp_path / "images", tmp_path / "out", tmp_path / "model",
                           Config()) == 0

    batch()
    warped = tmp_path / "out" / "batch" / "warped" / "masks" / "rotated.vrt"
    warped.unlink()
    batch()  # the mosaic reads the scene through it: not "up to date" without it
    assert warped.exists()
    with rasterio.open(tmp_path / "out" / "batch" / "masks.vrt") as mosaic:
        assert (mosaic.read(1) == 1).any()
