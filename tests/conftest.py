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
