"""Batches on a real Dask LocalCluster: same outputs as a serial run, failures retried and reported."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import rasterio
from conftest import PINNED

import pipeline.distributed
from bench.harness import make_bundle, make_scene
from pipeline.config import Config, DistributedConfig, PredictConfig, TileConfig
from pipeline.distributed import BatchResult, run_batch
from pipeline.errors import EXIT_PARTIAL, InputError
from pipeline.layout import Layout
from pipeline.runner import Job, run_stage

# Dask workers are fresh processes that cannot import this test module by name, so the helper
# functions below travel to them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def flaky(path: Path, marker_dir: Path) -> None:
    """Fail the first time for each item (a transient error), succeed after."""
    marker = Path(marker_dir) / f"{Path(path).stem}.tried"
    if not marker.exists():
        marker.write_text("1")
        raise RuntimeError(f"{path}: transient failure")
    (Path(marker_dir) / f"{Path(path).stem}.done").write_text("ok")


def always_fails(path: Path) -> None:
    raise RuntimeError(f"{Path(path).name}: broken beyond repair")


@pytest.fixture(scope="module")
def cluster():
    """A real LocalCluster with 2 worker processes, shared by the tests of this module."""
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as local:
        yield local


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> list[Path]:
    """Three small valid scenes of different sizes plus one corrupt file named like a scene."""
    root = tmp_path_factory.mktemp("batch")
    scenes = [make_scene(root / f"scene{i}.tif", size, seed=i)
              for i, size in enumerate([(96, 130), (128, 128), (70, 100)])]
    bad = root / "corrupt.tif"
    bad.write_bytes(b"II*\x00" + b"\x00garbage" * 50)  # a TIFF header and nothing readable
    return sorted([*scenes, bad])


def _raster(path: Path):
    with rasterio.open(path) as src:
        return src.read(), src.crs, src.transform, src.nodata


def _assert_same_raster(a: Path, b: Path) -> None:
    data_a, crs_a, tr_a, nd_a = _raster(a)
    data_b, crs_b, tr_b, nd_b = _raster(b)
    assert crs_a == crs_b and tr_a == tr_b and nd_a == nd_b, a.name
    np.testing.assert_array_equal(data_a, data_b, err_msg=a.name)


def _logs(log_dir: Path, stage: str) -> dict[str, dict]:
    return {p.name.split(".")[0]: json.loads(p.read_text())
            for p in sorted(log_dir.glob(f"*.{stage}.json"))}


def _no_temporaries(root: Path) -> None:
    leftovers = [p for p in root.rglob(".*") if ".tmp" in p.name]
    assert leftovers == [], leftovers


@pytest.mark.slow
def test_predict_batch_on_cluster_matches_serial(tmp_path, batch, cluster):
    model_dir = tmp_path / "model"
    make_bundle(model_dir, depth=2, base_filters=4, chip_size=64)

    def run(out: Path, dist: DistributedConfig) -> int:
        # The predict stage as every entry point runs it (runner.run_stage), on each cluster.
        cfg = Config(predict=PredictConfig(**PINNED, overlap=16, batch_size=4), distributed=dist)
        layout = Layout(images=batch[0].parent, model_dir=model_dir, out=out)
        return run_stage("predict", Job(layout, cfg))

    serial_out, dask_out = tmp_path / "serial", tmp_path / "dask"
    # workers=1 takes the in-process path; scheduler= sends the same work to the running cluster.
    # The corrupt scene failed and the rest are done: a partial batch, not bad input.
    assert run(serial_out, DistributedConfig(workers=1)) == EXIT_PARTIAL
    assert run(dask_out, DistributedConfig(scheduler=cluster.scheduler_address)) == EXIT_PARTIAL

    good = [s.stem for s in batch if s.stem != "corrupt"]
    for out in (serial_out, dask_out):
        logs = _logs(out / "logs", "predict")
        assert sorted(logs) == sorted([*good, "corrupt"])
        assert logs["corrupt"]["status"] == "failed"
        assert "corrupt.tif" in logs["corrupt"]["error"]
        assert all(logs[s]["status"] == "ok" and logs[s]["seconds"] > 0 for s in good)
        # The bad scene left nothing behind, half-written or otherwise.
        assert not list(out.rglob("corrupt*.tif"))
        _no_temporaries(out)
    for scene in good:
        for kind in ("probability", "masks"):
            _assert_same_raster(serial_out / kind / f"{scene}.tif", dask_out / kind / f"{scene}.tif")
        with rasterio.open(dask_out / "probability" / f"{scene}.tif") as prob, \
                rasterio.open(next(s for s in batch if s.stem == scene)) as src:
            assert (prob.width, prob.height, prob.crs) == (src.width, src.height, src.crs)

    # A second run finds every good scene up to date and only retries the bad one.
    stamp = (dask_out / "masks" / f"{good[0]}.tif").stat().st_mtime_ns
    assert run(dask_out, DistributedConfig(scheduler=cluster.scheduler_address)) == EXIT_PARTIAL
    assert (dask_out / "masks" / f"{good[0]}.tif").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_tile_batch_on_embedded_cluster_matches_serial(tmp_path, batch, capfd):
    def run(chips: Path, dist: DistributedConfig) -> int:
        cfg = Config(tile=TileConfig(chip_size=64, overlap=16, min_valid_fraction=0.0),
                     distributed=dist)
        return run_stage("tile", Job(Layout(raw_images=batch[0].parent, chips=chips), cfg))

    serial, dask = tmp_path / "serial", tmp_path / "dask"
    assert run(serial, DistributedConfig(workers=1)) == EXIT_PARTIAL
    # No scheduler and 2 workers: run_batch starts (and stops) its own LocalCluster.
    assert run(dask, DistributedConfig(workers=2)) == EXIT_PARTIAL

    good = [s.stem for s in batch if s.stem != "corrupt"]
    for scene in good:
        serial_chips = sorted(p.name for p in (serial / scene).glob("*.tif"))
        dask_chips = sorted(p.name for p in (dask / scene).glob("*.tif"))
        assert serial_chips and serial_chips == dask_chips
        for chip in serial_chips:
            _assert_same_raster(serial / scene / chip, dask / scene / chip)
    assert not (dask / "corrupt").exists() or not list((dask / "corrupt").iterdir())
    errors = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("error: tile:")]
    assert len(errors) == 2 and all("corrupt.tif" in ln for ln in errors), errors
    _no_temporaries(dask)


def test_failing_scene_is_retried_then_reported_on_cluster(tmp_path, batch, cluster):
    good = [s for s in batch if s.stem != "corrupt"]
    markers = tmp_path / "markers"
    markers.mkdir()
    dist = DistributedConfig(scheduler=cluster.scheduler_address, retries=1)

    result = run_batch(flaky, good, args=(markers,), cfg=dist)
    # Each scene failed once and then succeeded on its retry.
    assert sorted(result.done) == sorted(s.stem for s in good) and not result.failed
    assert sorted(p.stem for p in markers.glob("*.done")) == sorted(s.stem for s in good)

    result = run_batch(always_fails, good[:2], cfg=dist)
    assert not result.done and sorted(result.failed) == sorted(s.stem for s in good[:2])
    assert all("broken beyond repair" in err for err in result.failed.values())


def test_serial_retry_and_bad_input_not_retried(tmp_path, batch):
    good = [s for s in batch if s.stem != "corrupt"]
    markers = tmp_path / "markers"
    markers.mkdir()
    result = run_batch(flaky, good, args=(markers,), cfg=DistributedConfig(workers=1, retries=1))
    assert sorted(result.done) == sorted(s.stem for s in good)

    result = run_batch(flaky, good, args=(tmp_path / "missing",),
                       cfg=DistributedConfig(workers=1, retries=2))
    assert isinstance(result, BatchResult) and sorted(result.failed) == sorted(s.stem for s in good)
    assert all("FileNotFoundError" in e for e in result.failed.values())


def test_unreachable_scheduler_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline.distributed, "CONNECT_TIMEOUT", "1s")
    with pytest.raises(InputError, match=r"tcp://127\.0\.0\.1:9: no Dask scheduler"):
        run_batch(always_fails, [tmp_path / "a.tif", tmp_path / "b.tif"],
                  cfg=DistributedConfig(scheduler="tcp://127.0.0.1:9"))


def test_worker_processes_share_the_cores():
    from pipeline.distributed import worker_env

    env = worker_env(2)
    cores = __import__("os").cpu_count() or 1
    assert env["TF_NUM_INTRAOP_THREADS"] == env["OMP_NUM_THREADS"] == str(max(1, cores // 2))
    assert env["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"


@pytest.mark.slow
def test_cluster_workers_keep_tensorflow_quiet(tmp_path, batch):
    # Through the CLI with 2 worker processes: stderr holds the pipeline's own lines only, no
    # TensorFlow banners or CUDA errors from the workers.
    import subprocess

    good = tmp_path / "good"
    good.mkdir()
    for scene in batch:
        if scene.name != "corrupt.tif":
            (good / scene.name).write_bytes(scene.read_bytes())
    make_bundle(tmp_path / "model")
    # As a user runs it: none of the test suite's own quieting variables.
    env = {k: v for k, v in __import__("os").environ.items()
           if not k.startswith(("TF_CPP", "DASK_LOGGING"))}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "predict", str(good),
                           "--model-dir", str(tmp_path / "model"), "--out", str(tmp_path / "out"),
                           "--workers", "2"], capture_output=True, text=True, check=False,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    noise = [line for line in proc.stderr.splitlines()
             if not line.startswith(("INFO ", "WARNING pipeline", "error:"))]
    assert noise == []
    assert len(list((tmp_path / "out" / "masks").glob("*.tif"))) == 3



def test_cluster_shutdown_tracebacks_never_reach_the_user(tmp_path):
    # A worker that misses a heartbeat while the cluster shuts down logs "Failed to communicate
    # with scheduler during heartbeat" with a traceback, at ERROR (logger.exception); `make
    # train` tiles on such a cluster. Run as the CLI runs (its logging set-up, then a real
    # LocalCluster made by pipeline.distributed): neither the workers nor the CLI's own process
    # (nannies, scheduler) may let an ERROR line out. Without --debug.
    import logging
    import subprocess

    script = f"""
import json, logging
from pipeline import cli
from pipeline.config import DistributedConfig
import pipeline.distributed as d
cli.main(["tile", {str(tmp_path / "none")!r}, {str(tmp_path / "chips")!r}])
NAMES = ("distributed.worker", "distributed.nanny", "distributed.core", "distributed.scheduler",
         "distributed.comm")
def levels():
    import logging
    return min(logging.getLogger(n).getEffectiveLevel() for n in NAMES)
client, cluster = d._client(DistributedConfig(workers=2), 2)
try:
    print(json.dumps({{"workers": list(client.run(levels).values()), "here": levels()}}))
finally:
    client.close()
    cluster.close()
"""
    # As a user runs it: none of the test suite's own quieting variables.
    env = {k: v for k, v in __import__("os").environ.items()
           if not k.startswith(("TF_CPP", "DASK_LOGGING"))}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=False, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    levels = json.loads(proc.stdout.splitlines()[-1])
    assert len(levels["workers"]) == 2, levels
    assert all(level > logging.ERROR for level in [*levels["workers"], levels["here"]]), levels
    assert "Traceback" not in proc.stderr, proc.stderr
