"""The benchmark suite runs end to end at tiny sizes and writes complete, positive results.

Speed is never asserted here (that is what the benchmarks report); these tests check that every
benchmark runs, names its machine and produces positive measurements.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.harness import machine_info, median_time, peak_rss_mb

ROOT = Path(__file__).resolve().parents[1]
MACHINE_KEYS = {"platform", "cpu_count", "memory_gb", "date", "versions"}


def _numbers(data, prefix=""):
    """Every numeric leaf of a nested result, as dotted key -> value."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out


def _check_machine(result: dict) -> None:
    assert MACHINE_KEYS <= set(result["machine"]), result["machine"].keys()
    assert result["machine"]["cpu_count"] >= 1 and result["machine"]["memory_gb"] > 0
    assert "numpy" in result["machine"]["versions"]


def test_median_time_calls_and_returns_the_middle():
    calls = []
    seconds = median_time(lambda: calls.append(1), repeats=5, warmup=2)
    assert len(calls) == 7 and seconds >= 0


def test_peak_rss_of_a_fresh_subprocess():
    base = peak_rss_mb("import numpy")
    # 300 MB touched in the child must show up; the parent's own memory must not.
    big = peak_rss_mb("import numpy as np; a = np.ones(300 * 2**20 // 8); a.sum()")
    assert 0 < base < big and big - base > 250


def test_machine_info_names_the_machine():
    info = machine_info()
    assert MACHINE_KEYS <= set(info) and info["cpu_count"] >= 1
    assert {"numpy", "rasterio", "keras"} <= set(info["versions"])


@pytest.mark.slow
def test_quick_suite_writes_every_result(tmp_path):
    from bench.__main__ import BENCHMARKS, main

    out = tmp_path / "bench"
    assert main(["--quick", "--out", str(out)]) == 0
    for name in BENCHMARKS:
        result = json.loads((out / f"{name}.json").read_text())
        assert result["benchmark"] == name and "error" not in result, result.get("error")
        _check_machine(result)
        assert result["quick"] is True and result["wall_s"] > 0
        measured = {k: v for k, v in _numbers(result).items() if not k.startswith("machine.")}
        assert any(v > 0 for v in measured.values()), name

    dist = json.loads((out / "distributed.json").read_text())
    assert set(dist["results"]) == {"1", "2"}
    for workers in ("1", "2"):
        assert dist["results"][workers]["scenes_per_min"] > 0
        assert dist["results"][workers]["batch_s"] > 0
    assert dist["speedup"]["1"] == 1.0 and dist["speedup"]["2"] > 0

    train = json.loads((out / "train.json").read_text())
    for key in ("input_chips_per_s", "input_chips_per_s_no_augment", "train_step_chips_per_s",
                "input_to_step_ratio"):
        assert train[key] > 0, key
    assert train["batch_size"] == 4 and train["chip_size"] == 64

    # Each share of the labelled squares is its own trained, evaluated arm; the shares nest.
    efficiency = json.loads((out / "label_efficiency.json").read_text())
    arms = efficiency["arms"]
    assert list(arms) == ["0.3", "1"]
    small, full = arms["0.3"], arms["1"]
    assert full["labelled_squares"] == efficiency["pool_squares"] == 18  # 2 scenes of 3 x 3
    assert small["labelled_squares"] == 5
    assert 0 < small["labelled_cars"] < full["labelled_cars"]
    for arm in (small, full):
        assert 0 <= arm["f1"] <= 1 and arm["seconds"] > 0
        assert arm["tp"] + arm["fn"] == full["tp"] + full["fn"]  # the same truth for every arm
    assert len(efficiency["load_avg"]) == 3

    checks = json.loads((out / "checks.json").read_text())  # seams + precision, trained model
    runs = checks["seams"]["runs"]
    assert [r["offset"] for r in runs] == [[128, 64], [100, 37]]  # (100, 37): off the lattice
    assert all(r["beyond_edge"]["pixels"] > 0 and "p99" in r["beyond_edge"] for r in runs)
    reference = checks["precision"]["variants"]["keras_float32"]
    assert reference["max"] == 0 and "object_f1" in reference and checks["model"]["train_s"] > 0

    summary = (out / "summary.md").read_text()
    assert "cpu" in summary.lower() and "| benchmark | measure | value |" in summary
    for name in BENCHMARKS:
        assert f"| {name} |" in summary
    assert "scenes_per_min" in summary and "train_step_chips_per_s" in summary


@pytest.mark.slow
def test_unknown_benchmark_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "--only", "nope", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_gpu_benchmark_runs_on_cpu_quick(tmp_path):
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    _check_machine(result)
    assert result["device"]["keras_backend"] == "jax"
    assert result["device"]["platform"] == "cpu" and result["device"]["device_kind"]
    for precision in ("float32", "mixed_float16"):
        train = result["train"][precision]
        assert train["precision"] == precision
        assert train["in_memory_chips_per_s"] > 0 and train["pipeline_chips_per_s"] > 0
    predict = result["predict"]
    assert predict["end_to_end_mpix_per_s"] > 0 and predict["forward_mpix_per_s"] > 0
    assert predict["windows"] >= 1
