"""predict.engine / predict.precision ``auto``: chosen by measurement, kept only where faithful,
cached per CPU, model and window (issue 23). Real Keras models, real exported engines."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
import rasterio

import pipeline.engine_choice as choice_module
import pipeline.engines as engines
from pipeline.bundle import VALIDATION_FILE, load_bundle, load_validation, save_bundle
from pipeline.config import PredictConfig
from pipeline.engine_choice import (
    REFERENCE,
    candidates,
    choose_engine,
    faithfulness,
    measure,
    pick,
)
from pipeline.engines import ENGINE_CACHE
from pipeline.model import build_unet
from pipeline.stages.predict import predict_scene
from tests.conftest import GSD, write_scene

# CPU descriptions as /proc/cpuinfo's flags line gives them.
SAPPHIRE_RAPIDS = frozenset({"sse4_2", "avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"})
ZEN3 = frozenset({"sse4_2", "avx2", "fma"})
ALL_F32 = [("keras", "float32"), ("openvino", "float32"), ("onnxruntime", "float32")]


def _describe(monkeypatch, flags):
    monkeypatch.setattr(engines, "cpu_flags", lambda: flags)


# === Which candidates auto measures (written out, not recomputed) ===

@pytest.mark.parametrize(("flags", "engine", "precision", "expected"), [
    (SAPPHIRE_RAPIDS, "auto", "auto", [("keras", "float32"), ("keras", "bfloat16"),
                                       ("openvino", "float32"), ("openvino", "bfloat16"),
                                       ("onnxruntime", "float32")]),
    (ZEN3, "auto", "auto", ALL_F32),  # no bf16 instructions: emulated bf16 is never faster
    (SAPPHIRE_RAPIDS, "openvino", "auto", [("openvino", "float32"), ("openvino", "bfloat16")]),
    (SAPPHIRE_RAPIDS, "auto", "float32", ALL_F32),
    (ZEN3, "auto", "bfloat16", [("keras", "bfloat16"), ("openvino", "bfloat16")]),  # asked for
    (ZEN3, "onnxruntime", "auto", [("onnxruntime", "float32")]),
])
def test_candidates_follow_the_described_cpu_and_the_settings(monkeypatch, flags, engine,
                                                              precision, expected):
    _describe(monkeypatch, flags)
    assert candidates(engine, precision) == expected


def test_an_engine_not_installed_is_no_candidate(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else find_spec(name, *a))
    _describe(monkeypatch, SAPPHIRE_RAPIDS)
    assert candidates("auto", "auto") == [("keras", "float32"), ("keras", "bfloat16"),
                                          ("onnxruntime", "float32")]


# === The faithfulness gate: the same cars, as a user sees them ===

def _cars_image(n_cars: int, rng) -> np.ndarray:
    """(4, 64, 64) probabilities with ``n_cars`` well separated 6 x 10 px cars in all."""
    prob = np.full((4, 64, 64), 0.05, np.float32)
    for k in range(n_cars):
        chip, slot = divmod(k, 9)
        r, c = 4 + 20 * (slot // 3), 4 + 20 * (slot % 3)
        prob[chip, r:r + 6, c:c + 10] = 0.9
    return prob + rng.uniform(0, 0.02, prob.shape).astype(np.float32)


def test_faithfulness_known_answers(rng):
    ref = _cars_image(30, rng)
    same = faithfulness(ref, ref.copy(), threshold=0.5, gsd=GSD)
    assert same["faithful"] and same["object_f1"] == 1.0 and same["cars"] == 30

    one_lost = ref.copy()
    one_lost[0, 4:10, 4:14] = 0.05  # the first car is gone: F1 0.983, count -3.3%
    lost = faithfulness(ref, one_lost, threshold=0.5, gsd=GSD)
    assert not lost["faithful"] and lost["cars"] == 29 and lost["object_f1"] == pytest.approx(
        2 * 29 / 59, abs=1e-4)

    shifted = faithfulness(ref, ref + 3 / 254, threshold=0.5, gsd=GSD)  # the same cars ...
    assert shifted["object_f1"] == 1.0 and shifted["p99_steps"] == 3  # ... 3 steps off
    assert not shifted["faithful"]
    nudged = faithfulness(ref, ref + 1 / 254, threshold=0.5, gsd=GSD)
    assert nudged["faithful"] and nudged["p99_steps"] == 1

    # Specks under the model's minimum car area are no cars a user sees: not counted.
    specks = ref.copy()
    specks[3, 60:62, 60:62] = 0.9
    assert faithfulness(ref, specks, threshold=0.5, gsd=GSD, min_area_m2=1.0)["faithful"]
    assert not faithfulness(ref, specks, threshold=0.5, gsd=GSD)["faithful"]


def test_pick_takes_the_fastest_faithful_one_never_an_unfaithful_one():
    rows = {"keras float32": {"ms": 100.0, "faithfulness": None},
            "openvino bfloat16": {"ms": 25.0, "faithfulness": {"faithful": False}},
            "openvino float32": {"ms": 70.0, "faithfulness": {"faithful": True}},
            "onnxruntime float32": {"ms": 80.0, "faithfulness": {"faithful": True}}}
    allowed = [REFERENCE, ("openvino", "float32"), ("openvino", "bfloat16"),
               ("onnxruntime", "float32")]
    assert pick(rows, allowed) == ("openvino", "float32")
    assert pick(rows, [("openvino", "bfloat16")]) == REFERENCE  # none faithful: Keras float32


# === With a real small model ===

def _validation_chips(rng) -> np.ndarray:
    """Eight 64 px chips of dark road with bright car-sized rectangles."""
    chips = rng.integers(40, 70, size=(8, 64, 64, 3), dtype=np.uint8)
    for chip in chips:
        for _ in range(4):
            r, c = rng.integers(2, 50, size=2)
            chip[r:r + 7, c:c + 12] = rng.integers(150, 230, size=3, dtype=np.uint8)
    return chips


@pytest.fixture
def bundle_dir(tmp_path, rng) -> Path:
    """A seeded 2-level U-Net bundle whose threshold cuts its own output into blobs, with
    validation chips: a real model whose 'cars' a lossy engine could change."""
    keras.utils.set_random_seed(5)
    model = build_unet(3, depth=2, base_filters=4)
    chips = _validation_chips(rng)
    norm = {"mean": [80.0] * 3, "std": [50.0] * 3}
    x = (chips.astype(np.float32) - 80.0) / 50.0
    prob = np.asarray(model.predict_on_batch(x))[..., 0]
    threshold = float(np.quantile(prob, 0.9))  # the brightest tenth: blobs, not all or nothing
    meta = dict(bands=[1, 2, 3], dtype="uint8", normalization=norm, gsd=GSD, chip_size=64,
                size_multiple=4, threshold=threshold, data_fingerprint="test",
                postprocess={"min_area_m2": 0.0})
    save_bundle(model, meta, tmp_path / "model", validation=chips)
    return tmp_path / "model"


def _records(model_dir: Path) -> list[Path]:
    return sorted((model_dir / ENGINE_CACHE).glob("choice-*.json"))


def test_the_bundle_keeps_its_validation_chips(bundle_dir, rng):
    chips = load_validation(bundle_dir)
    assert chips.shape == (8, 64, 64, 3) and chips.dtype == np.uint8
    # A retraining without validation chips leaves none of the old ones behind.
    save_bundle(load_bundle(bundle_dir).model, _meta(bundle_dir), bundle_dir)
    assert load_validation(bundle_dir) is None
    assert (bundle_dir / "previous" / VALIDATION_FILE).exists()  # the old set is kept there


def _meta(model_dir: Path) -> dict:
    meta = dict(load_bundle(model_dir).metadata)
    meta.pop("model_sha256")
    return meta


def test_auto_is_measured_once_cached_and_measured_again_when_cpu_model_or_window_change(
        bundle_dir, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.engine_choice")
    bundle = load_bundle(bundle_dir)
    first = choose_engine(bundle, "auto", "float32", (1, 64, 64))
    [record] = _records(bundle_dir)
    rows = first.record["candidates"]
    assert set(rows) == {"keras float32", "openvino float32", "onnxruntime float32"}
    assert all(len(r["times_ms"]) == choice_module.REPEATS and r["ms"] > 0 for r in rows.values())
    for name in ("openvino float32", "onnxruntime float32"):  # exact exports: the same cars
        faith = rows[name]["faithfulness"]
        assert faith["faithful"] and faith["object_f1"] == 1.0 and faith["chips"] == 8
        assert faith["reference_cars"] > 3  # a real comparison: the threshold made blobs
    assert (first.engine, first.precision) in ALL_F32
    assert any("measuring" in r.getMessage() for r in caplog.records)

    caplog.clear()
    again = choose_engine(bundle, "auto", "float32", (1, 64, 64))
    assert (again.engine, again.precision) == (first.engine, first.precision)
    assert _records(bundle_dir) == [record]
    assert not any("measuring" in r.getMessage() for r in caplog.records)  # read, not measured
    assert any("auto runs" in r.getMessage() for r in caplog.records)  # the choice is logged

    _describe(monkeypatch, ZEN3 | {"sse4_1"})  # another CPU kind
    choose_engine(bundle, "auto", "float32", (1, 64, 64))
    choose_engine(bundle, "auto", "float32", (2, 64, 64))  # another window batch
    assert len(_records(bundle_dir)) == 3

    save_bundle(build_unet(3, depth=2, base_filters=4), _meta(bundle_dir), bundle_dir,
                validation=load_validation(bundle_dir))  # a retrained model
    choose_engine(load_bundle(bundle_dir), "auto", "float32", (2, 64, 64))
    assert len(_records(bundle_dir)) == 4


def test_an_engine_that_changes_the_cars_is_measured_but_never_chosen(bundle_dir):
    """The gate on a real model: a copy with one layer's weights disturbed (a broken or lossy
    engine) gives other cars on the validation chips and is kept out, however fast."""
    bundle = load_bundle(bundle_dir)
    broken = keras.models.clone_model(bundle.model)
    weights = bundle.model.get_weights()
    weights[0] = weights[0] * 1.5
    broken.set_weights(weights)
    probe, window, chips = choice_module._probe_and_window(bundle, (1, 64, 64))
    assert chips == 8
    rows = measure(bundle.model, {REFERENCE: bundle.model, ("openvino", "bfloat16"): broken},
                   probe, window, cars={"threshold": bundle.threshold, "gsd": GSD})
    assert not rows["openvino bfloat16"]["faithfulness"]["faithful"]
    rows["openvino bfloat16"]["ms"] = 0.001  # even were it the fastest
    assert pick(rows, [REFERENCE, ("openvino", "bfloat16")]) == REFERENCE


def test_without_validation_chips_auto_takes_no_lossy_precision(bundle_dir, monkeypatch):
    _describe(monkeypatch, SAPPHIRE_RAPIDS)
    (bundle_dir / VALIDATION_FILE).unlink()  # a bundle from before they were kept
    chosen = choose_engine(load_bundle(bundle_dir), "auto", "auto", (1, 64, 64))
    assert chosen.precision == "float32"
    assert chosen.record["key"]["candidates"] == [" ".join(c) for c in ALL_F32]


def test_predict_with_auto_runs_and_tags_what_was_chosen(bundle_dir, tmp_path, rng):
    scene = write_scene(tmp_path / "s.tif", rng.integers(30, 220, (3, 80, 90), dtype=np.uint8),
                        nodata=None)
    prob, _ = predict_scene(scene, bundle_dir, tmp_path / "out",
                            cfg=PredictConfig(window=64, overlap=16, engine="auto",
                                              precision="float32"))
    [record] = _records(bundle_dir)
    import json

    chosen = json.loads(record.read_text())["chosen"]
    with rasterio.open(prob) as src:
        tags = src.tags()
    assert [tags["engine"], tags["precision"]] == chosen
    assert "x Keras float32" in tags["engine_choice"] and "object F1" in tags["engine_choice"]


def test_a_model_folder_that_cannot_hold_the_record_keeps_it_in_the_temp_folder(
        bundle_dir, tmp_path, monkeypatch):
    import tempfile

    shutil.rmtree(bundle_dir / ENGINE_CACHE, ignore_errors=True)
    # chmod alone does not stop root (CI containers); a file in the cache folder's place does.
    (bundle_dir / ENGINE_CACHE).write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    chosen = choose_engine(load_bundle(bundle_dir), "auto", "float32", (1, 64, 64))
    assert chosen.path.parent == tmp_path / "tmp" / engines.FALLBACK_CACHE
    assert (bundle_dir / ENGINE_CACHE).read_text() == ""  # untouched
