"""One way in (issue 21): the guard, freshness by identity, pruning and clean hold for every
entry point, because make, `python -m pipeline STAGE` and the batch all go through
`runner.run_stage`.

Real GeoTIFFs, vector files, a real one-layer Keras bundle, the real CLI and Makefile.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import test_hostile
from affine import Affine
from conftest import ORIGIN, UTM, write_scene
from shapely.geometry import Polygon, box
from test_hostile import car_scene, cli, make, read_summary

from pipeline.cli import main

bright_model = test_hostile.bright_model  # the fixture: a one-layer bundle that finds cars

SMALL = ["--set", "tile.chip_size=64", "--set", "tile.overlap=8", "--workers", "1"]


def training_project(root: Path) -> dict[str, Path]:
    """A project folder: two labelled training scenes, their labels, and a user's notes."""
    rng = np.random.default_rng(5)
    images, labels = root / "raw" / "images", root / "raw" / "labels"
    for i in range(2):
        write_scene(images / f"s{i}.tif", rng.integers(1, 255, (3, 128, 128), dtype=np.uint8))
    labels.mkdir(parents=True)
    x0, y0 = ORIGIN
    gpd.GeoDataFrame(geometry=[box(x0 + 3, y0 - 6, x0 + 5, y0 - 3)], crs=UTM).to_file(
        labels / "cars.gpkg")
    (root / "docs").mkdir()
    (root / "docs" / "notes.txt").write_text("mine")
    return {"images": images, "labels": labels}


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# === Example 1: outputs over the project, a user's folder in MASKS ===

def test_chips_folder_holding_the_scenes_is_refused_and_nothing_is_deleted(tmp_path):
    p = tmp_path / "p"
    training_project(p)
    before = tree(p)
    assert main(["tile", str(p / "raw" / "images"), str(p), *SMALL]) == 2
    assert tree(p) == before  # the scenes and the user's docs/ are all there


def test_a_users_folder_in_masks_survives_a_removed_scene(tmp_path):
    paths = training_project(tmp_path)
    chips, results = tmp_path / "chips", tmp_path / "results"
    (results / "my_old_results").mkdir(parents=True)
    (results / "my_old_results" / "counts.csv").write_text("1,2\n")

    def masks() -> int:
        assert main(["tile", str(paths["images"]), str(chips), *SMALL]) == 0
        return main(["masks", str(chips), str(paths["labels"]), str(results), "--images",
                     str(paths["images"]), *SMALL])

    assert masks() == 0
    assert (results / "s1").is_dir()
    (paths["images"] / "s1.tif").unlink()
    assert masks() == 0
    assert not (results / "s1").exists()  # the pipeline's own folder of the gone scene
    assert (results / "my_old_results" / "counts.csv").read_text() == "1,2\n"


# === Example 2: an input inside the output folder, through the CLI ===

def test_truth_inside_the_evaluation_folder_is_refused_by_hand(tmp_path):
    out = tmp_path / "out"
    truth = out / "evaluation" / "truth.gpkg"
    truth.parent.mkdir(parents=True)
    gpd.GeoDataFrame(geometry=[box(0, 0, 1, 1)], crs=UTM).to_file(truth)
    before = truth.read_bytes()
    r = cli("evaluate", "--out", str(out), "--truth", str(truth))
    assert r.returncode == 2, r.stderr
    assert "would write into or over TRUTH" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert truth.read_bytes() == before


def test_zones_inside_the_batch_folder_are_refused_by_hand(tmp_path, bright_model):
    images, out = tmp_path / "images", tmp_path / "out"
    car_scene(images / "a.tif")
    zones = out / "batch" / "zones.gpkg"
    zones.parent.mkdir(parents=True)
    gpd.GeoDataFrame(geometry=[box(500000, 3999970, 500030, 4000000)], crs=UTM).to_file(zones)
    before = zones.read_bytes()
    r = cli("batch", "--images", str(images), "--out", str(out), "--model-dir",
            str(bright_model), "--zones", str(zones))
    assert r.returncode == 2 and "would write into or over ZONES" in r.stderr, r.stderr
    assert zones.read_bytes() == before


# === Example 3: make clean in a folder of the user's ===

