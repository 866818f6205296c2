"""Batch throughput on Dask: scenes per minute with 1 and 2 worker processes on the same batch.

The work is the real stage function (``predict_scene`` with a saved U-Net bundle, else
``tile_scene`` when predict is not available) sent through ``pipeline.distributed.run_batch`` to a
``LocalCluster`` addressed as an existing scheduler, which is the path ``DASK_SCHEDULER`` takes.
Cluster start-up is reported apart from the batch time; the first batch on a fresh cluster (each
worker imports Keras and loads the model) is reported apart from the warm batches.
"""

from __future__ import annotations

import importlib
import logging
import shutil
import statistics
import time
from pathlib import Path

from bench.harness import make_bundle, make_scene

log = logging.getLogger(__name__)


def _stage(workdir: Path, model: str, stage: str):
    """The stage function to run and its extra arguments: predict when present, else tile."""
    from pipeline.config import PredictConfig, TileConfig

    predict = None
    if stage == "predict":
        try:
            predict = importlib.import_module("pipeline.stages.predict")
        except ImportError:
            log.warning("pipeline.stages.predict unavailable; measuring tile_scene instead")
    if predict is not None:
        model_dir = workdir / "model"
        if model == "default":
            make_bundle(model_dir, depth=4, base_filters=32, chip_size=256)
        else:
            make_bundle(model_dir, depth=2, base_filters=8, chip_size=128)
        return "predict", predict.predict_scene, (model_dir,), {"cfg": PredictConfig()}
    tile = importlib.import_module("pipeline.stages.tile")
    return "tile", tile.tile_scene, (), {"cfg": TileConfig()}


def _batch_seconds(func, scenes, args, kwargs, out: Path, address: str) -> float:
    from pipeline.config import DistributedConfig
    from pipeline.distributed import run_batch

    if out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    result = run_batch(func, scenes, args=(*args, out), kwargs=kwargs,
                       cfg=DistributedConfig(scheduler=address, retries=0))
    seconds = time.perf_counter() - start
    if result.failed:
        raise RuntimeError(f"benchmark batch failed: {result.failed}")
    return seconds


def run(workdir: Path, *, scenes: int = 4, size: int = 1024, workers: tuple[int, ...] = (1, 2),
        repeats: int = 1, model: str = "default", stage: str = "predict") -> dict:
    """Measure scenes per minute for each worker count on one batch of generated scenes.

    Args:
        workdir: scratch folder (scenes, model and outputs are written here).
        scenes: scenes in the batch.
        size: scene width and height in pixels.
        workers: worker-process counts to compare (threads_per_worker = 1).
        repeats: warm batches per worker count (median reported).
        model: "default" (the default U-Net) or "small" (depth 2, 8 filters).
        stage: "predict" (predict_scene with a saved bundle) or "tile" (tile_scene, which
            keeps Keras out of the workers: the quick smoke run uses it).

    Returns:
        ``{"stage", "scenes", "size", "results": {workers: {...}}, "speedup"}``.
    """
    from dask.distributed import LocalCluster

    workdir = Path(workdir)
    batch = [make_scene(workdir / "scenes" / f"s{i:02d}.tif", size, seed=i) for i in range(scenes)]
    stage, func, args, kwargs = _stage(workdir, model, stage)
    results: dict[str, dict] = {}
    for n in workers:
        start = time.perf_counter()
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                               dashboard_address=":0")
        startup = time.perf_counter() - start
        try:
            cold = _batch_seconds(func, batch, args, kwargs, workdir / f"out{n}",
                                  cluster.scheduler_address)
            warm = [_batch_seconds(func, batch, args, kwargs, workdir / f"out{n}",
                                   cluster.scheduler_address) for _ in range(max(1, repeats))]
        finally:
            cluster.close()
        seconds = statistics.median(warm)
        results[str(n)] = {
            "workers": n,
            "cluster_startup_s": round(startup, 3),
            "first_batch_s": round(cold, 3),
            "batch_s": round(seconds, 3),
            "scenes_per_min": round(scenes / seconds * 60, 2),
            "mpix_per_s": round(scenes * size * size / seconds / 1e6, 3),
        }
        log.info("%s: %d workers: %.1f scenes/min", stage, n, results[str(n)]["scenes_per_min"])
    base = results[str(workers[0])]["scenes_per_min"]
    return {
        "stage": stage,
        "model": model if stage == "predict" else None,
        "scenes": scenes,
        "size": size,
        "repeats": repeats,
        "results": results,
        "speedup": {k: round(v["scenes_per_min"] / base, 3) for k, v in results.items()},
    }
