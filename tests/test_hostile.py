"""Hostile-user findings: each test reproduces one defect seen on main (and fails until fixed).

Real files in tmp_path, the real CLI (`python -m pipeline`) and the real Makefile; no mocks.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from affine import Affine
from conftest import make_options, write_scene
from rasterio.crs import CRS

REPO = Path(__file__).resolve().parents[1]


def user_env() -> dict[str, str]:
    """The environment a user's shell has: conftest's TensorFlow log level is not theirs."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return env


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = user_env()
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env,
                          capture_output=True, text=True)


def make(*args: str) -> subprocess.CompletedProcess:
    env = user_env()
    return subprocess.run(["make", "--no-print-directory", *make_options(), *args], cwd=REPO,
                          env=env,
                          capture_output=True, text=True)


def write_mask_and_prob(out: Path, scene: str, *, crs, transform, cars) -> None:
    """A predicted scene as predict leaves it: OUT/masks/<scene>.tif and probability/<scene>.tif.

    ``cars`` is a list of (row, col, height, width) rectangles of car pixels.
    """
    mask = np.zeros((1, 200, 200), np.uint8)
    for r, c, h, w in cars:
        mask[0, r:r + h, c:c + w] = 1
    prob = np.where(mask == 1, 240, 5).astype(np.uint8)
    for kind, arr in (("masks", mask), ("probability", prob)):
        write_scene(out / kind / f"{scene}.tif", arr, crs=crs, transform=transform, nodata=255)


def read_summary(out: Path) -> dict[str, dict]:
    with open(out / "cars" / "summary.csv", newline="") as fh:
        return {row["scene"]: row for row in csv.DictReader(fh)}


# === (a) data loss ===

@pytest.mark.slow
def test_clean_never_deletes_images_or_model_inside_out(tmp_path, bright_model):
    """`make clean` with IMAGES and MODEL_DIR inside OUT removes what predict wrote there and
    nothing else: it exits 0, the predicted rasters are gone, the scenes and the model stay
    (the help line promises "keeps raw data and models")."""
    out = tmp_path / "project"
    car_scene(tmp_path / "in" / "p.tif")
    r = cli("predict", str(tmp_path / "in"), "--model-dir", str(bright_model), "--out", str(out),
            "--workers", "1")
    assert r.returncode == 0, r.stderr
    predicted = [out / kind / f"p{ext}" for kind in ("probability", "masks")
                 for ext in (".tif", ".qml")]
    assert all(p.exists() for p in predicted)
    images, model = out / "incoming", out / "model"
    write_scene(images / "a.tif", np.full((3, 16, 16), 9, np.uint8))
    model.mkdir(parents=True)
    (model / "model.keras").write_bytes(b"weights")
    r = make("clean", f"DATA={tmp_path / 'data'}", f"OUT={out}", f"IMAGES={images}",
             f"MODEL_DIR={model}", f"REPORTS={tmp_path / 'reports'}")
    assert r.returncode == 0, r.stderr
    assert [p for p in predicted if p.exists()] == [], "make clean left predict's outputs"
    assert (images / "a.tif").exists(), "make clean deleted a scene of IMAGES"
    assert (model / "model.keras").read_bytes() == b"weights", "make clean deleted the model"


def test_paths_refuses_model_dir_that_is_the_report_folder(tmp_path):
    """REPORTS/RUN == MODEL_DIR (e.g. REPORTS=models) is accepted, but report and train both
    stamp `settings.json` there: every second `make all` retrains and replaces the model."""
    model = tmp_path / "models" / "h"
    r = cli("paths", "--data", str(tmp_path / "data"), "--images", str(tmp_path / "in"),
            "--out", str(tmp_path / "out"), "--model-dir", str(model), "--report", str(model))
    assert r.returncode == 2, f"MODEL_DIR == REPORTS/RUN accepted (settings.json collide): {r.stderr}"
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_paths_refuses_model_dir_inside_an_out_folder_that_is_replaced(tmp_path):
    """MODEL_DIR=OUT/evaluation is accepted; evaluate swaps OUT/evaluation as a whole folder
    (atomic_dir), so the model bundle in it is deleted. Outputs must be apart from each other."""
    out = tmp_path / "out"
    r = cli("paths", "--data", str(tmp_path / "data"), "--images", str(tmp_path / "in"),
            "--out", str(out), "--model-dir", str(out / "evaluation"),
            "--report", str(tmp_path / "reports" / "h"))
    # Refused as bad input (exit 2) in one line naming both folders, not a traceback.
    assert r.returncode == 2, f"MODEL_DIR inside OUT/evaluation accepted: {r.stderr}"
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"MODEL_DIR ({out / 'evaluation'})" in r.stderr and "OUT/evaluation" in r.stderr


