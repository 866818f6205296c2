"""Training: the loss, a few real steps, the bundle, resume, the time budget, the JAX backend."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from test_dataset import make_chips

from pipeline.bundle import load_bundle
from pipeline.config import Config
from pipeline.dataset import ChipDataset, read_index, read_stats
from pipeline.errors import InputError
from pipeline.model import build_unet
from pipeline.stages.train import (
    FINAL_LR_SHARE,
    LearningRate,
    _resume_settings,
    build_pretrained_unet,
    learning_rate_at,
    make_loss,
    train,
)

TINY = {"depth": 2, "base_filters": 4, "batch_size": 4, "steps_per_epoch": 2, "dropout": 0.0,
        "learning_rate": 3e-3}
METADATA_KEYS = {"bands", "dtype", "normalization", "gsd", "chip_size", "size_multiple",
                 "threshold", "train_config", "val_metrics", "versions", "data_fingerprint",
                 "keras_backend", "postprocess", "validation_cars"}


def tiny_cfg(**train) -> Config:
    return Config.model_validate({"tile": {"chip_size": 64}, "train": {**TINY, **train}})


def history(model_dir: Path) -> list[dict]:
    with (model_dir / "history.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def chips(tmp_path_factory) -> tuple[Path, Path]:
    return make_chips(tmp_path_factory.mktemp("data"))


def packed(target: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return np.stack([target, weight], axis=-1).astype("float32")


def test_head_is_1x1_sigmoid_and_loss_is_bce():
    model = build_unet(3, depth=2, base_filters=4)
    head = model.layers[-1]
    assert isinstance(head, keras.layers.Conv2D)
    assert head.kernel_size == (1, 1) and head.filters == 1
    assert head.activation is keras.activations.sigmoid and head.dtype_policy.name == "float32"

    rng = np.random.default_rng(0)
    target = (rng.random((2, 8, 8)) > 0.6).astype("float32")
    prob = rng.uniform(0.01, 0.99, (2, 8, 8, 1)).astype("float32")
    ours = float(make_loss()(packed(target, np.ones_like(target)), prob))
    reference = float(np.mean(keras.losses.binary_crossentropy(target[..., None], prob)))
    assert ours == pytest.approx(reference, rel=1e-5)
    # A known value: p = 0.8 for a car everywhere is -log(0.8).
    ones = np.ones((1, 4, 4), "float32")
    assert float(make_loss()(packed(ones, ones), np.full((1, 4, 4, 1), 0.8, "float32"))) \
        == pytest.approx(-np.log(0.8), rel=1e-5)


@pytest.mark.parametrize("dice_weight", [0.0, 0.5])
def test_nodata_pixels_contribute_nothing(dice_weight):
    rng = np.random.default_rng(1)
    target = (rng.random((2, 16, 16)) > 0.5).astype("float32")
    weight = rng.uniform(0.5, 3, (2, 16, 16)).astype("float32")
    nodata = rng.random((2, 16, 16)) < 0.3
    weight[nodata] = 0
    prob = rng.uniform(0.01, 0.99, (2, 16, 16, 1)).astype("float32")
    loss = make_loss(dice_weight)
    before = float(loss(packed(target, weight), prob))
    target2, prob2 = target.copy(), prob.copy()
    target2[nodata] = 1 - target2[nodata]
    prob2[nodata] = rng.uniform(0.01, 0.99, (int(nodata.sum()), 1))
    assert float(loss(packed(target2, weight), prob2)) == pytest.approx(before, rel=1e-6)
    # ...whereas the same change on a valid pixel does change it.
    prob2[~nodata] = 0.5
    assert float(loss(packed(target2, weight), prob2)) != pytest.approx(before, rel=1e-3)


def test_gap_weights_scale_the_loss():
    target = np.zeros((1, 4, 4), "float32")
    prob = np.full((1, 4, 4, 1), 0.3, "float32")
    prob[0, 0, 0, 0] = 0.9  # one bad pixel
    weight = np.ones((1, 4, 4), "float32")
    plain = float(make_loss()(packed(target, weight), prob))
    weight[0, 0, 0] = 10
    assert float(make_loss()(packed(target, weight), prob)) > plain


def test_a_few_steps_make_the_loss_fall(chips):
    keras.utils.set_random_seed(0)
    data = ChipDataset(read_index(*chips), read_stats(chips[0]), batch_size=8,
                       positive_fraction=1.0, steps=1, seed=0)
    x, y = data[0]
    model = build_unet(3, depth=2, base_filters=8, dropout=0.0)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=make_loss())
    # The training-mode loss of each step (inference-mode BatchNorm statistics lag behind).
    losses = [float(model.train_on_batch(x, y)) for _ in range(10)]
    assert losses[-1] < 0.7 * losses[0]


@pytest.fixture(scope="module")
def trained(chips, tmp_path_factory) -> Path:
    """A 2-epoch run shared by the bundle and resume tests (each train() costs a trace)."""
    model_dir = tmp_path_factory.mktemp("run") / "model"
    train(*chips, model_dir, cfg=tiny_cfg(epochs=2))
    return model_dir


def test_train_writes_a_bundle_that_reloads(chips, trained):
    model_dir = trained
    assert (model_dir / "model.keras").exists()
    meta = json.loads((model_dir / "metadata.json").read_text())
    assert METADATA_KEYS <= set(meta)
    stats = read_stats(chips[0])
    assert meta["normalization"] == {"mean": stats["mean"], "std": stats["std"]}
    assert meta["size_multiple"] == 4 and meta["chip_size"] == 64 and meta["gsd"] == 0.15
    assert 0.1 <= meta["threshold"] <= 0.9
    assert set(meta["val_metrics"]) >= {"iou", "f1", "precision", "recall"}
    # How validation matched cars: by their boxes when the labels are boxes (postprocess).
    from pipeline.dataset import box_labels_wanted

    boxes = box_labels_wanted(read_index(*chips), "auto")
    assert meta["val_metrics"]["labels_are_boxes"] is boxes
    assert meta["val_metrics"]["object_match"] == ("envelope IoU 0.5" if boxes else "IoU 0.5")
    assert meta["train_config"]["train"]["depth"] == 2
    assert [int(r["epoch"]) for r in history(model_dir)] == [0, 1]
    assert {"val_iou", "val_object_f1", "minutes"} <= set(history(model_dir)[0])
    # Post-processing chosen by object F1 on the validation chips, and used as the threshold.
    post = meta["postprocess"]
    assert post["threshold"] == meta["threshold"] == meta["val_metrics"]["threshold"]
    assert post["min_area_m2"] in {r["min_area_m2"] for r in post["table"]}
    best = max(r["f1"] for r in post["table"])
    assert post["object_f1"] == pytest.approx(best, abs=1e-4)
    cars = meta["validation_cars"]
    assert len(cars["mean_prob"]) == len(cars["matched"]) == post["tp"] + post["fp"]
    assert sum(cars["matched"]) == post["tp"]
    # ... and calibrated on them for the batch's count intervals (pipeline.calibration).
    from pipeline.calibration import apply_calibration

    calibration = meta["calibration"]
    assert calibration["n"] == len(cars["mean_prob"])
    probs = apply_calibration([0.2, 0.5, 0.9], calibration)
    assert all(0 <= p <= 1 for p in probs) and list(probs) == sorted(probs)

    # The bundle loads in safe mode without custom objects and predicts exactly as the best
    # checkpointed weights do.
    bundle = load_bundle(model_dir)
    reference = build_unet(3, depth=2, base_filters=4, dropout=0.0)
    reference.load_weights(model_dir / "checkpoint" / "best.weights.h5")
    x, _ = ChipDataset(read_index(*chips), stats, batch_size=4, shuffle=False)[0]
    np.testing.assert_array_equal(np.asarray(bundle.model.predict_on_batch(x)),
                                  np.asarray(reference.predict_on_batch(x)))
    assert bundle.model.layers[-1].name == "car_prob"


def test_interrupted_run_resumes(chips, trained, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(trained, model_dir)
    first = history(model_dir)
    train(*chips, model_dir, cfg=tiny_cfg(epochs=3))
    rows = history(model_dir)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert rows[:2] == first
    state = json.loads((model_dir / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 3
    # Only settings that change what is learnt decide whether a checkpoint fits.
    assert _resume_settings(tiny_cfg(epochs=9, max_minutes=3)) == _resume_settings(tiny_cfg())
    assert _resume_settings(tiny_cfg(base_filters=8)) != _resume_settings(tiny_cfg())


@pytest.mark.slow
def test_time_budget_stops_after_the_step_in_progress(chips, tmp_path):
    model_dir = tmp_path / "model"
    # 1e-5 minutes is spent by the end of the first step, so exactly one epoch is recorded.
    train(*chips, model_dir, cfg=tiny_cfg(epochs=50, max_minutes=1e-5))
    assert [int(r["epoch"]) for r in history(model_dir)] == [0]
    assert (model_dir / "model.keras").exists()


def test_unknown_pretrained_encoder_is_one_clear_error(chips, tmp_path):
    with pytest.raises(InputError, match="NoSuchNet"):
        train(*chips, tmp_path / "model", cfg=tiny_cfg(epochs=1, pretrained_encoder="NoSuchNet"))


@pytest.mark.slow
def test_pretrained_encoder_architecture():
    # weights=None: the same graph as with ImageNet weights, without a download.
    model = build_pretrained_unet("MobileNetV2", 3, tiny_cfg(), weights=None)
    out = model.predict_on_batch(np.zeros((1, 64, 64, 3), "float32"))
    assert np.asarray(out).shape == (1, 64, 64, 1)
    assert model.layers[-1].name == "car_prob"


def test_wrong_band_count_is_an_input_error(chips, tmp_path):
    cfg = tiny_cfg(epochs=1)
    cfg.tile.bands = [1, 2, 3, 4]
    with pytest.raises(InputError, match="stats.json"):
        train(*chips, tmp_path / "model", cfg=cfg)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax not installed")
def test_training_runs_on_jax(chips, tmp_path):
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        from pipeline.config import Config
        from pipeline.bundle import load_bundle
        from pipeline.stages.train import train
        cfg = Config.model_validate({{"tile": {{"chip_size": 64}}, "train": {TINY!r}}})
        cfg.train.epochs = 2
        out = Path({str(tmp_path / "model")!r})
        train(Path({str(chips[0])!r}), Path({str(chips[1])!r}), out, cfg=cfg)
        meta = json.loads((out / "metadata.json").read_text())
        assert meta["keras_backend"] == "jax", meta["keras_backend"]
        load_bundle(out)
        print("ok")
    """)
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def test_learning_rate_warms_up_then_decays_to_the_end():
    peak = 1e-3
    assert learning_rate_at(0.0, peak, 0.1) == pytest.approx(0.01 * peak)
    assert learning_rate_at(0.05, peak, 0.1) == pytest.approx(0.5 * peak)
    assert learning_rate_at(0.1, peak, 0.1) == pytest.approx(peak)
    mid = learning_rate_at(0.55, peak, 0.1)
    assert mid == pytest.approx(peak * (FINAL_LR_SHARE + (1 - FINAL_LR_SHARE) * 0.5))
    assert learning_rate_at(1.0, peak, 0.1) == pytest.approx(FINAL_LR_SHARE * peak)
    assert learning_rate_at(3.0, peak, 0.1) == pytest.approx(FINAL_LR_SHARE * peak)
    values = [learning_rate_at(p, peak, 0.1) for p in np.linspace(0.1, 1, 20)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))


