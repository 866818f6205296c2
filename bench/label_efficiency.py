"""How many labels does the model need? Train on a share of the sample's labelled area (issue 22).

    python -m bench --only label_efficiency [--quick]    # reports/bench/label_efficiency.json

The generated sample has only a few training scenes, so the labelled area is cut by chip-sized
squares, as ``bench.active_learning`` does: the squares of the training scenes are shuffled
(seeded) and each arm keeps the first ``share`` of them (nested: the 10% arm's squares are in the
30% arm's), the rest nodata, so unseen. Each arm trains with the same wall-clock budget and seed
and is evaluated on the sample's incoming scenes against their truth (object F1 at IoU 0.5, the
pipeline's ``evaluate``). The result per share: labelled squares, labelled cars in them, object
F1, precision, recall.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from bench.active_learning import CHIP, _arm, _settings, _squares

log = logging.getLogger(__name__)


def _labelled_cars(sample: Path, keep: set) -> int:
    """Label footprints whose centroid lies in a kept square (what a person would have drawn)."""
    import rasterio
    from rasterio.windows import Window
    from rasterio.windows import bounds as window_bounds
    from shapely.geometry import box

    from pipeline.config import LabelConfig
    from pipeline.stages.rasterize import load_labels

    labels = load_labels(sorted((sample / "raw" / "labels").iterdir()), cfg=LabelConfig())
    cars = 0
    for scene in sorted((sample / "raw" / "images").glob("*.tif")):
        with rasterio.open(scene) as src:
            squares = [box(*window_bounds(Window(col, row, CHIP, CHIP), src.transform))
                       for stem, col, row in keep if stem == scene.stem]
            points = labels.to_crs(src.crs).geometry.centroid
        cars += int(sum(any(b.contains(pt) for b in squares) for pt in points))
    return cars


def run(workdir: Path, *, minutes: float = 1.5, shares: tuple = (0.1, 0.3, 1.0), seed: int = 0,
        sample: dict | None = None, extra: tuple = ()) -> dict:
    """Train one arm per share of the labelled squares; return each arm's scores."""
    from pipeline.config import SampleConfig
    from pipeline.stages.sample import make_sample

    workdir = Path(workdir)
    data = workdir / "sample"
    make_sample(data, cfg=SampleConfig(seed=seed, **(sample or {})))
    pool = [sq for s in sorted((data / "raw" / "images").glob("*.tif")) for sq in _squares(s)]
    order = [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))]
    settings = [*_settings(minutes, seed), *extra]
    arms = {}
    for share in shares:
        keep = set(order[:max(1, round(share * len(pool)))])
        arm = _arm(workdir / f"share_{share:g}", data, keep, settings)
        arms[f"{share:g}"] = {"share": share, "labelled_cars": _labelled_cars(data, keep), **arm}
        log.info("share %g: %s", share, arms[f"{share:g}"])
    return {"pool_squares": len(pool), "chip": CHIP, "minutes": minutes, "seed": seed,
            "load_avg": [round(v, 2) for v in os.getloadavg()], "arms": arms}
