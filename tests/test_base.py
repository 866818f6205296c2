"""The base model: `make base` end to end (tiny), the shipped bundle on a scene it never saw,
train.init fine-tuning from a bundle, the GSD range rule, and the shipped folder's guard."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, make, write_scene

from pipeline.config import BaseConfig, SampleConfig
from pipeline.stages.base import BASE_BUNDLE, FIRST_ZONE, variant_settings
from pipeline.stages.predict import gsd_to_predict_at

# A base small enough for the suite: 2 variants of 2 scenes of 256^2, a 2-level U-Net.
TINY_BASE = ("base.variants=2 base.width=256 base.height=256 tile.chip_size=64 tile.overlap=8 "
             "train.depth=2 train.base_filters=4 train.crop_size=null train.epochs=2 "
             "train.steps_per_epoch=3 train.max_minutes=2")


def test_variants_cover_the_gsd_range_styles_and_zones():
    variants = variant_settings(BaseConfig(variants=6, gsd_min=0.05, gsd_max=0.30,
                                           styles=["default", "evening"]), SampleConfig())
    gsds = [v.gsd for v in variants]
    assert gsds[0] == 0.05 and gsds[-1] == 0.30 and gsds == sorted(gsds)
    assert [v.style for v in variants] == ["default", "evening"] * 3
    assert [v.epsg for v in variants] == [FIRST_ZONE + k for k in range(6)]  # labels apart
    assert len({v.seed for v in variants}) == 6


@pytest.mark.parametrize(("scene", "expected"), [(0.10, None), (0.05, None), (0.30, None),
                                                 (0.02, 0.05), (0.60, 0.30)])
def test_a_bundle_with_a_gsd_range_keeps_a_scenes_own_gsd_inside_it(scene, expected):
    assert gsd_to_predict_at(scene, {"gsd": 0.15, "gsd_range": [0.05, 0.30]}) == expected


def test_a_bundle_of_one_gsd_resamples_to_it():
    assert gsd_to_predict_at(0.10, {"gsd": 0.15}) == 0.15


@pytest.mark.slow
def test_make_base_ships_a_bundle_with_its_provenance_and_fine_tuning_starts_from_it(tmp_path):
    base, ship = tmp_path / "base", tmp_path / "ship"
    env = {"BASE": str(base), "BASE_SHIP": str(ship), "SET": TINY_BASE, "WORKERS": "1"}
    make("base", env_vars=env)
    meta = json.loads((ship / "metadata.json").read_text())
    assert meta["base"]["made_by"] == "make base" and meta["base"]["generated_only"]
    assert meta["base"]["variants"] == 2 and meta["base"]["cars"] > 0
    assert meta["gsd_range"] == [0.05, 0.30]
    assert json.loads((ship / "PROVENANCE.json").read_text())["variants"] == 2
    before = (ship / "model.keras").stat().st_mtime_ns
    proc = make("base", env_vars=env)
    assert "is up to date" in proc.stderr
    assert (ship / "model.keras").stat().st_mtime_ns == before  # nothing retrained or re-shipped

    # Fine-tuning from that bundle (same U-Net shape) records where it started; a U-Net of
    # another shape starts from scratch and says so.
    chips, masks = base / "interim" / "chips", base / "interim" / "masks"
    sets = TINY_BASE.split() + [f"train.init={ship}"]
    for model_dir, extra, expected in ((tmp_path / "tuned", [], str(ship)),
                                       (tmp_path / "other", ["train.base_filters=8"], "scratch")):
        cmd = [sys.executable, "-m", "pipeline", "train", str(chips), str(masks), str(model_dir),
               "--config", "configs/base.yaml", "--sets", " ".join(sets + extra)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr
        init = json.loads((model_dir / "metadata.json").read_text())["init"]
        assert init["from"] == expected, init
    assert init["reason"] == "another shape"
    assert "another shape" in proc.stderr


@pytest.mark.parametrize("how", ["make", "cli"])
def test_the_shipped_base_is_never_trained_over(tmp_path, how):
    if how == "make":  # refused before any stage: no chips cut from the training scenes
        write_scene(tmp_path / "data" / "raw" / "images" / "a.tif",
                    np.full((3, 64, 64), 90, np.uint8))
        proc = make("train", env_vars={"RUN": "base", "DATA": str(tmp_path / "data")}, status=2)
        assert not (tmp_path / "data" / "interim").exists()
    else:
        cmd = [sys.executable, "-m", "pipeline", "train", str(tmp_path / "c"),
               str(tmp_path / "m"), str(BASE_BUNDLE)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        assert proc.returncode == 2
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("error:"))
    assert "shipped base model" in line and "`make base` rebuilds it" in line, proc.stderr


# The floor the shipped base must clear on generated scenes it never saw (a new seed, and the
# 'faded' style, which `make base` leaves out): object F1 at IoU 0.5.
SHIPPED_F1_FLOOR = 0.5


@pytest.mark.slow
def test_the_shipped_base_finds_cars_on_a_scene_of_a_seed_and_style_it_never_saw(tmp_path):
    if not (BASE_BUNDLE / "model.keras").exists():
        pytest.fail(f"{BASE_BUNDLE}: the shipped base model is missing; run `make base`")
    data, out = tmp_path / "data", tmp_path / "out"
    sample = ("sample.seed=4242 sample.style=faded sample.train_scenes=1 "
              "sample.incoming_scenes=1 sample.width=700 sample.height=600")
    make("sample", env_vars={"DATA": str(data), "SET": sample})
    # The engine pinned: auto's one-time measurement (tests/test_engine_choice.py) is not this
    # test's subject, and would cost a minute here.
    make("evaluate", env_vars={"DATA": str(data), "RUN": "base", "OUT": str(out),
                               "WORKERS": "1",
                               "SET": "predict.engine=keras predict.precision=float32"})
    overall = json.loads((out / "evaluation" / "metrics.json").read_text())["overall"]
    f1 = overall["object"]["f1"]
    print(f"shipped base on an unseen seed and style: object F1 {f1:.3f}, "
          f"{overall['count']['pred_cars']} cars vs {overall['count']['truth_cars']}")
    assert np.isfinite(f1) and f1 >= SHIPPED_F1_FLOOR