def test_budget_drives_the_schedule_not_the_epochs():
    # Half the budget already spent before a resume: the schedule is half way, whatever the
    # epoch count; without a budget, the step count decides.
    timed = LearningRate(1e-3, 0.0, total_steps=10**6, first_step=0, budget_s=600.0,
                         elapsed_s=300.0)
    assert timed.progress() == pytest.approx(0.5, abs=0.01)
    stepped = LearningRate(1e-3, 0.0, total_steps=200, first_step=50, budget_s=None,
                           elapsed_s=300.0)
    assert stepped.progress() == pytest.approx(0.25)


class _SlowForwardClock:
    """``time`` as pipeline.stages.train sees it, but each perf_counter() call 10 s after the last: the
    timed forward pass of ``_auto_steps`` takes 10 s whatever the machine's load."""

    def __init__(self):
        import time

        self._time, self._now = time, 0.0

    def perf_counter(self) -> float:
        self._now += 10.0
        return self._now

    def __getattr__(self, name):
        return getattr(self._time, name)


def test_validation_runs_by_steps_within_a_budget(chips, tmp_path, monkeypatch):
    """With a budget and no steps_per_epoch, an epoch is sized from the measured step time so
    that validation runs ``validations`` times in the budget. The measurement is fixed (a 10 s
    forward pass), so the size is known, and the budget is far past what the run takes: no
    epoch count depends on the machine's speed."""
    import pipeline.stages.train as train_mod

    monkeypatch.setattr(train_mod, "time", _SlowForwardClock())
    model_dir = tmp_path / "model"
    train(*chips, model_dir, cfg=tiny_cfg(epochs=3, steps_per_epoch=None, max_minutes=60,
                                          validations=20))
    state = json.loads((model_dir / "checkpoint" / "state.json").read_text())
    # A step is 6 forward passes (60 s) and validation a few more: 180 s between validations
    # is under 3 steps, so the floor of 5 steps per epoch, well under a pass of the chips.
    assert state["steps_per_epoch"] == 5
    rows = history(model_dir)
    lrs = [float(r["learning_rate"]) for r in rows]
    assert len(rows) == 3 and all(0 < lr <= 3e-3 for lr in lrs)
