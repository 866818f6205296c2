"""Tiling throughput and memory: ``tile_scene`` next to a plain read and ``gdal_retile.py``.

``run(workdir, size=20000)`` writes a ``size`` x ``size`` x 3 uint8 tiled, deflate-compressed
GeoTIFF (a repeating noise block, so it is cheap to make), then measures in MPix/s of the scene:

- ``read``: a window-by-window read of every block (the floor any tiler pays),
- ``tile``: ``pipeline.tile.tile_scene`` with chip 256 / overlap 32, each run in a fresh
  subprocess whose peak resident memory is ``ru_maxrss`` of ``RUSAGE_CHILDREN``; the time
  excludes the interpreter start and imports (gdal_retile's includes its own, ~0.2 s),
- ``gdal_retile``: ``gdal_retile.py -ps 256 256 -overlap 32`` with the chips' own compression
  (``pipeline.tile.CHIP_COMPRESSION``), so both write the same files.

Times are medians of ``repeats`` runs; gdal_retile gets one run on big scenes (it is slow).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CHIP, OVERLAP = 256, 32
MEMORY_LIMIT_MB = 1024

_TILE_CODE = """
import json, sys, time
from pathlib import Path
import geopandas as gpd
from pipeline.config import TileConfig
from pipeline.tile import tile_scene
start = time.perf_counter()
gpkg = tile_scene(Path(sys.argv[1]), Path(sys.argv[2]),
                  cfg=TileConfig(chip_size={chip}, overlap={overlap}, min_valid_fraction=0.0))
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "chips": len(gpd.read_file(gpkg))}}))
"""


def make_scene(path: Path, size: int, *, block: int = 256, seed: int = 0) -> Path:
    """Write a ``size`` x ``size`` x 3 uint8 tiled deflate GeoTIFF block by block."""
    import rasterio
    from affine import Affine
    from rasterio.windows import Window

    rng = np.random.default_rng(seed)
    # Low-entropy noise over a gradient: compresses like imagery, costs nothing to make.
    noise = (rng.integers(0, 48, (3, block, block)) + np.linspace(40, 200, block)[None, None, :]
             ).astype(np.uint8)
    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                   crs="EPSG:32633", transform=Affine(0.15, 0, 500000, 0, -0.15, 4000000),
                   tiled=True, blockxsize=block, blockysize=block, compress="deflate", zlevel=1,
                   BIGTIFF="IF_SAFER", num_threads="all_cpus")
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(0, size, block):
            for col in range(0, size, block):
                h, w = min(block, size - row), min(block, size - col)
                dst.write(noise[:, :h, :w], window=Window(col, row, w, h))
    return path


def read_all(path: Path) -> float:
    """Seconds to read every block of the scene, window by window."""
    import rasterio

    start = time.perf_counter()
    # A small block cache keeps this process small (GDAL's default is 5% of RAM).
    with rasterio.Env(GDAL_CACHEMAX=64), rasterio.open(path) as src:
        for _, window in src.block_windows(1):
            src.read(window=window)
    return time.perf_counter() - start


_WRAPPER = """
import json, resource, subprocess, sys
proc = subprocess.run([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], capture_output=True,
                      text=True)
if proc.returncode:
    sys.stderr.write(proc.stderr)
    sys.exit(proc.returncode)
result = json.loads(proc.stdout.strip().splitlines()[-1])
result["maxrss_kb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps(result))
"""


def tile_once(path: Path, out: Path) -> dict:
    """tile_scene in a fresh subprocess: its seconds, chips and peak RSS (MiB).

    The measured process is started by a tiny wrapper, whose RUSAGE_CHILDREN then holds only
    it: a child forked straight from this (large) process would be charged this process's pages.
    """
    shutil.rmtree(out, ignore_errors=True)
    code = _TILE_CODE.format(chip=CHIP, overlap=OVERLAP)
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, code, str(path), str(out)],
                          capture_output=True, text=True, check=False,
                          cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"tile_scene failed: {proc.stderr.strip().splitlines()[-1:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["peak_rss_mb"] = result.pop("maxrss_kb") / 1024  # Linux reports KiB
    return result


def retile_once(path: Path, out: Path) -> float | str:
    """Seconds for gdal_retile.py with the same chip size, overlap and compression."""
    exe = shutil.which("gdal_retile.py")
    if exe is None:
        return "unavailable"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    from pipeline.tile import CHIP_COMPRESSION

    # The chips' own creation options, so both write the same files.
    options = {"COMPRESS": CHIP_COMPRESSION["compress"].upper(), "TILED": "YES",
               **{k.upper(): str(v) for k, v in CHIP_COMPRESSION.items() if k != "compress"}}
    cmd = [exe, "-q", "-ps", str(CHIP), str(CHIP), "-overlap", str(OVERLAP)]
    for key, value in options.items():
        cmd += ["-co", f"{key}={value}"]
    cmd += ["-targetDir", str(out), str(path)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        return f"failed: {last}"
    return seconds


def run(workdir: Path, *, size: int = 20000, repeats: int = 3) -> dict:
    """Generate the scene and measure read, tile_scene and gdal_retile throughput and memory.

    Args:
        workdir: scratch folder (the scene and chips are written here and removed at the end).
        size: scene width and height in pixels.
        repeats: runs per measurement (median); gdal_retile runs once above 4000 x 4000.

    Returns:
        A flat dict of results (MPix/s, seconds, MiB, chip counts, notes).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mpix = size * size / 1e6
    start = time.perf_counter()
    scene = make_scene(workdir / "bench_scene.tif", size)
    generate_s = time.perf_counter() - start
    try:
        read_times = [read_all(scene) for _ in range(repeats)]
        tiles = [tile_once(scene, workdir / "chips") for _ in range(repeats)]
        retile_repeats = repeats if size <= 4000 else 1
        retile = [retile_once(scene, workdir / "retile") for _ in range(retile_repeats)]
    finally:
        for p in (scene, workdir / "chips", workdir / "retile"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()
    tile_s = statistics.median(t["seconds"] for t in tiles)
    read_s = statistics.median(read_times)
    peak = max(t["peak_rss_mb"] for t in tiles)
    result = {
        "size": size, "megapixels": mpix, "chip_size": CHIP, "overlap": OVERLAP,
        "chips": tiles[0]["chips"], "generate_s": generate_s, "cpus": os.cpu_count(),
        "read_s": read_s, "read_mpix_s": mpix / read_s,
        "tile_s": tile_s, "tile_mpix_s": mpix / tile_s, "tile_runs_s": [t["seconds"] for t in tiles],
        "tile_peak_rss_mb": peak, "tile_memory_under_1gb": peak < MEMORY_LIMIT_MB,
        "tile_vs_read": read_s / tile_s, "repeats": repeats,
    }
    numeric = [r for r in retile if isinstance(r, float)]
    if numeric:
        retile_s = statistics.median(numeric)
        result.update(gdal_retile_s=retile_s, gdal_retile_mpix_s=mpix / retile_s,
                      gdal_retile_runs=len(numeric), tile_speedup_vs_gdal_retile=retile_s / tile_s)
        if len(numeric) < repeats:
            result["note"] = f"gdal_retile measured {len(numeric)} time(s): it is slow at this size"
    else:
        result["gdal_retile_mpix_s"] = retile[0]
    return result


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
        print(json.dumps(run(Path(tmp), size=n), indent=2))