@pytest.mark.slow
def test_clean_removes_only_what_the_pipeline_wrote(tmp_path, bright_model):
    images, out = tmp_path / "images", tmp_path / "out"
    car_scene(images / "a.tif")
    mine = {}
    for folder in ("logs", "settings", "cars", "masks", "evaluation", "batch", "probability"):
        (out / folder).mkdir(parents=True)
        (out / folder / "mine.txt").write_text(folder)
        mine[folder] = out / folder / "mine.txt"
    variables = [f"IMAGES={images}", f"OUT={out}", f"MODEL_DIR={bright_model}",
                 f"DATA={tmp_path / 'data'}", f"REPORTS={tmp_path / 'reports'}", "WORKERS=1"]
    r = make("batch", *variables)
    assert r.returncode == 0, r.stderr
    assert (out / "cars" / "a.gpkg").exists() and (out / "batch" / "catalog.json").exists()
    r = make("clean", *variables)
    assert r.returncode == 0, r.stderr
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert left == sorted(f"{f}/mine.txt" for f in mine), left
    assert all(p.read_text() == p.parent.name for p in mine.values())
    assert sorted(p.name for p in images.iterdir()) == ["a.tif"]
    assert (bright_model / "model.keras").exists()


# === Example 5: freshness by identity ===

def predict_args(images: Path, out: Path, model: Path) -> list[str]:
    return ["predict", str(images), "--model-dir", str(model), "--out", str(out),
            "--workers", "1"]


def test_a_scene_replaced_by_an_older_file_is_predicted_again(tmp_path, bright_model):
    images, out, other = tmp_path / "images", tmp_path / "out", tmp_path / "other"
    car_scene(images / "a.tif")
    # Another flight of the same place: one car, and a file older than the first prediction.
    data = np.full((3, 200, 200), 100, np.uint8)
    data[0] = 20
    data[0, 10:40, 150:164] = 250
    write_scene(other / "a.tif", data)
    assert main(predict_args(images, out, bright_model)) == 0
    first = (out / "masks" / "a.tif").read_bytes()
    shutil.copy2(other / "a.tif", images / "a.tif")  # cp -p: the old mtime comes along
    assert (images / "a.tif").stat().st_mtime < (out / "masks" / "a.tif").stat().st_mtime
    assert main(predict_args(images, out, bright_model)) == 0
    assert (out / "masks" / "a.tif").read_bytes() != first


def test_a_copied_project_is_up_to_date(tmp_path, bright_model):
    images, out = tmp_path / "p" / "images", tmp_path / "p" / "out"
    car_scene(images / "a.tif")
    assert main(predict_args(images, out, bright_model)) == 0
    shutil.copytree(tmp_path / "p", tmp_path / "q")  # new inodes and times, same content
    q_mask = tmp_path / "q" / "out" / "masks" / "a.tif"
    before = q_mask.stat().st_mtime_ns
    assert main(predict_args(tmp_path / "q" / "images", tmp_path / "q" / "out",
                             bright_model)) == 0
    assert q_mask.stat().st_mtime_ns == before


# === Example 6: a switched output format leaves no stale layer for the readers ===

def test_switching_the_vector_format_removes_the_old_layer(tmp_path, bright_model):
    images, out = tmp_path / "images", tmp_path / "out"
    car_scene(images / "a.tif")
    assert main(predict_args(images, out, bright_model)) == 0
    assert main(["vectors", "--out", str(out), "--images", str(images), "--workers", "1"]) == 0
    assert (out / "cars" / "a.gpkg").exists()
    assert main(["vectors", "--out", str(out), "--images", str(images), "--workers", "1",
                 "--set", "vectors.format=parquet"]) == 0
    assert (out / "cars" / "a.parquet").exists()
    assert not (out / "cars" / "a.gpkg").exists()
    assert read_summary(out)["a"]["cars"] == "2"


# === Example 9: batch products as one unit ===

