"""Measuring helpers shared by the benchmarks: timing, peak memory, machine description, inputs.

Standards: a time is the median of several runs; a memory figure is the peak resident set of a
fresh subprocess (so earlier work in this process does not inflate it); every result names the
machine it was measured on, and speed-ups are ratios against a reference measured in the same run.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

LIBRARIES = ("numpy", "rasterio", "keras", "tensorflow", "jax", "dask", "distributed",
             "albumentations", "geopandas", "shapely")


def median_time(fn: Callable[[], Any], repeats: int = 3, *, warmup: int = 0) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls (after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mb(code: str, *, env: dict | None = None, timeout: float = 600) -> float:
    """Peak resident memory (MiB) of ``python -c code`` run in a fresh subprocess.

    ``RUSAGE_CHILDREN`` reports the largest child waited for so far, so each measurement runs in
    its own short-lived wrapper process whose only child is the measured one; that keeps earlier
    measurements (and this process) out of the number.
    """
    wrapper = (
        "import resource, subprocess, sys\n"
        "subprocess.run([sys.executable, '-c', sys.argv[1]], check=True)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    proc = subprocess.run([sys.executable, "-c", wrapper, code], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed: {proc.stderr.strip().splitlines()[-1:]}")
    kib = int(proc.stdout.strip().splitlines()[-1])
    # Linux reports KiB, macOS bytes.
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide the speed, without importing heavy ones needlessly."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    try:
        versions["gdal"] = importlib.import_module("rasterio").__gdal_version__
    except ImportError:
        pass
    return versions


def machine_info() -> dict[str, Any]:
    """The machine a result was measured on: platform, CPUs, memory, date, library versions."""
    from pipeline.engine_choice import cpu_identity
    from pipeline.engines import cpu_flags

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        # The CPU kind decides which engine is fastest (AMX, AVX-512 BF16, AVX2): name it.
        "cpu_model": cpu_identity()["model"],
        "cpu_flags": [f for f in sorted(cpu_flags() or ()) if f.startswith(("avx", "amx"))],
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "keras_backend": os.environ.get("KERAS_BACKEND", "tensorflow"),
        "versions": library_versions(),
    }
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # psutil is a dependency, but a bare GPU box may lack it
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                  / 2**30, 1)
    return info


def write_result(out_dir: Path, name: str, result: dict) -> Path:
    """Write one benchmark's result as ``out_dir/<name>.json`` with the machine attached."""
    from pipeline.files import write_json

    payload = {"benchmark": name, "machine": machine_info(), **result}
    return write_json(Path(out_dir) / f"{name}.json", payload)


def read_result(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# === Inputs ===

def make_scene(path: Path, size: int | tuple[int, int], *, seed: int = 0, bands: int = 3,
               cars: int | None = None) -> Path:
    """Write a synthetic uint8 RGB orthophoto (grey ground with bright car-sized boxes).

    The pixels are cheap to make and deterministic for a seed, so benchmarks and tests can build
    scenes of any size without the sample generator.
    """
    import rasterio
    from affine import Affine
    from rasterio.crs import CRS

    rows, cols = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    data = rng.integers(60, 110, size=(bands, rows, cols), dtype=np.uint8)
    n = cars if cars is not None else max(1, rows * cols // 4000)
    for _ in range(n):
        r, c = int(rng.integers(0, max(1, rows - 14))), int(rng.integers(0, max(1, cols - 32)))
        data[:, r:r + 13, c:c + 30] = rng.integers(150, 250, size=(bands, 1, 1), dtype=np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(driver="GTiff", width=cols, height=rows, count=bands, dtype="uint8",
                   crs=CRS.from_epsg(32633), transform=Affine(0.15, 0, 500000, 0, -0.15, 4000000),
                   nodata=0, compress="deflate", tiled=True, blockxsize=256, blockysize=256)
    if rows < 256 or cols < 256:
        profile.update(tiled=False)
        profile.pop("blockxsize")
        profile.pop("blockysize")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def make_bundle(model_dir: Path, *, bands: int = 3, depth: int = 1, base_filters: int = 4,
                chip_size: int = 64, seed: int = 0) -> Path:
    """Save a small untrained U-Net as a complete model bundle (for predict benchmarks/tests).

    The weights are random but seeded, so every process that loads the bundle computes the same
    probabilities.
    """
    import keras

    from pipeline.bundle import save_bundle
    from pipeline.model import build_unet

    keras.utils.set_random_seed(seed)
    model = build_unet(bands, depth=depth, base_filters=base_filters, batch_norm=False,
                       dropout=0.0)
    metadata = {
        "bands": list(range(1, bands + 1)),
        "dtype": "uint8",
        "normalization": {"mean": [90.0] * bands, "std": [40.0] * bands},
        "gsd": 0.15,
        "chip_size": chip_size,
        "size_multiple": 2**depth,
        "threshold": 0.5,
        "train_config": {"depth": depth, "base_filters": base_filters, "batch_norm": False},
        "val_metrics": {},
        "versions": library_versions(),
        "data_fingerprint": "synthetic",
        "keras_backend": keras.backend.backend(),
    }
    return save_bundle(model, metadata, model_dir)


def prepare_chips(data: Path, work: Path, cfg) -> tuple[Path, Path]:
    """Tile, rasterize and index a sample's training scenes the way ``make`` does.

    Returns:
        (chips folder, masks folder) under ``work``.
    """
    from pipeline.io import list_vectors
    from pipeline.scenes import list_scenes
    from pipeline.stages.rasterize import load_labels, rasterize_scene
    from pipeline.stages.tile import build_index, tile_scene

    chips, masks = work / "chips", work / "masks"
    for scene in list_scenes(data / "raw" / "images"):
        tile_scene(scene, chips, cfg=cfg.tile)
    labels = load_labels(list_vectors(data / "raw" / "labels"), cfg=cfg.labels)
    for index in sorted(chips.glob("*/chips.gpkg")):
        rasterize_scene(index, labels, masks, cfg=cfg.labels)
    build_index(chips, masks, cfg=cfg.tile)
    return chips, masks
