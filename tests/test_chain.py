"""The whole chain through make, on a tiny generated sample: real stages, real files, and
incremental reruns (nothing changed -> nothing rewritten; one scene changed -> only it redone)."""

from __future__ import annotations

import csv
import os
import shutil
import time
from pathlib import Path

import geopandas as gpd
import pytest
import rasterio
from conftest import copy_run, make
from rio_cogeo.cogeo import cog_validate


def snapshot(*folders: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for f in folders for p in f.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_make_all_is_real_and_incremental(tiny_run, tmp_path):
    root, env, proc = tiny_run  # `make sample` then `make all`, from nothing
    assert "report" in proc.stdout
    assert "train: no model in" in proc.stderr  # `all` says why it trains

    data, model, reports = root / "data", root / "model", root / "reports"
    out = data / "processed"
    scenes = sorted(p.stem for p in (data / "incoming").glob("*.tif"))
    assert len(scenes) == 2
    for scene in scenes:
        with rasterio.open(data / "incoming" / f"{scene}.tif") as src:
            grid = (src.crs, src.transform, src.width, src.height)
        for kind in ("probability", "masks"):
            path = out / kind / f"{scene}.tif"
            valid, errors, _ = cog_validate(path)
            assert valid, (path, errors)
            with rasterio.open(path) as dst:
                assert (dst.crs, dst.transform, dst.width, dst.height) == grid
                assert dst.dtypes[0] == "uint8" and dst.nodata == 255
        cars = gpd.read_file(out / "cars" / f"{scene}.gpkg")
        assert cars.crs == grid[0]
    with open(out / "cars" / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["scene"] for r in rows) == scenes
    assert (out / "evaluation" / "metrics.json").exists()
    assert (reports / "tiny" / "index.html").exists()
    assert (data / "interim" / "chips" / "index.gpkg").exists()
    assert (model / "model.keras").exists() and (model / "metadata.json").exists()

    # The rest changes the run: on a copy, so other tests keep the shared one.
    root = tmp_path / "run"
    env = copy_run(tiny_run[0], root)
    data, model, reports = root / "data", root / "model", root / "reports"
    out = data / "processed"

    # Nothing changed: nothing is rewritten.
    before = snapshot(data, model, reports)
    time.sleep(1.1)
    make("all", env_vars=env)
    assert snapshot(data, model, reports) == before

    # A scene touched but not changed is the same scene (freshness is by identity, not mtime).
    changed, kept = scenes
    touched = data / "incoming" / f"{changed}.tif"
    os.utime(touched)
    before[touched] = touched.stat().st_mtime_ns  # the input itself moved; nothing made from it
    make("all", env_vars=env)
    assert snapshot(data, model, reports) == before

    # One incoming scene changed: only its outputs are redone; the model is not retrained.
    with rasterio.open(data / "incoming" / f"{changed}.tif", "r+") as dst:
        window = rasterio.windows.Window(0, 0, 8, 8)
        dst.write(255 - dst.read(window=window), window=window)
    make("all", env_vars=env)
    after = snapshot(data, model, reports)
    assert after[model / "model.keras"] == before[model / "model.keras"]
    assert after[out / "probability" / f"{kept}.tif"] == before[out / "probability" / f"{kept}.tif"]
    assert after[out / "cars" / f"{kept}.gpkg"] == before[out / "cars" / f"{kept}.gpkg"]
    assert after[out / "probability" / f"{changed}.tif"] > before[
        out / "probability" / f"{changed}.tif"]

    # A new batch, with only the model bundle at hand (no training data), never retrains.
    batch, empty = tmp_path / "batch", tmp_path / "empty"
    batch.mkdir()
    empty.mkdir()
    (batch / "other.tif").write_bytes((data / "incoming" / f"{kept}.tif").read_bytes())
    make("predict", env_vars={**env, "DATA": str(empty), "IMAGES": str(batch),
                              "OUT": str(tmp_path / "batch_out")})
    assert (tmp_path / "batch_out" / "masks" / "other.tif").exists()
    assert (model / "model.keras").stat().st_mtime_ns == after[model / "model.keras"]

    # Predicting never trains, even when the training settings changed or their stamp is newer
    # than the model (a bundle copied from a colleague, or made with another CONFIG). One make
    # runs the four targets' recipes in turn (each its own chain of stages).
    model_mtime = (model / "model.keras").stat().st_mtime_ns
    time.sleep(1.1)
    (model / "settings.json").touch()
    proc = make("predict", "vectors", "evaluate", "report",
                env_vars={**env, "SET": "train.epochs=9"})
    assert "train:" not in proc.stderr
    assert "report:" in proc.stderr  # make ran the recipes in turn, to the last
    assert (model / "model.keras").stat().st_mtime_ns == model_mtime

    # A train-only setting retrains without re-tiling, and `all` says why.
    chips_index = data / "interim" / "chips" / "index.gpkg"
    proc = make("all", env_vars={**env, "SET": "train.epochs=3"})
    assert "the training settings changed" in proc.stderr
    again = snapshot(data, model)
    assert again[chips_index] == after[chips_index]
    assert again[model / "model.keras"] > after[model / "model.keras"]
    assert (model / "previous" / "model.keras").exists()  # the replaced bundle is kept


@pytest.mark.slow
def test_batch_with_odd_names_and_one_broken_scene(tiny_run, tmp_path):
    """Any file name a GIS folder holds works through make; one broken scene does not stop the
    others, is listed as failed, and make exits non-zero at the end."""
    # The shared run's data and model, in folders with spaces: `make train` finds them up to
    # date through the quoted paths (its stages run, nothing is redone).
    root, _, _ = tiny_run
    data, model = tmp_path / "da ta", tmp_path / "mo del"
    shutil.copytree(root / "data", data, ignore=shutil.ignore_patterns("processed"))
    shutil.copytree(root / "model", model)
    shutil.copy2(root / "tiny.yaml", tmp_path / "tiny.yaml")
    env = {"DATA": str(data), "CONFIG": str(tmp_path / "tiny.yaml"), "MODEL_DIR": str(model),
           "REPORTS": str(tmp_path / "reports"), "RUN": "tiny", "WORKERS": "1"}
    trained = (model / "model.keras").stat().st_mtime_ns
    proc = make("train", env_vars=env)
    assert "is up to date" in proc.stderr
    assert (model / "model.keras").stat().st_mtime_ns == trained
    batch, out = tmp_path / "flight 0425", tmp_path / "out put"
    batch.mkdir()
    source = sorted((data / "incoming").glob("*.tif"))[0].read_bytes()
    names = ["my scene.TIF", "city.2026.tile7.tiff", "-dash ü.tif", ".dot.tif"]
    for name in names:
        (batch / name).write_bytes(source)
    (batch / "broken.tif").write_bytes(source[: len(source) // 3])
    proc = make("vectors", env_vars={**env, "IMAGES": str(batch), "OUT": str(out)}, status=2)
    assert "broken.tif" in proc.stderr and "Error 3" in proc.stderr  # 3: partial, see Makefile
    assert "More than one layer" not in proc.stderr
    with open(out / "cars" / "summary.csv") as fh:
        rows = {r["scene"]: r for r in csv.DictReader(fh)}
    stems = ["my scene", "city.2026.tile7", "-dash ü", ".dot"]
    assert sorted(rows) == sorted([*stems, "broken"])  # no phantom rows from dotted names
    assert rows["broken"]["status"] == "failed"
    for stem in stems:
        assert rows[stem]["status"] == "ok"
        assert (out / "masks" / f"{stem}.tif").exists()
        assert (out / "cars" / f"{stem}.gpkg").exists()
    # The same names work for a stage run alone, and an unknown RUN has no model: one line.
    proc = make("predict", env_vars={**env, "IMAGES": str(batch), "OUT": str(out),
                                     "MODEL_DIR": str(tmp_path / "none")}, status=2)
    assert proc.stderr.strip().splitlines()[0].endswith("no model; run `make train` first "
                                                        "(or `make demo`, then use RUN=demo)")


def test_outputs_over_inputs_refused_before_any_work(tmp_path):
    images = tmp_path / "X" / "masks"
    images.mkdir(parents=True)
    (images / "scene.tif").write_bytes(b"not touched")
    proc = make("predict", env_vars={"IMAGES": str(images), "OUT": str(tmp_path / "X"),
                                     "MODEL_DIR": str(tmp_path / "m")}, status=2)
    assert proc.stderr.splitlines()[0] == (
        f"error: {images}: OUT/masks would write into or over IMAGES ({images}); choose an "
        "output folder apart from the inputs")
    assert (images / "scene.tif").read_bytes() == b"not touched"
    assert sorted(p.name for p in (tmp_path / "X").iterdir()) == ["masks"]


@pytest.mark.slow
def test_make_all_with_truth_outside_the_scenes(tiny_run, tmp_path):
    """TRUTH that lies wholly outside the batch: evaluate fails (INTERFACE: non-zero on no truth
    in the batch's footprint) with one line naming the truth file and the problem, no
    traceback, and every product made before evaluate is complete."""
    root = tmp_path / "run"
    env = copy_run(tiny_run[0], root)
    data = root / "data"
    out = data / "processed"
    shutil.rmtree(out)  # from nothing, so each product below was made by this command
    scenes = sorted(p.stem for p in (data / "incoming").glob("*.tif"))
    with rasterio.open(data / "incoming" / f"{scenes[0]}.tif") as src:
        crs, bounds = src.crs, src.bounds
    from shapely.geometry import box

    far = box(bounds.left + 100_000, bounds.bottom, bounds.left + 100_004, bounds.bottom + 2)
    truth = tmp_path / "far away truth.gpkg"
    gpd.GeoDataFrame(geometry=[far], crs=crs).to_file(truth, layer="cars")

    proc = make("all", env_vars={**env, "TRUTH": str(truth)}, status=2)
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert str(truth) in errors[0] and "no truth car lies in the footprint" in errors[0], errors
    for scene in scenes:
        for kind in ("probability", "masks"):
            valid, problems, _ = cog_validate(out / kind / f"{scene}.tif")
            assert valid, problems
        assert len(gpd.read_file(out / "cars" / f"{scene}.gpkg")) >= 0
    with open(out / "cars" / "summary.csv") as fh:
        assert sorted(r["scene"] for r in csv.DictReader(fh)) == scenes
    for product in ("cars.gpkg", "cars.parquet", "catalog.json", "seams.csv"):
        assert (out / "batch" / product).is_file(), product
    assert (out / "suggest" / "label_next.gpkg").is_file()
    assert not (out / "evaluation" / "metrics.json").exists()  # no metrics against no truth
