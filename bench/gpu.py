"""Throughput on whatever accelerator is present (``make bench-gpu``; runs on CPU with ``--quick``).

Measures, on the default U-Net (``TrainConfig`` defaults) at 256x256:

* training chips/s in float32 and in mixed precision, fed once by the real input pipeline
  (``ChipDataset`` with augmentation, through ``model.fit``) and once by in-memory arrays
  (``train_on_batch`` on one batch), so the gap between the two is the input pipeline's cost;
* prediction MPix/s end to end (``predict_scene`` on a generated scene: read, normalise, windows,
  blend, write COGs) next to the bare forward pass on the same windows;
* accelerator memory in use (JAX ``memory_stats`` where the device reports it).

Defaults to ``KERAS_BACKEND=jax``: GPU machines here carry JAX but not TensorFlow.

    python -m bench.gpu [--quick] [--out reports/bench]
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# JAX grabs 75% of GPU memory up front by default, which hides what the model really needs.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

log = logging.getLogger(__name__)


def device_info() -> dict:
    """The accelerator Keras runs on, in words, with its memory where the backend reports it."""
    import keras

    backend = keras.backend.backend()
    info: dict = {"keras_backend": backend}
    if backend == "jax":
        import jax

        dev = jax.devices()[0]
        info.update(platform=dev.platform, device_kind=getattr(dev, "device_kind", str(dev)),
                    device_count=jax.device_count())
        stats = _memory_stats()
        if stats.get("bytes_limit"):
            info["memory_gb"] = round(stats["bytes_limit"] / 2**30, 1)
    elif backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        info.update(platform="gpu" if gpus else "cpu", device_count=max(1, len(gpus)),
                    device_kind=(tf.config.experimental.get_device_details(gpus[0]).get(
                        "device_name", "GPU") if gpus else "CPU"))
    else:
        info.update(platform="unknown", device_kind="unknown", device_count=1)
    return info


def _memory_stats() -> dict:
    try:
        import jax

        return jax.devices()[0].memory_stats() or {}
    except Exception:  # CPU devices and some plugins report nothing, or raise
        return {}


def memory_used() -> dict:
    """Bytes in use and peak bytes on the first device, in MiB (empty when not reported)."""
    stats = _memory_stats()
    out = {}
    for key in ("bytes_in_use", "peak_bytes_in_use"):
        if key in stats:
            out[key.replace("bytes", "mb")] = round(stats[key] / 2**20, 1)
    return out


# === Training ===

def train_throughput(workdir: Path, *, chip_size: int, batch_size: int, steps: int,
                     depth: int, base_filters: int, mixed: bool, chips: int) -> dict:
    """Chips/s of one precision, fed by the input pipeline and by in-memory arrays."""
    from bench.bench_train import NORMALIZATION, build_model, make_chips, train_step_chips_per_s
    from pipeline.config import AugmentConfig, TrainConfig
    from pipeline.dataset import ChipDataset

    folder = workdir / f"chips{chip_size}"
    records = make_chips(folder, n=chips, size=chip_size)
    dataset = ChipDataset(records, NORMALIZATION, batch_size=batch_size, augment=AugmentConfig(),
                          positive_fraction=TrainConfig().positive_fraction, steps=steps,
                          cache=True, seed=0)
    model = build_model(bands=3, depth=depth, base_filters=base_filters, mixed_precision=mixed)
    x, y = dataset[0]
    in_memory = train_step_chips_per_s(model, x, y, steps=steps, warmup=2)

    # The same compiled step fed by the real pipeline through fit(): the first (short) fit fills
    # the chip cache, the timed one measures steady state.
    model.fit(dataset, epochs=1, steps_per_epoch=min(2, steps), verbose=0)
    start = time.perf_counter()
    model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)
    fed = steps * batch_size / (time.perf_counter() - start)
    return {
        "precision": "mixed_float16" if mixed else "float32",
        "in_memory_chips_per_s": round(in_memory, 3),
        "pipeline_chips_per_s": round(fed, 3),
        "pipeline_share": round(fed / in_memory, 3),
        "memory": memory_used(),
    }


# === Prediction ===

def predict_throughput(workdir: Path, *, scene_size: int, depth: int, base_filters: int,
                       chip_size: int, repeats: int) -> dict:
    """MPix/s of ``predict_scene`` end to end and of the bare forward pass on its windows."""
    from bench.harness import make_bundle, make_scene
    from pipeline.bundle import read_metadata
    from pipeline.config import PredictConfig
    from pipeline.stages import predict
    model_dir = workdir / "model"
    make_bundle(model_dir, depth=depth, base_filters=base_filters, chip_size=chip_size)
    scene = make_scene(workdir / "scene.tif", scene_size, seed=1)
    cfg = PredictConfig()  # the defaults: window, receptive-field overlap, engine, precision
    mpix = scene_size * scene_size / 1e6

    def end_to_end(i: int) -> float:
        start = time.perf_counter()
        predict.predict_scene(scene, model_dir, workdir / f"pred{i}", cfg=cfg)
        return time.perf_counter() - start

    first = end_to_end(0)  # loads the bundle and compiles: reported apart
    e2e = statistics.median(end_to_end(i + 1) for i in range(repeats))

    # Bare forward pass: the same number of windows of the same size, already in memory.
    bundle = predict.get_bundle(model_dir, cfg.precision, cfg.engine)
    geometry = predict.window_geometry(cfg, read_metadata(model_dir), bundle.receptive_field)
    window, rows = predict._frame_axis(scene_size, 0, geometry)
    n_windows = len(rows) ** 2
    model = bundle.model
    batch_size = max(1, min(cfg.batch_size, predict.MAX_BATCH_PIXELS // window**2))
    batch = np.random.default_rng(0).normal(size=(batch_size, window, window, 3)).astype(
        np.float32)
    np.asarray(model.predict_on_batch(batch))  # compile
    batches = int(np.ceil(n_windows / batch_size))

    def forward() -> float:
        start = time.perf_counter()
        for _ in range(batches):
            out = model.predict_on_batch(batch)
        np.asarray(out)
        return time.perf_counter() - start

    bare = statistics.median(forward() for _ in range(repeats))
    return {
        "scene_size": scene_size,
        "window": window,
        "overlap": geometry.overlap,
        "precision": bundle.metadata["inference_precision"],
        "batch_size": batch_size,
        "windows": n_windows,
        "first_call_s": round(first, 3),
        "end_to_end_s": round(e2e, 3),
        "end_to_end_mpix_per_s": round(mpix / e2e, 3),
        # Forward MPix/s counts scene pixels too (windows overlap), so the two compare directly.
        "forward_mpix_per_s": round(mpix / bare, 3),
        "forward_window_mpix_per_s": round(batches * batch_size * window**2 / 1e6 / bare, 3),
        "end_to_end_share": round(bare / e2e, 3),
        "memory": memory_used(),
    }


def run(workdir: Path, *, quick: bool = False) -> dict:
    """All GPU measurements; ``quick`` shrinks everything so it runs on a CPU in seconds."""
    from bench.bench_train import on_accelerator
    from pipeline.config import TrainConfig

    tc = TrainConfig()
    accel = on_accelerator()
    if quick:
        # Tiny enough that JAX's compile on a CPU, not the measurement, is most of the time.
        sizes = dict(chip_size=32, batch_size=2, steps=1, depth=1, base_filters=4, chips=4)
        scene_size, repeats = 96, 1
    else:
        sizes = dict(chip_size=256, batch_size=tc.batch_size, steps=30 if accel else 2,
                     depth=tc.depth, base_filters=tc.base_filters, chips=64)
        scene_size, repeats = (8192 if accel else 1024), (3 if accel else 1)
    workdir = Path(workdir)
    training = {}
    for mixed in (False, True):
        result = train_throughput(workdir, mixed=mixed, **sizes)
        training[result["precision"]] = result
        log.info("train %s: %s", result["precision"], result)
    prediction = predict_throughput(workdir, scene_size=scene_size, depth=sizes["depth"],
                                    base_filters=sizes["base_filters"],
                                    chip_size=sizes["chip_size"], repeats=repeats)
    return {
        "device": device_info(),
        "accelerator": accel,
        "quick": quick,
        "train": {"chip_size": sizes["chip_size"], "batch_size": sizes["batch_size"],
                  "steps": sizes["steps"], "depth": sizes["depth"],
                  "base_filters": sizes["base_filters"], **training},
        "predict": prediction,
        "memory": memory_used(),
    }


def main(argv: list[str] | None = None) -> int:
    from bench.harness import write_result

    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    parser.add_argument("--out", type=Path, default=Path("reports/bench"), help="result folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        result = run(Path(tmp), quick=args.quick)
    path = write_result(args.out, "gpu", result)
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
