"""The generalisation benchmark's quick path: train on one sample, score other seeds, GSDs, styles."""

from __future__ import annotations

import math

import numpy as np
import pytest
from affine import Affine
from rasterio.crs import CRS

from bench.bench_generalisation import run
from pipeline.stages.sample import STYLES, render_scene


def _render(style: str, seed: int = 3):
    return render_scene(np.random.default_rng(seed), 96, 96, gsd=0.15,
                        transform=Affine(0.15, 0, 500000, 0, -0.15, 4000000),
                        crs=CRS.from_epsg(32633), style=style)


def test_styles_change_light_not_layout():
    base = _render("default")
    for name in STYLES:
        other = _render(name)
        # The same draws in the same order: the same cars, only the light differs.
        assert [(c.cx, c.cy) for c in other.cars] == [(c.cx, c.cy) for c in base.cars]
        if name != "default":
            diff = np.abs(other.image.astype(int) - base.image.astype(int)).mean()
            assert diff > 2, name
    evening = _render("evening").image.astype(float)
    # Warm light: red over blue rises against the default.
    assert evening[0].mean() / evening[2].mean() > (
        base.image[0].astype(float).mean() / base.image[2].astype(float).mean())


@pytest.mark.slow
def test_quick_generalisation_run(tmp_path):
    result = run(tmp_path, quick=True, conditions=[("same", 0, 0.15, "default"),
                                                   ("gsd_0.20", 103, 0.20, "default"),
                                                   ("evening", 105, 0.15, "evening")])
    rows = {r["condition"]: r for r in result["conditions"]}
    assert set(rows) == {"same", "gsd_0.20", "evening"}
    assert rows["same"]["gap_vs_same"] == 0
    for r in rows.values():
        assert 0 <= r["object_f1"] <= 1 or math.isnan(r["object_f1"])
        assert r["truth_cars"] > 0
    assert result["model"]["min_area_m2"] > 0