@pytest.mark.slow
def test_a_failed_batch_leaves_the_previous_set_consistent(tmp_path, bright_model):
    images, out = tmp_path / "images", tmp_path / "out"
    car_scene(images / "a.tif")
    common = ["--workers", "1"]
    assert main(predict_args(images, out, bright_model)) == 0
    assert main(["vectors", "--out", str(out), "--images", str(images), *common]) == 0
    batch = ["batch", "--images", str(images), "--out", str(out), "--model-dir",
             str(bright_model), *common]
    assert main(batch) == 0
    (out / "batch" / "my_map.qgz").write_text("a user's project")

    def consistent() -> None:
        catalog = json.loads((out / "batch" / "batch.json").read_text())
        cars = gpd.read_file(out / "batch" / "cars.gpkg", layer="cars")
        assert catalog["cars"] == len(cars)
        for rel in catalog["outputs"]:
            assert (out / "batch" / rel).exists(), rel

    # A bow-tie zone (self-intersecting): the batch either repairs it or fails before it
    # replaces anything; never a new car layer beside the old catalog.
    zones = tmp_path / "zones.gpkg"
    bowtie = Polygon([(500000, 4000000), (500030, 3999970), (500030, 4000000),
                      (500000, 3999970)])
    gpd.GeoDataFrame(geometry=[bowtie], crs=UTM).to_file(zones)
    car_scene(images / "b.tif", transform=Affine(0.15, 0, 500100, 0, -0.15, 4000000))
    assert main(predict_args(images, out, bright_model)) == 0
    assert main(["vectors", "--out", str(out), "--images", str(images), *common]) == 0
    main([*batch, "--zones", str(zones)])
    consistent()
    assert (out / "batch" / "my_map.qgz").read_text() == "a user's project"
    assert not list(out.glob(".carseg-stage-*"))


# === Example 11: several targets in one command work as one ===

@pytest.mark.slow
def test_predict_vectors_in_one_make_gives_the_good_scenes_their_cars(tmp_path, bright_model):
    images, out = tmp_path / "images", tmp_path / "out"
    for i in range(3):
        car_scene(images / f"good{i}.tif",
                  transform=Affine(0.15, 0, 500000 + 100 * i, 0, -0.15, 4000000))
    (images / "broken.tif").write_bytes(b"II*\x00 not a tiff")
    r = make("predict", "vectors", f"IMAGES={images}", f"OUT={out}",
             f"MODEL_DIR={bright_model}", f"DATA={tmp_path / 'data'}", "WORKERS=1")
    assert r.returncode != 0
    assert "broken" in r.stderr
    for i in range(3):
        assert (out / "cars" / f"good{i}.gpkg").exists(), r.stderr
    assert read_summary(out)["broken"]["status"] == "failed"


# === The guard is the same by hand as through make ===

