"""Two runs of a stage on the same folders at once (two `make all` started together): the second
waits for the first, says so, and finds the stage up to date; the outputs are one run's.

Real ``python -m pipeline`` processes on tiny scenes. The test holds the output folder's lock
itself while it starts both, so they overlap however the machine schedules them: both must wait
for it, then one of them does the work while the other waits for that one.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from conftest import GSD, PINNED, ROOT, write_scene

from pipeline.config import PredictConfig, TileConfig
from pipeline.files import LOCK_FILE, TEMP_DIR, folder_lock

TILE = ["--set", "tile.chip_size=64", "--set", "tile.overlap=8"]


def _scenes(folder: Path, n: int, size: int) -> Path:
    rng = np.random.default_rng(5)
    for i in range(n):
        write_scene(folder / f"scene{i}.tif",
                    rng.integers(1, 255, (3, size, size), dtype=np.uint8))
    return folder


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "w") as fh:
        return subprocess.Popen([sys.executable, "-m", "pipeline", *args, "--workers", "1"],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=fh)


def _together(args: list[str], folder: Path, tmp_path: Path) -> list[str]:
    """Start two runs of ``args`` while this process holds ``folder``'s lock; release it once
    both wait (or have ended: no lock at all); return their stderr, each having exited 0."""
    logs = [tmp_path / f"run{i}.log" for i in range(2)]
    with folder_lock(folder, "test"):
        procs = [_start(args, log) for log in logs]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            waiting = ["waiting for it to finish" in log.read_text() for log in logs]
            if all(w or p.poll() is not None for w, p in zip(waiting, procs, strict=True)):
                break
            time.sleep(0.05)
    for proc in procs:
        proc.wait(timeout=300)
    errs = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], errs
    return errs


def _check_one_ran(errs: list[str], stage: str, folder: Path, n: int) -> None:
    """Both waited for the test (named as the holder), one did the work, the other then found
    it all up to date, and the outputs are the ones of one run."""
    me = f"process {os.getpid()} on "
    for err in errs:
        line = next((ln for ln in err.splitlines() if "waiting for it to finish" in ln), "")
        assert f"{stage}: {folder} is being written by {me}" in line, err
    workers = [e for e in errs if f"{stage}: {n} of {n} to do" in e]
    idle = [e for e in errs if f"{stage}: all {n} up to date" in e]
    assert len(workers) == 1 and len(idle) == 1, errs


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (the lock file aside) with the hash of its bytes; a
    GeoPackage by its features, since SQLite pages carry write times."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name.startswith(".carseg."):  # lock, manifests
            continue
        if path.suffix == ".gpkg":
            import geopandas as gpd

            gdf = gpd.read_file(path)
            data = gdf.drop(columns="geometry").to_csv().encode() + b"".join(
                g.wkb for g in gdf.geometry)
        else:
            data = path.read_bytes()
        out[str(path.relative_to(folder))] = hashlib.sha256(data).hexdigest()
    return out


def _strays(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if TEMP_DIR in p.parts or ".tmp" in p.name
            or p.name.startswith("tmp")]


def test_two_tiles_at_once_give_one_runs_chips(tmp_path):
    from pipeline.stages.tile import tile_scene

    images = _scenes(tmp_path / "images", 3, 256)
    reference = tmp_path / "reference"
    for scene in sorted(images.glob("*.tif")):
        tile_scene(scene, reference, cfg=TileConfig(chip_size=64, overlap=8))
    chips = tmp_path / "chips"

    errs = _together(["tile", str(images), str(chips), *TILE], chips, tmp_path)

    _check_one_ran(errs, "tile", chips, 3)
    tree = _tree(chips)
    assert len(tree) == 3 * (1 + 25)  # per scene: chips.gpkg and 5 x 5 chips
    assert tree == _tree(reference)  # chip GeoTIFFs byte for byte
    assert _strays(chips) == []
    assert sorted(p.name for p in chips.iterdir()) == [LOCK_FILE, ".carseg.tile.json", "scene0",
                                                       "scene1", "scene2"]

    # A rerun with nothing to do neither waits for a holder of the lock nor writes anything.
    with folder_lock(chips, "test"):
        mtimes = {p: p.stat().st_mtime_ns for p in chips.rglob("*")}
        holder = (chips / LOCK_FILE).read_text()
        rerun = subprocess.run([sys.executable, "-m", "pipeline", "tile", str(images),
                                str(chips), *TILE, "--workers", "1"], cwd=ROOT,
                               capture_output=True, text=True, timeout=120, check=False)
    assert rerun.returncode == 0 and "tile: all 3 up to date" in rerun.stderr, rerun.stderr
    assert "waiting" not in rerun.stderr
    assert {p: p.stat().st_mtime_ns for p in chips.rglob("*")} == mtimes
    assert (chips / LOCK_FILE).read_text() == holder


def test_two_predicts_at_once_give_one_runs_rasters(tmp_path):
    import keras

    from pipeline.bundle import save_bundle
    from pipeline.stages.predict import predict_scene

    # One 3x3 convolution: a real bundle, loaded and run by the real predict.
    keras.utils.set_random_seed(3)
    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(1, 3, padding="same",
                                                    activation="sigmoid")(inputs))
    model_dir = tmp_path / "model"
    save_bundle(model, dict(bands=[1, 2, 3], dtype="uint8", gsd=GSD, chip_size=32,
                            normalization={"mean": [127.0] * 3, "std": [50.0] * 3},
                            size_multiple=1, threshold=0.5, data_fingerprint="test"), model_dir)
    images = _scenes(tmp_path / "images", 2, 96)
    reference = tmp_path / "reference"
    for scene in sorted(images.glob("*.tif")):
        predict_scene(scene, model_dir, reference, cfg=PredictConfig(**PINNED))
    out = tmp_path / "out"

    errs = _together(["predict", str(images), "--model-dir", str(model_dir), "--out", str(out),
                      *(f"--set=predict.{k}={v}" for k, v in PINNED.items())], out, tmp_path)

    _check_one_ran(errs, "predict", out, 2)
    rasters = {k: v for k, v in _tree(out).items() if not k.startswith("logs")}
    assert sorted(k for k in rasters if k.endswith(".tif")) == [f"{kind}/scene{i}.tif" for kind in ("masks", "probability")
                               for i in range(2)]
    assert rasters == _tree(reference)
    assert sorted(p.name for p in (out / "logs").iterdir()) == [
        "scene0.predict.json", "scene1.predict.json"]
    assert _strays(out) == []
