"""Prediction: speed against the path before issue 14, against one bare forward pass, and memory.

For the default model configuration (``build_unet`` with ``TrainConfig`` defaults, untrained) on
the CPU, end to end (read, normalise, infer, blend, write COGs), medians of alternating runs:

* ``baseline``: 256 px windows (the training chip), overlap 64, float32, i.e. the path before
  issue 14; ``big_window_float32``: the default window and receptive-field overlap in float32;
  ``big_window_keras_bf16``: the same in Keras bfloat16 (only on a CPU with bf16 instructions);
  ``default``: the defaults, engine and precision included (Keras bfloat16 on a CPU with bf16
  instructions, ONNX Runtime float32 on one without AVX-512);
* ``speedup_default_vs_baseline`` (target >= 2.0);
* ``speedup_default_model_only``: Keras float32 alone over the defaults alone (engine and
  precision), each pixel once;
* ``default_over_one_pass``: the default end-to-end time over the model alone computing each of
  the scene's pixels once (no overlap) at the same precision (target <= 1.25): overlap,
  reading, stitching and writing together;
* peak resident memory of a fresh subprocess predicting with the default U-Net, and with a tiny
  U-Net (depth 1, 4 filters) scenes of each of ``sizes`` px a side (target < 2 GB, and flat:
  the largest over the smallest near 1). The default U-Net would need hours for 20000^2 px on a
  2-core CPU; there memory is about reading, stitching and writing, not the model, and the
  result says so.
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


def _default_bundle(model_dir: Path, **unet) -> Path:
    """Save the default-config U-Net (untrained) as a bundle, as train would.

    ``unet`` overrides ``TrainConfig`` fields (depth, base_filters) for a smoke run.
    """
    import keras

    from pipeline.bundle import save_bundle
    from pipeline.config import TileConfig, TrainConfig
    from pipeline.model import build_unet

    train = TrainConfig(**unet)
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


def _one_pass_seconds(scene: Path, model_dir: Path, cfg, repeats: int = 1) -> tuple[float, int]:
    """Time the model alone over the scene's pixels once: tiles of the predict window, no overlap.

    This is the floor for any tiled prediction of the scene with this model and precision.
    """
    import rasterio
    from rasterio.plot import reshape_as_image

    from pipeline.geo import axis_windows
    from pipeline.stages.predict import (
        MAX_BATCH_PIXELS,
        _Predictor,
        get_bundle,
        window_geometry,
    )

    bundle = get_bundle(model_dir, cfg.precision, cfg.engine)
    geom = window_geometry(cfg, bundle.metadata, bundle.receptive_field)
    with rasterio.open(scene) as src:
        image = reshape_as_image(src.read(bundle.bands))
    # No overlap: each pixel once, in lattice-sized windows as the real run uses.
    lay_h, lay_w = (axis_windows(n, geom.window, 0, edge="past", multiple=geom.multiple)
                    for n in image.shape[:2])
    win_h, rows, win_w, cols = lay_h.size, lay_h.starts, lay_w.size, lay_w.starts
    batch = max(1, min(cfg.batch_size, MAX_BATCH_PIXELS // (win_h * win_w)))
    cells = []
    for row in rows:
        for col in cols:
            cell = image[row:row + win_h, col:col + win_w]
            pad = ((0, win_h - cell.shape[0]), (0, win_w - cell.shape[1]), (0, 0))
            cells.append(bundle.prepare(np.pad(cell, pad, mode="symmetric")))
    batches = [np.stack(cells[i:i + batch]) for i in range(0, len(cells), batch)]
    predictor = _Predictor(bundle.model, batch, cfg.tta)
    predictor(batches[0])  # trace outside the timing, as the end-to-end run is warmed too
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for b in batches:
            predictor(b)
        times.append(time.perf_counter() - start)
    return statistics.median(times), len(cells)


def _memory_probe(scene: Path, model_dir: Path, out_dir: Path) -> tuple[float, float]:
    """Peak RSS (MiB) and wall time of predicting ``scene`` in a fresh subprocess."""
    code = (
        "import time\n"
        "from pathlib import Path\n"
        "from pipeline.config import PredictConfig\n"
        "from pipeline.stages.predict import get_bundle, predict_scene\n"
        "cfg = PredictConfig()\n"
        f"get_bundle(Path({str(model_dir)!r}), cfg.precision, cfg.engine)\n"
        "t = time.perf_counter()\n"
        f"predict_scene(Path({str(scene)!r}), Path({str(model_dir)!r}), Path({str(out_dir)!r}),"
        " cfg=PredictConfig())\n"
        f"Path({str(out_dir / 'seconds.txt')!r}).write_text(str(time.perf_counter() - t))\n"
    )
    mib = peak_rss_mb(code, env={"TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=3600)
    return mib, float((out_dir / "seconds.txt").read_text())


def memory_scaling(workdir: Path, sizes: tuple[int, ...] = (4000, 20000)) -> dict:
    """Peak RSS of predicting scenes of ``sizes`` with a tiny U-Net, each in a fresh subprocess."""
    tiny_dir = workdir / "model_tiny"
    make_bundle(tiny_dir, depth=1, base_filters=4, chip_size=256)
    memory = {"model": "tiny U-Net (depth 1, 4 filters), default window: memory is about "
                       "reading and stitching, not the model; the default U-Net would take hours "
                       "at 20000^2 on a CPU. One chunk of windows and an overlap-row seam are "
                       "held: memory is flat in the scene's height and width",
              "target_mb": 2048, "runs": {}}
    for size in sizes:
        big = _big_scene(workdir / "scenes" / f"big_{size}.tif", size)
        mib, seconds = _memory_probe(big, tiny_dir, workdir / f"out_mem_{size}")
        memory["runs"][str(size)] = {"peak_rss_mb": round(mib, 1), "seconds": round(seconds, 2),
                                     "mpix_per_s": round(size**2 / 1e6 / seconds, 3)}
    small, large = (memory["runs"][str(s)]["peak_rss_mb"] for s in (sizes[0], sizes[-1]))
    memory["large_over_small"] = round(large / small, 3)
    memory["ok"] = large < 2048
    return memory


# The path before issue 14: chip-sized windows, the old fixed overlap, float32.
BASELINE = {"window": 256, "overlap": 64, "precision": "float32", "engine": "keras"}


def run(workdir: Path, *, sizes: tuple[int, ...] = (4000, 20000),
        throughput_size: int = 2048, repeats: int = 3, unet: dict | None = None,
        probe_default_memory: bool = True) -> dict:
    """Measure prediction speed and memory; returns the result dict (also logged).

    Args:
        workdir: scratch folder for scenes, bundles and outputs.
        sizes: scene sizes (pixels per side) for the memory comparison, smallest first.
        throughput_size: side of the scene the default U-Net predicts for MPix/s and ratios.
        repeats: timed runs of each (the median is reported).
        unet: ``TrainConfig`` overrides for the measured U-Net (``make bench --quick``'s smoke
            run uses a small one; the real run measures the default).
        probe_default_memory: measure that U-Net's peak memory in a fresh process too.
    """
    from pipeline.config import PredictConfig
    from pipeline.engines import cpu_bf16_flags
    from pipeline.stages.predict import get_bundle, predict_scene, window_geometry

    workdir = Path(workdir)
    configs = {
        "baseline": PredictConfig(**BASELINE),
        "big_window_float32": PredictConfig(engine="keras", precision="float32"),
        "big_window_keras_bf16": PredictConfig(engine="keras", precision="bfloat16"),
        "default": PredictConfig(),
    }
    if not cpu_bf16_flags():
        # Emulated bf16 is slower than float32 (13.4 vs 9.2 s on an AVX2 EPYC); not worth timing.
        configs.pop("big_window_keras_bf16")
    bundle_dir = workdir / "model_default"
    _default_bundle(bundle_dir, **(unet or {}))
    geometry = {}
    for name, cfg in list(configs.items()):
        bundle = get_bundle(bundle_dir, cfg.precision, cfg.engine)
        g = window_geometry(cfg, bundle.metadata, bundle.receptive_field)
        geometry[name] = {"window": g.window, "overlap": g.overlap, "margin": g.margin,
                          "precision": bundle.metadata["inference_precision"],
                          "engine": bundle.metadata["inference_engine"]}
        if name != "default":
            continue
        same = [k for k in ("big_window_keras_bf16", "big_window_float32")
                if geometry.get(k) == geometry[name]]
        if same:
            configs.pop(name)  # the defaults resolve to a variant already measured
            geometry[name]["same_as"] = same[0]
    result: dict = {"predict_config": PredictConfig().model_dump(mode="json"),
                    "cpu_bf16_flags": cpu_bf16_flags(), "geometry": geometry}

    # === Throughput: baseline vs big windows vs big windows at the default precision ===
    scene = make_scene(workdir / "scenes" / f"scene_{throughput_size}.tif", throughput_size)
    for name, cfg in configs.items():  # warm: model load and tracing
        predict_scene(scene, bundle_dir, workdir / f"out_{name}", cfg=cfg)
    # Alternate the measurements so load from other processes hits them alike.
    times: dict[str, list[float]] = {name: [] for name in configs}
    one_pass: dict[str, list[float]] = {"float32": [], "default": []}
    # The floor is the model alone at what the defaults resolve to (engine and precision): on a
    # CPU without bf16 that is float32, and a bf16 floor would flatter the ratio.
    fastest = configs.get("default") or configs[geometry["default"]["same_as"]]
    for _ in range(repeats):
        for name, cfg in configs.items():
            start = time.perf_counter()
            predict_scene(scene, bundle_dir, workdir / f"out_{name}", cfg=cfg)
            times[name].append(time.perf_counter() - start)
        one_pass["float32"].append(_one_pass_seconds(scene, bundle_dir,
                                                     configs["big_window_float32"])[0])
        seconds, tiles = _one_pass_seconds(scene, bundle_dir, fastest)
        one_pass["default"].append(seconds)
    med = {name: statistics.median(t) for name, t in times.items()}
    if "default" not in med:
        med["default"] = med[geometry["default"]["same_as"]]
    once = {name: statistics.median(t) for name, t in one_pass.items()}
    mpix = throughput_size**2 / 1e6
    result["throughput"] = {
        "model": ("build_unet(TrainConfig defaults: depth 4, base_filters 32, batch_norm), "
                  "untrained" if not unet else f"build_unet(TrainConfig with {unet}), untrained"),
        "scene_px": throughput_size, "repeats": repeats,
        **{f"{name}_s": round(t, 3) for name, t in med.items()},
        **{f"{name}_mpix_per_s": round(mpix / t, 4) for name, t in med.items()},
        "one_pass_float32_s": round(once["float32"], 3),
        "one_pass_default_s": round(once["default"], 3), "one_pass_tiles": tiles,
        "speedup_default_vs_baseline": round(med["baseline"] / med["default"], 3),
        "speedup_big_window_vs_baseline": round(med["baseline"] / med["big_window_float32"], 3),
        "speedup_default_model_only": round(once["float32"] / once["default"], 3),
        "default_over_one_pass": round(med["default"] / once["default"], 3),
        "baseline_over_one_pass_float32": round(med["baseline"] / once["float32"], 3),
        "targets": {"speedup_default_vs_baseline": ">= 2.0", "default_over_one_pass": "<= 1.25"},
    }
    if "big_window_keras_bf16" in med:
        result["throughput"]["speedup_keras_bf16_vs_baseline"] = round(
            med["baseline"] / med["big_window_keras_bf16"], 3)
    # Peak memory of the default U-Net at the default window and batch, in a fresh process.
    if probe_default_memory:
        mib, _ = _memory_probe(scene, bundle_dir, workdir / "out_mem_default")
        result["throughput"]["default_peak_rss_mb"] = round(mib, 1)

    if sizes:
        result["memory"] = memory_scaling(workdir, sizes)
    log.info("bench_predict: %s", json.dumps(result))
    return result


if __name__ == "__main__":
    import sys
    import tempfile

    logging.basicConfig(level=logging.INFO)
    sizes = tuple(int(s) for s in sys.argv[1:]) or (4000, 20000)
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run(Path(tmp), sizes=sizes), indent=2))  # noqa: T201
