"""kill -9 at several points of tile, masks, train, predict and vectors, then rerun: the outputs
equal an uninterrupted run's and nothing stray is left (no temporaries, no half files)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio

from pipeline.io import TEMP_DIR
from pipeline.model import check_bundle

ROOT = Path(__file__).resolve().parents[1]

TINY = """
sample: {train_scenes: 2, incoming_scenes: 2, width: 320, height: 256, seed: 5}
tile: {chip_size: 64, overlap: 8}
train: {depth: 2, base_filters: 4, batch_size: 4, epochs: 3, steps_per_epoch: 4,
        augment: {scale_rotate: false, blur_noise: false}}
predict: {overlap: 16, batch_size: 4}
vectors: {window: 128, halo: 48}
distributed: {workers: 1}
"""

# Where in each stage's run the kills fall, as fractions of its uninterrupted duration.
KILL_AT = (0.35, 0.8)


def _cli(root: Path, stage: str, config: Path, model_dir: Path) -> list[str]:
    data, out = root / "data", root / "data" / "processed"
    cmds = {
        "tile": ["tile", data / "raw/images", data / "interim/chips"],
        "masks": ["masks", data / "interim/chips", data / "raw/labels", data / "interim/masks"],
        "index": ["index", data / "interim/chips", data / "interim/masks"],
        "train": ["train", data / "interim/chips", data / "interim/masks", model_dir],
        "predict": ["predict", data / "incoming", "--model-dir", model_dir, "--out", out],
        "vectors": ["vectors", "--out", out],
    }
    return [sys.executable, "-m", "pipeline", *map(str, cmds[stage]), "--config", str(config),
            "-q"]


def _run(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr}"
    return time.perf_counter() - start


def _kill_after(cmd: list[str], seconds: float) -> None:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def _content(path: Path) -> str:
    """What a file holds, independent of timestamps inside it."""
    if path.suffix == ".tif":
        with rasterio.open(path) as src:
            return hashlib.sha256(src.read().tobytes() + str(src.transform).encode()).hexdigest()
    if path.suffix == ".gpkg":
        import geopandas as gpd

        gdf = gpd.read_file(path)
        return hashlib.sha256(gdf.drop(columns="geometry").to_csv().encode()
                              + b"".join(g.wkb for g in gdf.geometry)).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _outputs(folder: Path) -> dict[str, str]:
    skip = ("logs", "settings")
    return {str(p.relative_to(folder)): _content(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and not set(p.relative_to(folder).parts) & set(skip)
            and p.name != "summary.csv"}


def _strays(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*")
            if TEMP_DIR in p.parts or p.name.startswith("tmp") or ".tmp" in p.name
            or p.name.startswith(".predict-") or p.name.startswith(".bundle")]


@pytest.mark.slow
def test_kill_and_rerun_equals_uninterrupted(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    for root in (clean, killed):
        subprocess.run([sys.executable, "-m", "pipeline", "sample", str(root / "data"),
                        "--config", str(config), "-q"], cwd=ROOT, check=True)

    # The uninterrupted run, timing each stage to place the kills.
    durations = {}
    for stage in ("tile", "masks", "index", "train", "predict", "vectors"):
        durations[stage] = _run(_cli(clean, stage, config, clean / "model"))

    for stage in ("tile", "masks", "index", "train", "predict", "vectors"):
        # Predict with the clean run's model, so its outputs can be compared byte for byte;
        # training itself is checked for a whole, consistent bundle.
        model_dir = killed / "model" if stage == "train" else clean / "model"
        for fraction in KILL_AT:
            _kill_after(_cli(killed, stage, config, model_dir), fraction * durations[stage])
        _run(_cli(killed, stage, config, model_dir))

    assert _strays(killed) == []
    check_bundle(killed / "model")  # complete, and its weights match its metadata
    clean_out, killed_out = _outputs(clean / "data"), _outputs(killed / "data")
    assert clean_out.keys() == killed_out.keys()
    differ = [k for k in clean_out if clean_out[k] != killed_out[k]]
    assert differ == []
    # The stages really ran: chips, masks, predictions and cars are all there.
    for part in ("interim/chips", "interim/masks", "processed/probability", "processed/cars"):
        assert any(k.startswith(part) for k in killed_out), part
    with rasterio.open(next((killed / "data/processed/probability").glob("*.tif"))) as src:
        assert np.any(src.read(1) != 255)
    shutil.rmtree(tmp_path, ignore_errors=True)
