"""Label the suggested squares, or random ones: which teaches the model more? (issue 22)

    python -m bench.active_learning [--minutes 3] [--initial 60] [--squares 20] [--seed S]
                                    [--out reports/bench/active_learning.json]

On the generated sample, a person has labelled only ``initial`` random chip-sized squares of the
training scenes; the rest of those scenes is unlabelled. Unlabelled means unseen: each arm's
training scenes are copies with nodata outside its labelled squares, so tiling skips those chips
and the masks ignore them (the pipeline's own handling of nodata, no special code).

1. ``initial``: train on the initial squares (``train.max_minutes`` = ``minutes``), evaluate on
   the sample's incoming scenes against their truth (object F1 at IoU 0.5, the pipeline's
   ``evaluate``).
2. ``make suggest`` with that model over the whole training scenes (as the batch, so every
   square is a candidate) ranks the unlabelled squares; ``suggested`` adds the first ``squares``
   of them, ``random`` adds as many random unlabelled squares (seeded); each is trained from
   scratch with the same budget and seed and evaluated the same way.

The result is each arm's object F1, precision, recall and car counts; a single seed on a
2-core CPU says little by itself (run several ``--seed`` values to see the spread). Chips are
128 px without overlap, so a square is exactly one chip.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

CHIP = 128


def _settings(minutes: float, seed: int) -> list[str]:
    # No early stop: with few labelled squares validation F1 sits at 0 for the first minute,
    # and a stop there would compare three untrained models.
    return [f"tile.chip_size={CHIP}", "tile.overlap=0", f"train.max_minutes={minutes}",
            f"train.seed={seed}", "train.early_stopping_patience=null",
            "suggest.training=false", "suggest.flip=true"]


def _squares(scene: Path) -> list[tuple[str, int, int]]:
    """Every chip-sized square of a scene on the tiling grid: (scene stem, col, row)."""
    import rasterio

    from pipeline.geo import grid_windows

    with rasterio.open(scene) as src:
        return [(scene.stem, int(w.col_off), int(w.row_off))
                for w in grid_windows(src.width, src.height, CHIP, 0, edge="fit")]


def _masked_copy(scene: Path, keep: set[tuple[str, int, int]], dst: Path) -> None:
    """The scene with nodata (0) outside the kept squares: those pixels are never labelled."""
    import rasterio

    with rasterio.open(scene) as src:
        data, profile = src.read(), src.profile
    inside = np.zeros(data.shape[1:], bool)
    for stem, col, row in keep:
        if stem == scene.stem:
            inside[row:row + CHIP, col:col + CHIP] = True
    data[:, ~inside] = 0
    data[:, inside] = np.maximum(data[:, inside], 1)  # a real 0 would read as nodata
    profile.update(nodata=0)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(dst, "w", **profile) as out:
        out.write(data)


def _arm(root: Path, sample: Path, keep: set, settings: list[str]) -> dict:
    """Train on the kept squares only and evaluate on the incoming scenes."""
    from pipeline.cli import main

    data = root / "data"
    for scene in sorted((sample / "raw" / "images").glob("*.tif")):
        _masked_copy(scene, keep, data / "raw" / "images" / scene.name)
    shutil.copytree(sample / "raw" / "labels", data / "raw" / "labels", dirs_exist_ok=True)
    started = time.monotonic()
    paths = ["--data", str(data), "--images", str(sample / "incoming"), "--out",
             str(root / "out"), "--model-dir", str(root / "model"), "--report",
             str(root / "report"), "--truth", str(sample / "truth" / "cars.gpkg")]
    sets = [a for s in settings for a in ("--set", s)]
    code = main(["run", "train", "evaluate", *paths, *sets, "--workers", "1"])
    if code:
        raise RuntimeError(f"{root}: the pipeline exited {code}")
    metrics = json.loads((root / "out" / "evaluation" / "metrics.json").read_text())
    obj = metrics["overall"]["object"]
    return {"labelled_squares": len(keep), "seconds": round(time.monotonic() - started, 1),
            **{k: obj[k] for k in ("f1", "precision", "recall", "tp", "fp", "fn")}}


def _suggested(root: Path, sample: Path, labelled: set, n: int, settings: list[str]) -> list:
    """The first ``n`` unlabelled squares that ``suggest`` ranks, with the initial model."""
    import geopandas as gpd

    from pipeline.cli import main

    out = root / "suggest-out"
    sets = [a for s in [*settings, f"suggest.top_n={n + len(labelled)}"] for a in ("--set", s)]
    code = main(["run", "suggest", "--data", str(root / "data"), "--images",
                 str(sample / "raw" / "images"), "--out", str(out), "--model-dir",
                 str(root / "model"), *sets, "--workers", "1"])
    if code:
        raise RuntimeError(f"suggest exited {code}")
    ranked = gpd.read_file(out / "suggest" / "label_next.gpkg", layer="label_next")
    picks = [(r.scene, int(r.col_off), int(r.row_off)) for r in ranked.itertuples()]
    return [p for p in picks if p not in labelled][:n]


def run(workdir: Path, *, minutes: float = 3.0, initial: int = 60, squares: int = 20,
        seed: int = 0) -> dict:
    """Run the three arms in ``workdir``; return their scores."""
    from pipeline.config import SampleConfig
    from pipeline.stages.sample import make_sample

    sample = workdir / "sample"
    make_sample(sample, cfg=SampleConfig(seed=seed))
    pool = [sq for s in sorted((sample / "raw" / "images").glob("*.tif")) for sq in _squares(s)]
    rng = np.random.default_rng(seed)
    start = {pool[i] for i in rng.choice(len(pool), initial, replace=False)}
    settings = _settings(minutes, seed)
    result = {"pool_squares": len(pool), "chip": CHIP, "minutes": minutes, "seed": seed,
              "arms": {"initial": _arm(workdir / "initial", sample, start, settings)}}
    chosen = _suggested(workdir / "initial", sample, start, squares, settings)
    rest = [sq for sq in pool if sq not in start]
    randoms = [rest[i] for i in rng.choice(len(rest), squares, replace=False)]
    result["overlap_suggested_random"] = len(set(chosen) & set(randoms))
    for name, extra in (("suggested", chosen), ("random", randoms)):
        result["arms"][name] = _arm(workdir / name, sample, start | set(extra), settings)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="training budget per arm")
    parser.add_argument("--initial", type=int, default=60, help="squares labelled at first")
    parser.add_argument("--squares", type=int, default=20, help="squares added per arm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="kept when given")
    parser.add_argument("--out", type=Path, default=Path("reports/bench/active_learning.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        result = run(workdir, minutes=args.minutes, initial=args.initial,
                     squares=args.squares, seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