# (make target, make variables, CLI arguments) for outputs over, inside and holding an input.
# {t} is the test's folder; every case must be refused before any work by both, in the same
# words. (tile, masks and index cannot be given clashing folders through make: CHIPS and MASKS
# are DATA/interim/..., the scenes DATA/raw/...; the tile case by hand is tested above.)
CASES = {
    "predict-over": ("predict", dict(IMAGES="{t}/x", OUT="{t}/x"),
                     ["predict", "{t}/x/probability", "--model-dir", "{t}/m", "--out", "{t}/x"]),
    "predict-inside": ("predict", dict(IMAGES="{t}/x", OUT="{t}/x/out"),
                       ["predict", "{t}/x", "--model-dir", "{t}/m", "--out", "{t}/x/out"]),
    "predict-holding": ("predict", dict(IMAGES="{t}/o/masks/x", OUT="{t}/o"),
                        ["predict", "{t}/o/masks/x", "--model-dir", "{t}/m", "--out", "{t}/o"]),
    "vectors-inside": ("vectors", dict(IMAGES="{t}/o/cars/x", OUT="{t}/o"),
                       ["vectors", "--images", "{t}/o/cars/x", "--out", "{t}/o"]),
    "batch-zones": ("batch", dict(IMAGES="{t}/x", OUT="{t}/o", ZONES="{t}/o/batch/z.gpkg"),
                    ["batch", "--images", "{t}/x", "--out", "{t}/o", "--model-dir", "{t}/m",
                     "--zones", "{t}/o/batch/z.gpkg"]),
    "evaluate-truth": ("evaluate", dict(IMAGES="{t}/x", OUT="{t}/o",
                                        TRUTH="{t}/o/evaluation/t.gpkg"),
                       ["evaluate", "--out", "{t}/o", "--truth", "{t}/o/evaluation/t.gpkg"]),
    "train-over-data": ("train", dict(DATA="{t}/d", MODEL_DIR="{t}/d/raw"),
                        ["train", "{t}/d/interim/chips", "{t}/d/interim/masks", "{t}/d/raw",
                         "--images", "{t}/d/raw/images"]),
    "report-inside-model": ("report", dict(MODEL_DIR="{t}/m", REPORTS="{t}/m/r"),
                            ["report", "{t}/m/r/tiny", "--model-dir", "{t}/m", "--out",
                             "{t}/o"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_same_refusal_through_make_and_by_hand(tmp_path, case):
    target, variables, args = CASES[case]

    def fill(text: str) -> str:
        return text.replace("{t}", str(tmp_path))

    for folder in ("x", "m", "o", "d/raw/images", "o/masks/x", "o/cars/x",
                   "d/interim/chips/x"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    car_scene(tmp_path / "x" / "a.tif")
    (tmp_path / "o" / "evaluation").mkdir(parents=True)
    (tmp_path / "o" / "evaluation" / "t.gpkg").write_text("user's truth")
    (tmp_path / "o" / "batch").mkdir(parents=True)
    (tmp_path / "o" / "batch" / "z.gpkg").write_text("user's zones")
    before = tree(tmp_path)
    env = {"DATA": "{t}/d", "REPORTS": "{t}/reports", "MODEL_DIR": "{t}/m", "RUN": "tiny",
           "WORKERS": "1", **variables}
    by_make = make(target, *(f"{k}={fill(v)}" for k, v in env.items()))
    by_hand = cli(*(fill(a) for a in args))
    for r in (by_make, by_hand):
        assert r.returncode == 2, r.stdout + r.stderr
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "would write into or over" in errors[0], r.stderr
    assert tree(tmp_path) == before  # nothing written, nothing deleted


# === A user's file inside each stage's output folder stays, by hand and through make ===

@pytest.mark.slow
def test_a_users_file_in_every_output_folder_survives_a_full_run_and_clean(tiny_run, tmp_path):
    from conftest import copy_run
    from conftest import make as make_ok

    env = copy_run(tiny_run[0], tmp_path / "run")
    data, out = tmp_path / "run" / "data", tmp_path / "run" / "data" / "processed"
    folders = [data / "interim" / "chips", data / "interim" / "masks", out / "probability",
               out / "masks", out / "cars", out / "logs", out / "batch", out / "evaluation",
               out / "settings", tmp_path / "run" / "reports" / "tiny"]
    for folder in folders:
        (folder / "mine.txt").write_text(str(folder))
    scenes = sorted((data / "raw" / "images").glob("*.tif"))
    scenes[-1].unlink()  # prunes that scene's chips and masks
    make_ok("all", env_vars={**env, "SET": "evaluate.iou_threshold=0.4 vectors.format=parquet"})
    make_ok("clean", env_vars=env)
    for folder in folders:
        assert (folder / "mine.txt").read_text() == str(folder), folder
    assert not list((data / "interim" / "chips").glob("*/chips.gpkg"))
    assert not list(out.glob("probability/*.tif"))
    assert (tmp_path / "run" / "model" / "model.keras").exists()
    assert sorted(data.joinpath("raw", "images").glob("*.tif")) == scenes[:-1]


# === Example 10: one clear line ===

def test_a_backtick_in_set_is_one_line_naming_the_setting(tmp_path, capsys):
    assert main(["tile", str(tmp_path), str(tmp_path / "chips"), "--set",
                 "tile.seed=`1`"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tile.seed" in err[0] and "ScannerError" not in err[0], err


def test_a_scene_named_like_the_temporaries_is_refused_in_one_line(tmp_path, capsys):
    images = tmp_path / "images"
    car_scene(images / ".carseg-tmp.tif")
    assert main(["tile", str(images), str(tmp_path / "chips"), *SMALL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ".carseg-tmp.tif" in err[0] and "reserved" in err[0], err


def test_a_dangling_link_is_a_failed_scene_not_a_silent_skip(tmp_path, bright_model, capsys):
    images, out = tmp_path / "images", tmp_path / "out"
    car_scene(images / "a.tif")
    (images / "b.tif").symlink_to(tmp_path / "gone.tif")
    assert main(predict_args(images, out, bright_model)) == 3
    err = capsys.readouterr().err
    assert "b.tif" in err and "missing" in err, err
    assert (out / "masks" / "a.tif").exists()
