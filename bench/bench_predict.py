"""Prediction: throughput, overhead over the bare model, and peak memory against scene size.

Three numbers:

* MPix/s of ``predict_scene`` end to end (read, normalise, infer, blend, write COGs) for the
  default model configuration (``build_unet`` with ``TrainConfig`` defaults, untrained) on the
  CPU, at the default window and overlap;
* the ratio of that wall time to the model's bare forward passes over the same windows in the
  same batch shapes (target <= 1.10: reading, stitching and writing hide behind inference);
* peak resident memory of a fresh subprocess predicting a ``sizes[0]``^2 and a ``sizes[1]``^2
  scene (target < 2 GB, and the larger within 10% of the smaller: memory must not grow with the
  scene). The default U-Net would need hours for 20000^2 px on a 2-core CPU, so the memory runs
  use a tiny U-Net (depth 1, 4 filters) at the same 256 px window; memory is about the strips and
  the stitching, not the model, and the result says so.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np

from bench.harness import make_bundle, make_scene, peak_rss_mb

log = logging.getLogger(__name__)

NORMALIZATION = {"mean": [90.0, 90.0, 90.0], "std": [40.0, 40.0, 40.0]}


def _default_bundle(model_dir: Path) -> Path:
    """Save the default-config U-Net (untrained) as a bundle, as train would."""
    import keras

    from pipeline.config import TileConfig, TrainConfig
    from pipeline.model import build_unet, save_bundle

    train = TrainConfig()
    keras.utils.set_random_seed(0)
    model = build_unet(3, depth=train.depth, base_filters=train.base_filters,
                       batch_norm=train.batch_norm, dropout=train.dropout)
    metadata = {"bands": [1, 2, 3], "dtype": "uint8", "normalization": NORMALIZATION,
                "gsd": 0.15, "chip_size": TileConfig().chip_size, "size_multiple": 2**train.depth,
                "threshold": 0.5, "train_config": train.model_dump(mode="json"),
                "data_fingerprint": "bench-untrained", "keras_backend": keras.backend.backend()}
    return save_bundle(model, metadata, model_dir)


def _big_scene(path: Path, size: int, *, strip: int = 512) -> Path:
    """Write a ``size``^2 uint8 RGB scene strip by strip, so making it needs little memory."""
    import rasterio
    from affine import Affine
    from rasterio.crs import CRS

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pattern = rng.integers(60, 200, size=(3, strip, size), dtype=np.uint8)
    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                   crs=CRS.from_epsg(32633), transform=Affine(0.15, 0, 500000, 0, -0.15, 4000000),
                   nodata=0, tiled=True, blockxsize=256, blockysize=256, bigtiff="IF_SAFER")
    tmp = path.with_suffix(".tmp.tif")
    with rasterio.open(tmp, "w", **profile) as dst:
        for i, row in enumerate(range(0, size, strip)):
            n = min(strip, size - row)
            block = np.roll(pattern[:, :n], 37 * i, axis=2)
            dst.write(block, window=rasterio.windows.Window(0, row, size, n))
    tmp.replace(path)
    return path


def _bare_forward_seconds(scene: Path, model_dir: Path, cfg) -> tuple[float, int]:
    """Time the model alone on the exact windows and batch shapes predict_scene uses."""
    import rasterio
    from rasterio.plot import reshape_as_image

    from pipeline.predict import (
        _Predictor,
        _window_image,
        get_bundle,
        window_geometry,
        window_offsets,
    )

    bundle = get_bundle(model_dir)
    window, overlap = window_geometry(cfg, bundle.metadata)
    with rasterio.open(scene) as src:
        image = reshape_as_image(src.read(bundle.bands))
        rows = window_offsets(src.height, window, overlap)
        cols = window_offsets(src.width, window, overlap)
    predictor = _Predictor(bundle.model, cfg.batch_size, cfg.tta)
    # predict_scene batches one row of windows at a time; do the same so shapes match.
    batches = []
    for row in rows:
        strip = image[row:row + window]
        strip = np.pad(strip, ((0, window - len(strip)), (0, 0), (0, 0)), mode="symmetric")
        cells = [bundle.prepare(_window_image(strip, col, window)) for col in cols]
        batches += [np.stack(cells[i:i + cfg.batch_size])
                    for i in range(0, len(cells), cfg.batch_size)]
    n_windows = len(rows) * len(cols)
    predictor(batches[0])  # trace outside the timing, as the end-to-end run is warmed too
    start = time.perf_counter()
    for batch in batches:
        predictor(batch)
    return time.perf_counter() - start, n_windows


def _memory_probe(scene: Path, model_dir: Path, out_dir: Path) -> tuple[float, float]:
    """Peak RSS (MiB) and wall time of predicting ``scene`` in a fresh subprocess."""
    code = (
        "import time\n"
        "from pathlib import Path\n"
        "from pipeline.config import PredictConfig\n"
        "from pipeline.predict import get_bundle, predict_scene\n"
        f"get_bundle(Path({str(model_dir)!r}))\n"
        "t = time.perf_counter()\n"
        f"predict_scene(Path({str(scene)!r}), Path({str(model_dir)!r}), Path({str(out_dir)!r}),"
        " cfg=PredictConfig())\n"
        f"Path({str(out_dir / 'seconds.txt')!r}).write_text(str(time.perf_counter() - t))\n"
    )
    mib = peak_rss_mb(code, env={"TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=3600)
    return mib, float((out_dir / "seconds.txt").read_text())


def memory_scaling(workdir: Path, sizes: tuple[int, int] = (4000, 20000)) -> dict:
    """Peak RSS of predicting two scene sizes with a tiny U-Net, each in a fresh subprocess."""
    tiny_dir = workdir / "model_tiny"
    make_bundle(tiny_dir, depth=1, base_filters=4, chip_size=256)
    memory = {"model": "tiny U-Net (depth 1, 4 filters), window 256: memory is about stitching, "
                       "not the model; the default U-Net would take hours at 20000^2 on a CPU",
              "target_mb": 2048, "runs": {}}
    for size in sizes:
        big = _big_scene(workdir / "scenes" / f"big_{size}.tif", size)
        mib, seconds = _memory_probe(big, tiny_dir, workdir / f"out_mem_{size}")
        memory["runs"][str(size)] = {"peak_rss_mb": round(mib, 1), "seconds": round(seconds, 2),
                                     "mpix_per_s": round(size**2 / 1e6 / seconds, 3)}
    small, large = (memory["runs"][str(s)]["peak_rss_mb"] for s in sizes)
    memory["large_over_small"] = round(large / small, 3)
    memory["ok"] = large < 2048 and large <= 1.10 * small
    return memory


def run(workdir: Path, *, sizes: tuple[int, int] = (4000, 20000),
        throughput_size: int = 1024, repeats: int = 3) -> dict:
    """Measure prediction speed and memory; returns the result dict (also logged).

    Args:
        workdir: scratch folder for scenes, bundles and outputs.
        sizes: the two scene sizes (pixels per side) for the memory comparison.
        throughput_size: side of the scene the default U-Net predicts for MPix/s and overhead.
        repeats: timed runs of each (the median is reported).
    """
    from pipeline.config import PredictConfig
    from pipeline.predict import predict_scene

    workdir = Path(workdir)
    cfg = PredictConfig()
    result: dict = {"predict_config": cfg.model_dump(mode="json")}

    # === Throughput and overhead, default U-Net ===
    model_dir = workdir / "model_default"
    _default_bundle(model_dir)
    scene = make_scene(workdir / "scenes" / f"scene_{throughput_size}.tif", throughput_size)
    out = workdir / "out_default"
    predict_scene(scene, model_dir, out, cfg=cfg)  # warm: model load and tracing
    # Alternate the two measurements so load from other processes hits both alike.
    ends, bares = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        predict_scene(scene, model_dir, out, cfg=cfg)
        ends.append(time.perf_counter() - start)
        seconds, n_windows = _bare_forward_seconds(scene, model_dir, cfg)
        bares.append(seconds)
    end_to_end, bare = statistics.median(ends), statistics.median(bares)
    mpix = throughput_size**2 / 1e6
    result["throughput"] = {
        "model": "build_unet(TrainConfig defaults: depth 4, base_filters 32, batch_norm), untrained",
        "scene_px": throughput_size, "windows": n_windows,
        "end_to_end_s": round(end_to_end, 3), "bare_forward_s": round(bare, 3),
        "repeats": repeats,
        "mpix_per_s": round(mpix / end_to_end, 4),
        "model_mpix_per_s": round(mpix / bare, 4),
        "overhead_ratio": round(end_to_end / bare, 3), "overhead_target": 1.10,
    }

    result["memory"] = memory_scaling(workdir, sizes)
    log.info("bench_predict: %s", json.dumps(result))
    return result


if __name__ == "__main__":
    import sys
    import tempfile

    logging.basicConfig(level=logging.INFO)
    sizes = tuple(int(s) for s in sys.argv[1:3]) or (4000, 20000)
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run(Path(tmp), sizes=sizes), indent=2))  # noqa: T201
