"""The whole chain through make, on a tiny generated sample: real stages, real files, and
incremental reruns (nothing changed -> nothing rewritten; one scene changed -> only it redone)."""

from __future__ import annotations

import csv
import os
import subprocess
import time
from pathlib import Path

import geopandas as gpd
import pytest
import rasterio
from rio_cogeo.cogeo import cog_validate

ROOT = Path(__file__).resolve().parents[1]

TINY = """
sample: {train_scenes: 2, incoming_scenes: 2, width: 320, height: 256, seed: 3}
tile: {chip_size: 64, overlap: 8}
train: {depth: 2, base_filters: 4, batch_size: 4, epochs: 2, steps_per_epoch: 3,
        max_minutes: 2, augment: {scale_rotate: false, blur_noise: false}}
predict: {overlap: 16, batch_size: 4}
vectors: {window: 128, halo: 48}
report: {crops: 1, crop_size: 64}
"""


def make(*targets: str, env_vars: dict[str, str]) -> subprocess.CompletedProcess:
    args = ["make", "--no-print-directory", "-C", str(ROOT), *targets,
            *(f"{k}={v}" for k, v in env_vars.items())]
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"make {' '.join(targets)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def snapshot(*folders: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for f in folders for p in f.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_make_all_is_real_and_incremental(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    data, model, reports = tmp_path / "data", tmp_path / "model", tmp_path / "reports"
    env = {"DATA": str(data), "CONFIG": str(config), "MODEL_DIR": str(model),
           "REPORTS": str(reports), "RUN": "tiny", "WORKERS": "1"}

    make("sample", env_vars=env)
    proc = make("all", env_vars=env)
    assert "report" in proc.stdout

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

    # Nothing changed: nothing is rewritten.
    before = snapshot(data, model, reports)
    time.sleep(1.1)
    make("all", env_vars=env)
    assert snapshot(data, model, reports) == before

    # One incoming scene changed: only its outputs are redone; the model is not retrained.
    changed, kept = scenes
    os.utime(data / "incoming" / f"{changed}.tif")
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

    # A train-only setting retrains without re-tiling.
    chips_index = data / "interim" / "chips" / "index.gpkg"
    make("train", env_vars={**env, "SET": "train.epochs=3"})
    again = snapshot(data, model)
    assert again[chips_index] == after[chips_index]
    assert again[model / "model.keras"] > after[model / "model.keras"]
