"""Shared fixtures: tiny real GeoTIFFs and vector files in a real projected CRS."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS

# Keras picks its backend at import; tests default to TensorFlow unless told otherwise.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

UTM = CRS.from_epsg(32633)
GSD = 0.15
ORIGIN = (500000.0, 4000000.0)
TRANSFORM = Affine(GSD, 0, ORIGIN[0], 0, -GSD, ORIGIN[1])


def write_scene(path: Path, data: np.ndarray, *, transform: Affine = TRANSFORM, crs=UTM,
                nodata: float | None = 0, tiled: bool = True) -> Path:
    """Write a (bands, rows, cols) array as a GeoTIFF the way orthophotos come."""
    path.parent.mkdir(parents=True, exist_ok=True)
    bands, rows, cols = data.shape
    profile = dict(driver="GTiff", width=cols, height=rows, count=bands, dtype=data.dtype,
                   crs=crs, transform=transform, nodata=nodata, compress="deflate")
    if tiled and rows >= 16 and cols >= 16:
        profile.update(tiled=True, blockxsize=16 * max(1, min(cols, 256) // 16),
                       blockysize=16 * max(1, min(rows, 256) // 16))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# === One tiny end-to-end run, shared by the slow make/crash/lock tests ===
ROOT = Path(__file__).resolve().parents[1]

# The smallest settings that still run every stage for real: 2 training and 2 incoming scenes
# of 320x256 px, 64 px chips, a 2-level U-Net with 4 filters, 2 epochs of 3 steps, one worker.
TINY = """
sample: {train_scenes: 2, incoming_scenes: 2, width: 320, height: 256, seed: 3}
tile: {chip_size: 64, overlap: 8}
train: {depth: 2, base_filters: 4, batch_size: 4, epochs: 2, steps_per_epoch: 3,
        max_minutes: 2, augment: {scale_rotate: false, blur_noise: false}}
predict: {overlap: 16, batch_size: 4}
vectors: {window: 128, halo: 48}
report: {crops: 1, crop_size: 64}
distributed: {workers: 1}
"""


def make(*targets: str, env_vars: dict[str, str], status: int = 0):
    """Run make in the repository with VAR=value arguments; check its exit status."""
    import subprocess

    args = ["make", "--no-print-directory", "-C", str(ROOT), *targets,
            *(f"{k}={v}" for k, v in env_vars.items())]
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    assert proc.returncode == status, (f"make {' '.join(targets)} exited {proc.returncode}:\n"
                                       f"{proc.stdout}\n{proc.stderr}")
    return proc


def tiny_env(root: Path) -> dict[str, str]:
    """The make variables of a tiny run rooted at ``root``."""
    return {"DATA": str(root / "data"), "CONFIG": str(root / "tiny.yaml"),
            "MODEL_DIR": str(root / "model"), "REPORTS": str(root / "reports"), "RUN": "tiny",
            "WORKERS": "1"}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """``make sample`` and ``make all`` once, from nothing, on the tiny sample.

    Read-only for the tests: one that changes the run works on :func:`copy_run`'s copy.
    Returns (root, make variables, the CompletedProcess of ``make all``).
    """
    root = tmp_path_factory.mktemp("tiny")
    (root / "tiny.yaml").write_text(TINY)
    env = tiny_env(root)
    make("sample", env_vars=env)
    return root, env, make("all", env_vars=env)


def copy_run(root: Path, dst: Path) -> dict[str, str]:
    """Copy a tiny run (file times kept, so it is as up to date as the original)."""
    import shutil

    shutil.copytree(root, dst, symlinks=True)
    return tiny_env(dst)