# === (b) exit 0 but wrong ===

def test_summary_car_area_is_square_metres_in_a_feet_crs(tmp_path):
    """summary.csv's car_area_m2 is geometry.area in the CRS's unit: ft^2 in State Plane."""
    out = tmp_path / "out"
    ft = 0.3048006096012192  # US survey foot
    gsd_ft = 0.15 / ft
    transform = Affine(gsd_ft, 0, 6_000_000, 0, -gsd_ft, 2_100_000)
    # One car of 30 x 14 pixels at 0.15 m: 4.5 m x 2.1 m = 9.45 m^2.
    write_mask_and_prob(out, "sf", crs=CRS.from_epsg(2227), transform=transform,
                        cars=[(50, 50, 30, 14)])
    r = cli("vectors", "--out", str(out), "--workers", "1")
    assert r.returncode == 0, r.stderr
    row = read_summary(out)["sf"]
    assert row["status"] == "ok"
    assert float(row["car_area_m2"]) == pytest.approx(9.45, rel=0.1), row


def test_summary_lists_only_the_scenes_of_the_batch(tmp_path):
    """A second batch into the same OUT (IMAGES=other/) lists the first batch's scenes in its
    summary.csv as if they belonged to it (scenes come from OUT/masks, not IMAGES)."""
    out = tmp_path / "out"
    utm = CRS.from_epsg(32633)
    t = Affine(0.15, 0, 500000, 0, -0.15, 4000000)
    write_mask_and_prob(out, "old_scene", crs=utm, transform=t, cars=[(50, 50, 30, 14)])
    write_mask_and_prob(out, "new_scene", crs=utm, transform=t, cars=[(50, 50, 30, 14)])
    images = tmp_path / "batch2"
    write_scene(images / "new_scene.tif", np.full((3, 200, 200), 9, np.uint8), transform=t)
    r = cli("vectors", "--out", str(out), "--images", str(images), "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert set(read_summary(out)) == {"new_scene"}


# === (c) failing, or failing with a misleading message ===

def test_vectors_scene_name_with_semicolon(tmp_path):
    """A scene named `a;b.tif` predicts, but vectors fails with sqlite's
    "OperationalError: no such table: gpkg_geometry_columns" (the name reaches a connect
    string). Any file name a GIS folder holds must work."""
    out = tmp_path / "out"
    write_mask_and_prob(out, "site;2", crs=CRS.from_epsg(32633),
                        transform=Affine(0.15, 0, 500000, 0, -0.15, 4000000),
                        cars=[(50, 50, 30, 14)])
    r = cli("vectors", "--out", str(out), "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert read_summary(out)["site;2"]["status"] == "ok"


# === Predict-level findings, with a tiny real Keras bundle: band 1 bright = car ===

UTM33 = CRS.from_epsg(32633)
T0 = Affine(0.15, 0, 500000, 0, -0.15, 4000000)


def car_scene(path: Path, *, crs=UTM33, transform=T0) -> Path:
    """200x200 px, 3 bands; two car-sized bright rectangles in band 1 (4.5 m x 2.1 m)."""
    data = np.full((3, 200, 200), 100, np.uint8)
    data[0] = 20
    for r, c in ((40, 40), (120, 110)):
        data[0, r:r + 30, c:c + 14] = 250
    return write_scene(path, data, crs=crs, transform=transform)


@pytest.fixture(scope="module")
def bright_model(tmp_path_factory) -> Path:
    """One 1x1 convolution + sigmoid on band 1: probability ~1 on cars, ~0 elsewhere."""
    import keras

    from pipeline.bundle import save_bundle

    inputs = keras.Input((None, None, 3))
    conv = keras.layers.Conv2D(1, 1, activation="sigmoid")
    model = keras.Model(inputs, conv(inputs))
    conv.set_weights([np.array([8.0, 0.0, 0.0], np.float32).reshape(1, 1, 3, 1),
                      np.zeros(1, np.float32)])
    meta = dict(bands=[1, 2, 3], dtype="uint8",
                normalization={"mean": [127.0] * 3, "std": [40.0] * 3},
                gsd=0.15, chip_size=64, size_multiple=1, threshold=0.5,
                data_fingerprint="hostile")
    model_dir = tmp_path_factory.mktemp("bright")
    save_bundle(model, meta, model_dir)
    return model_dir


def run_batch_chain(images: Path, out: Path, model: Path) -> list[subprocess.CompletedProcess]:
    common = ("--workers", "1")
    return [cli("predict", str(images), "--model-dir", str(model), "--out", str(out), *common),
            cli("vectors", "--out", str(out), "--images", str(images), *common),
            cli("batch", "--images", str(images), "--out", str(out), "--model-dir", str(model),
                *common)]


@pytest.mark.slow
def test_scene_replaced_by_a_corrupt_copy_keeps_no_stale_cars_in_the_batch(tmp_path,
                                                                            bright_model):
    """A scene that now fails predict keeps its previous probability/mask/cars, so the batch
    layer still holds its old cars while summary.csv says it failed (exit 3 but wrong)."""
    images, out = tmp_path / "images", tmp_path / "out"
    car_scene(images / "a.tif")
    car_scene(images / "b.tif", transform=Affine(0.15, 0, 500100, 0, -0.15, 4000000))
    assert [r.returncode for r in run_batch_chain(images, out, bright_model)] == [0, 0, 0]
    b = images / "b.tif"
    os.truncate(b, b.stat().st_size // 2)  # the user's copy got cut off; mtime is new
    rcs = [r.returncode for r in run_batch_chain(images, out, bright_model)]
    assert rcs[0] == 3
    assert read_summary(out)["b"]["status"] == "failed"
    import geopandas as gpd

    cars = gpd.read_file(out / "batch" / "cars.gpkg", layer="cars")
    assert "b" not in set(cars["scene"]), "the failed scene's old cars are in the batch layer"


@pytest.mark.slow
def test_batch_of_scenes_in_two_far_apart_crss(tmp_path, bright_model):
    """A batch mixing a UTM scene and a State Plane (feet) scene: predict and vectors work, but
    batch dies with "MemoryError: Unable to allocate 161. GiB" (the density grid spans both
    places in one CRS), exit 1, and no batch product is written."""
    images, out = tmp_path / "images", tmp_path / "out"
    car_scene(images / "europe.tif")
    ft = 0.3048006096012192
    car_scene(images / "california.tif", crs=CRS.from_epsg(2227),
              transform=Affine(0.15 / ft, 0, 6_000_000, 0, -0.15 / ft, 2_100_000))
    predict, vectors, batch = run_batch_chain(images, out, bright_model)
    assert predict.returncode == 0 and vectors.returncode == 0, predict.stderr + vectors.stderr
    assert "MemoryError" not in batch.stderr
    assert batch.returncode == 0, batch.stderr


@pytest.mark.slow
def test_predict_writes_the_qml_styles_beside_its_rasters(tmp_path, bright_model):
    """INTERFACE: "*.qml beside rasters". `make predict`/`make vectors` leave
    OUT/probability/<scene>.tif and masks/<scene>.tif unstyled; only `make batch` writes the
    .qml sidecars."""
    images, out = tmp_path / "images", tmp_path / "out"
    car_scene(images / "a.tif")
    r = cli("predict", str(images), "--model-dir", str(bright_model), "--out", str(out),
            "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert (out / "probability" / "a.qml").exists()
    assert (out / "masks" / "a.qml").exists()


@pytest.mark.slow
def test_make_reports_a_partial_batch_apart_from_bad_input(tmp_path, bright_model):
    """A truncated scene fails, the others complete. GNU make turns every failing recipe into
    its own status 2, so the partial batch shows as the stage's status 3 in make's last line
    ("Error 3"), while bad input shows "Error 2"."""
    images = tmp_path / "images"
    car_scene(images / "good.tif")
    bad = car_scene(images / "cut.tif")
    os.truncate(bad, bad.stat().st_size // 2)
    r = make("predict", f"DATA={tmp_path / 'data'}", f"IMAGES={images}",
             f"OUT={tmp_path / 'out'}", f"MODEL_DIR={bright_model}",
             f"REPORTS={tmp_path / 'reports'}", "WORKERS=1")
    assert (tmp_path / "out" / "masks" / "good.tif").exists()
    assert r.returncode == 2 and r.stderr.rstrip().endswith("Error 3"), r.stderr
    bad_input = make("predict", f"DATA={tmp_path / 'data'}", f"IMAGES={tmp_path / 'none'}",
                     f"OUT={tmp_path / 'out'}", f"MODEL_DIR={bright_model}", "WORKERS=1")
    assert bad_input.returncode == 2 and bad_input.stderr.rstrip().endswith("Error 2")


# === (d) strays after kill -9 ===

def _kill_when(proc: subprocess.Popen, seen, timeout: float = 60.0) -> bool:
    """SIGKILL ``proc`` as soon as ``seen()`` is true; False when it ended first."""
    import time

    end = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < end:
        if seen():
            proc.kill()
            proc.wait()
            return True
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    return False


def _popen(*args: str) -> subprocess.Popen:
    env = user_env()
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_sample_killed_leaves_no_staging_folder(tmp_path):
    """kill -9 of `make sample` leaves DATA/.sample-staging.XXXX (mkdtemp, not the swept
    .carseg-tmp) with partial scenes in it, and no later run removes it."""
    data = tmp_path / "data"
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("sample: {train_scenes: 2, incoming_scenes: 2, width: 320, height: 256, "
                   "seed: 3}\n")
    proc = _popen("sample", str(data), "--config", str(cfg))
    # The staging folder is the swept scratch (.carseg-tmp); kill once scenes are staged there.
    assert _kill_when(proc, lambda: any(data.glob(".carseg-tmp/*/raw/images/*.tif")))
    r = cli("sample", str(data), "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    strays = [*data.glob(".sample-staging.*"), *data.glob(".carseg-tmp")]
    assert not strays, f"the killed run's staging folder remains: {strays}"


# === (c) disk full ===

@pytest.fixture
def tiny_disk(tmp_path):
    """A 3 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.slow
def test_disk_full_says_no_space_left_naming_the_file(tmp_path, tiny_disk, bright_model):
    """With the disk full during predict the user gets rasterio's "Write failed. See previous
    exception for details." (the very wrapper first_line() exists to hide), preceded by raw
    GDAL lines "_tiffWriteProc: No space left on device.", and the scene is retried."""
    images = tmp_path / "images"
    car_scene(images / "a.tif")
    free = os.statvfs(tiny_disk)
    with open(tiny_disk / "filler", "wb") as fh:
        fh.write(b"\0" * (free.f_bavail * free.f_frsize - 150 * 1024))
    r = cli("predict", str(images), "--model-dir", str(bright_model),
            "--out", str(tiny_disk / "out"), "--workers", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr  # its one scene failed
    errors = [line for line in r.stderr.splitlines() if not line.startswith("INFO")]
    assert errors and all("no space left on device" in line.lower() for line in errors), errors
    assert "see previous exception" not in r.stderr.lower()


# === ZONES ===

def test_paths_accepts_out_beside_the_zones_file(tmp_path):
    """ZONES=project/zones.gpkg with OUT=project/out is refused: "OUT/probability would write
    into or over ZONES's folder". Writing into a subfolder overwrites no input; the usual
    project layout (zones or truth file at the top, outputs below) must work."""
    project = tmp_path / "project"
    r = cli("paths", "--data", str(project / "data"), "--images", str(project / "incoming"),
            "--out", str(project / "out"), "--model-dir", str(tmp_path / "models" / "h"),
            "--report", str(tmp_path / "reports" / "h"), "--zones", str(project / "zones.gpkg"),
            "--truth", str(project / "truth.gpkg"))
    assert r.returncode == 0, r.stderr


def test_failed_batch_leaves_no_catalog_pointing_at_deleted_files(tmp_path, bright_model):
    """A batch with a bad ZONES file (no CRS) first deletes zones.gpkg/density.tif, then fails;
    catalog.json and batch.json still list zones.gpkg as an asset that no longer exists."""
    import json

    import geopandas as gpd
    import shapely

    images, out = tmp_path / "images", tmp_path / "out"
    car_scene(images / "a.tif")
    write_mask_and_prob(out, "a", crs=UTM33, transform=T0, cars=[(40, 40, 30, 14)])
    assert cli("vectors", "--out", str(out), "--images", str(images),
               "--workers", "1").returncode == 0
    zone = shapely.box(500000, 3999970, 500030, 4000000)
    good = tmp_path / "zones" / "zones.gpkg"
    good.parent.mkdir()
    gpd.GeoDataFrame({"name": ["z"]}, geometry=[zone], crs=32633).to_file(good)
    bad = tmp_path / "zones" / "nocrs.shp"
    gpd.GeoDataFrame({"name": ["z"]}, geometry=[zone]).to_file(bad)
    batch = ("batch", "--images", str(images), "--out", str(out), "--model-dir",
             str(bright_model), "--workers", "1")
    assert cli(*batch, "--zones", str(good)).returncode == 0
    assert (out / "batch" / "zones.gpkg").exists()
    r = cli(*batch, "--zones", str(bad))
    assert r.returncode == 2 and "no CRS" in r.stderr
    catalog = json.loads((out / "batch" / "catalog.json").read_text())
    hrefs = [a["href"] for a in catalog.get("assets", {}).values()]
    missing = [h for h in hrefs if not (out / "batch" / h).exists()]
    assert not missing, f"catalog.json lists missing assets: {missing}"

