"""Tiling throughput and memory: ``tile_scene`` next to a plain read and ``gdal_retile.py``.

``run(workdir, size=20000)`` writes a ``size`` x ``size`` x 3 uint8 tiled, deflate-compressed
GeoTIFF (a repeating noise block, so it is cheap to make), then measures in MPix/s of the scene:

- ``read``: a window-by-window read of every block (the floor any tiler pays),
- ``tile``: ``pipeline.stages.tile.tile_scene`` with chip 256 / overlap 32, each run in a fresh
  subprocess whose peak resident memory is ``ru_maxrss`` of ``RUSAGE_CHILDREN``; the time
  excludes the interpreter start and imports (gdal_retile's includes its own, ~0.2 s),
- ``gdal_retile``: ``gdal_retile.py -ps 256 256 -overlap 32`` with the chips' own compression
  (``pipeline.stages.tile.CHIP_COMPRESSION``), so both write the same files.

The two alternate, run by run, and the speed-up is the median of the pairs' ratios. Times are
medians of ``repeats`` runs; CPU seconds (every process of a run) are reported beside them, as
they say what a run costs whatever else the machine is doing. Peak memory is given for the
largest process and for all of tile_scene's processes together (an upper bound).
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
import json, resource, sys, time
from pathlib import Path
import geopandas as gpd
from pipeline.config import TileConfig
import pipeline.stages.tile as tile
from pipeline.stages.tile import tile_scene
_count = tile._processes
tile_processes = 1
def _counted(*args):
    global tile_processes
    tile_processes = _count(*args)
    return tile_processes
tile._processes = _counted
cpu0 = sum(getattr(resource.getrusage(resource.RUSAGE_SELF), f) for f in ("ru_utime", "ru_stime"))
start = time.perf_counter()
gpkg = tile_scene(Path(sys.argv[1]), Path(sys.argv[2]),
                  cfg=TileConfig(chip_size={chip}, overlap={overlap}, min_valid_fraction=0.0))
seconds = time.perf_counter() - start
own, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
print(json.dumps({{"seconds": seconds, "chips": len(gpd.read_file(gpkg)),
                   "cpu_s": own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime - cpu0,
                   "self_rss_kb": own.ru_maxrss, "worker_rss_kb": kids.ru_maxrss,
                   "processes": tile_processes}}))
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
    result["peak_rss_mb"] = result.pop("maxrss_kb") / 1024  # Linux reports KiB: the largest
    # All processes together, at most: the parent's peak and every worker at the largest's
    # (an upper bound: forked workers share the parent's pages, counted here twice).
    workers = result["processes"] if result["processes"] > 1 else 0
    result["peak_rss_sum_mb"] = (result.pop("self_rss_kb")
                                 + workers * result.pop("worker_rss_kb")) / 1024
    return result


def retile_once(path: Path, out: Path) -> tuple[float, float] | str:
    """(seconds, CPU seconds) of gdal_retile.py with the same chip size, overlap, compression."""
    exe = shutil.which("gdal_retile.py")
    if exe is None:
        return "unavailable"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    from pipeline.stages.tile import CHIP_COMPRESSION

    # The chips' own creation options, so both write the same files.
    options = {"COMPRESS": CHIP_COMPRESSION["compress"].upper(), "TILED": "YES",
               **{k.upper(): str(v) for k, v in CHIP_COMPRESSION.items() if k != "compress"}}
    cmd = [exe, "-q", "-ps", str(CHIP), str(CHIP), "-overlap", str(OVERLAP)]
    for key, value in options.items():
        cmd += ["-co", f"{key}={value}"]
    cmd += ["-targetDir", str(out), str(path)]
    before = _children_cpu()
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        return f"failed: {last}"
    return seconds, _children_cpu() - before


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(workdir: Path, *, size: int = 20000, repeats: int = 3) -> dict:
    """Generate the scene and measure read, tile_scene and gdal_retile throughput and memory.

    tile_scene and gdal_retile run alternately (tile, retile, tile, retile, ...), so a change in
    the machine's load hits both; the speed-up is the median of the per-pair ratios, and the CPU
    seconds of each (all its processes) are reported too, as they hardly depend on the load.

    Args:
        workdir: scratch folder (the scene and chips are written here and removed at the end).
        size: scene width and height in pixels.
        repeats: pairs of runs (medians).

    Returns:
        A flat dict of results (MPix/s, seconds, CPU seconds, MiB, chip counts, notes).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mpix = size * size / 1e6
    start = time.perf_counter()
    scene = make_scene(workdir / "bench_scene.tif", size)
    generate_s = time.perf_counter() - start
    tiles, retile = [], []
    try:
        read_times = [read_all(scene) for _ in range(repeats)]
        for _ in range(repeats):
            tiles.append(tile_once(scene, workdir / "chips"))
            retile.append(retile_once(scene, workdir / "retile"))
    finally:
        for p in (scene, workdir / "chips", workdir / "retile"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()
    tile_s = statistics.median(t["seconds"] for t in tiles)
    read_s = statistics.median(read_times)
    peak = max(t["peak_rss_mb"] for t in tiles)
    peak_sum = max(t["peak_rss_sum_mb"] for t in tiles)
    result = {
        "size": size, "megapixels": mpix, "chip_size": CHIP, "overlap": OVERLAP,
        "chips": tiles[0]["chips"], "generate_s": generate_s, "cpus": os.cpu_count(),
        "load_avg_1min": os.getloadavg()[0],
        "read_s": read_s, "read_mpix_s": mpix / read_s,
        "tile_s": tile_s, "tile_mpix_s": mpix / tile_s, "tile_runs_s": [t["seconds"] for t in tiles],
        "tile_cpu_s": statistics.median(t["cpu_s"] for t in tiles),
        "tile_cpu_ms_per_chip": 1000 * statistics.median(t["cpu_s"] for t in tiles)
        / tiles[0]["chips"],
        "tile_processes": tiles[0]["processes"],
        "tile_peak_rss_mb": peak, "tile_peak_rss_all_processes_mb": peak_sum,
        "tile_memory_under_1gb": peak_sum < MEMORY_LIMIT_MB,
        "tile_vs_read": read_s / tile_s, "repeats": repeats,
    }
    pairs = [(t["seconds"], r) for t, r in zip(tiles, retile, strict=True)
             if not isinstance(r, str)]
    if pairs:
        retile_s = statistics.median(r[0] for _, r in pairs)
        result.update(gdal_retile_s=retile_s, gdal_retile_mpix_s=mpix / retile_s,
                      gdal_retile_runs_s=[r[0] for _, r in pairs],
                      gdal_retile_cpu_s=statistics.median(r[1] for _, r in pairs),
                      tile_speedup_vs_gdal_retile=statistics.median(r[0] / t for t, r in pairs))
        result["tile_cpu_vs_gdal_retile_cpu"] = result["tile_cpu_s"] / result["gdal_retile_cpu_s"]
        # Per pair too: the two runs of a pair saw the same load.
        result["tile_cpu_vs_gdal_retile_cpu_pairs"] = statistics.median(
            t["cpu_s"] / r[1] for t, r in zip(tiles, retile, strict=True) if not isinstance(r, str))
        result["gdal_retile_cpu_ms_per_chip"] = 1000 * result["gdal_retile_cpu_s"] / tiles[0]["chips"]
    else:
        result["gdal_retile_mpix_s"] = retile[0]
    return result


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
        print(json.dumps(run(Path(tmp), size=n), indent=2))
