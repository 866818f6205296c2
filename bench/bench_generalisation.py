"""Generalisation: train on one kind of sample scene, evaluate on scenes the model never saw.

    python -m bench.bench_generalisation [--quick] [--minutes M] [--set key=value ...] [--out F]

A model is trained on sample scenes of one seed and style at 0.15 m (with the settings given,
``configs/default.yaml`` by default), then it predicts, vectorizes and is evaluated (object F1 at
IoU 0.5, the pipeline's own stages) on scenes generated with:

- ``same``: the training seed and style (its held-out incoming scenes): the in-distribution score;
- ``seed``: another seed (other layouts, cars, colours of ground);
- ``gsd_0.10`` / ``gsd_0.20`` / ``gsd_0.30``: another ground sample distance (predict resamples
  to the model's);
- ``overcast`` / ``evening`` / ``faded``: other light and camera (``pipeline.stages.sample.STYLES``).

Every sample holds the hard cases of ``pipeline.stages.sample`` (edge-cut, tree-hidden and shadowed cars,
long vans, lorries and buses that are not cars); with 2 incoming scenes, the second is a sparse
street (cars on 1-3% of the pixels), so each condition scores a dense and a sparse scene.

The gap is each condition's object F1 minus ``same``'s. Vectors use the minimum car area the
bundle chose on validation (``metadata["postprocess"]["min_area_m2"]``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from bench.harness import prepare_chips

log = logging.getLogger(__name__)

# (name, seed, gsd, style) of the evaluation scenes; the training scenes are seed 0, default.
CONDITIONS = [
    ("same", 0, 0.15, "default"),
    ("seed", 101, 0.15, "default"),
    ("gsd_0.10", 102, 0.10, "default"),
    ("gsd_0.20", 103, 0.20, "default"),
    ("gsd_0.30", 107, 0.30, "default"),
    ("overcast", 104, 0.15, "overcast"),
    ("evening", 105, 0.15, "evening"),
    ("faded", 106, 0.15, "faded"),
]
QUICK_TRAIN = {"depth": 2, "base_filters": 8, "batch_size": 4, "steps_per_epoch": 4,
               "epochs": 2, "max_minutes": None, "validations": 2}


def _to_boxes(labels_dir: Path) -> None:
    """Rewrite every label file with each car's axis-aligned box in the scene's CRS."""
    from pipeline.io import list_vectors, read_vector, write_vector

    for path in list_vectors(labels_dir):
        cars = read_vector(path)
        utm = cars.to_crs(32633)  # the sample's scenes; boxes are axis-aligned on their grid
        utm["geometry"] = utm.geometry.envelope
        write_vector(utm.to_crs(cars.crs), path, layer="cars")


def _score(data: Path, model_dir: Path, out: Path, cfg, min_area: float,
           min_mean_prob: float = 0.0) -> dict:
    """Predict, vectorize and evaluate a sample's incoming scenes; the overall metrics.

    Cars under ``min_mean_prob`` are dropped from each car layer before evaluation (what
    ``vectors`` will do once it reads the bundle's choice).
    """
    from pipeline.io import read_vector, write_vector
    from pipeline.scenes import list_scenes
    from pipeline.stages.evaluate import evaluate
    from pipeline.stages.predict import predict_scene
    from pipeline.stages.vectorize import vectorize_scene

    vectors = cfg.vectors.model_copy(update={"min_area_m2": min_area})
    for scene in list_scenes(data / "incoming"):
        _, mask = predict_scene(scene, model_dir, out, cfg=cfg.predict)
        cars_file = vectorize_scene(mask, out, cfg=vectors)
        if min_mean_prob > 0:
            cars = read_vector(cars_file)
            kept = cars[~(cars["mean_prob"] < min_mean_prob)]
            if 0 < len(kept) < len(cars):
                write_vector(kept, cars_file, layer="cars")
    metrics = json.loads(evaluate(out, data / "truth" / "cars.gpkg",
                                  cfg=cfg.evaluate).read_text())
    overall = metrics["overall"]
    obj, pix, cnt = overall["object"], overall["pixel"], overall.get("count", {})
    return {"object_f1": obj["f1"], "object_precision": obj["precision"],
            "object_recall": obj["recall"], "pixel_iou": pix["iou"],
            "truth_cars": cnt.get("truth_cars"), "pred_cars": cnt.get("pred_cars")}


def run(workdir: Path, *, cfg=None, quick: bool = False, minutes: float | None = None,
        scene_size: int | None = None, train_scenes: int | None = None,
        eval_size: int | None = None, conditions: list | None = None,
        box_labels: bool = False) -> dict:
    """Train once, score every condition; returns rows with each condition's gap to ``same``.

    Args:
        workdir: scratch folder.
        cfg: settings (``pipeline.config.Config``); default ``configs/default.yaml`` values.
        quick: a tiny model, tiny scenes and a few steps (the test's path; numbers meaningless).
        minutes: ``train.max_minutes`` for the training run (None = the settings').
        scene_size: scene width and height in pixels (default 1000, quick 192).
        train_scenes: training scenes (default 4, quick 2).
        eval_size: evaluation scene side in pixels at 0.15 m (default 600, quick 192); other
            GSDs get the same ground extent.
        conditions: subset of ``CONDITIONS`` (default all).
        box_labels: replace the training labels by their axis-aligned envelopes (labels as
            people often draw them); truth for evaluation stays the car outlines.
    """
    from pipeline.bundle import read_metadata
    from pipeline.config import Config, SampleConfig
    from pipeline.stages.sample import make_sample
    from pipeline.stages.train import train

    workdir = Path(workdir)
    cfg = (cfg or Config()).model_copy(deep=True)
    if quick:
        cfg.tile.chip_size, cfg.tile.overlap = 64, 8
        cfg.train = cfg.train.model_copy(update=QUICK_TRAIN)
        cfg.predict.overlap = 16
    if minutes is not None:
        cfg.train.max_minutes = minutes
    size = scene_size or (192 if quick else 1000)
    n_train = train_scenes or (2 if quick else 4)
    eval_px = eval_size or (192 if quick else 600)
    started = time.perf_counter()
    train_data = workdir / "train_sample"
    make_sample(train_data, cfg=SampleConfig(seed=0, gsd=0.15, train_scenes=n_train,
                                             incoming_scenes=2, width=size, height=size))
    if box_labels:
        _to_boxes(train_data / "raw" / "labels")
    chips, masks = prepare_chips(train_data, workdir / "interim", cfg)
    model_dir = workdir / "model"
    t0 = time.perf_counter()
    train(chips, masks, model_dir, cfg=cfg)
    train_s = time.perf_counter() - t0
    meta = read_metadata(model_dir)
    post = meta.get("postprocess", {})
    min_area = float(post.get("min_area_m2", cfg.vectors.min_area_m2))
    min_prob = float(post.get("min_mean_prob", 0.0))
    rows = []
    for name, seed, gsd, style in conditions or CONDITIONS:
        if name == "same":
            data = train_data
        else:
            data = workdir / f"eval_{name}"
            # Same ground extent whatever the GSD, so each condition holds about as many cars.
            px = max(64, int(round(eval_px * 0.15 / gsd)))
            make_sample(data, cfg=SampleConfig(seed=seed, gsd=gsd, style=style, train_scenes=1,
                                               incoming_scenes=2, width=px, height=px))
        scores = _score(data, model_dir, workdir / f"out_{name}", cfg, min_area, min_prob)
        rows.append({"condition": name, "seed": seed, "gsd": gsd, "style": style, **scores})
        log.info("%s: object F1 %.3f", name, scores["object_f1"])
    base = next((r["object_f1"] for r in rows if r["condition"] == "same"), None)
    for r in rows:
        r["gap_vs_same"] = (None if base is None or r["object_f1"] is None
                            else round(r["object_f1"] - base, 4))
    return {"quick": quick, "box_labels": box_labels, "train_seconds": round(train_s, 1),
            "total_seconds": round(time.perf_counter() - started, 1),
            "model": {"threshold": meta["threshold"], "min_area_m2": min_area,
                      "min_mean_prob": min_prob,
                      "val_metrics": meta.get("val_metrics", {}),
                      "train": {k: meta["train_config"]["train"][k] for k in
                                ("depth", "base_filters", "batch_size", "max_minutes",
                                 "crop_size")}},
            "conditions": rows}


def main(argv: list[str] | None = None) -> int:
    import tempfile

    from pipeline.config import load_config
    from pipeline.files import write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--minutes", type=float)
    ap.add_argument("--scene-size", type=int)
    ap.add_argument("--eval-size", type=int)
    ap.add_argument("--box-labels", action="store_true", help="train on envelopes of the labels")
    ap.add_argument("--only", action="append", help="condition names (default all)")
    ap.add_argument("--out", type=Path, default=Path("reports/bench/generalisation.json"))
    ap.add_argument("--workdir", type=Path, help="keep the scratch files here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    conditions = [c for c in CONDITIONS if not args.only or c[0] in args.only]
    if args.workdir:
        result = run(args.workdir, cfg=cfg, quick=args.quick, minutes=args.minutes,
                     scene_size=args.scene_size, eval_size=args.eval_size,
                     conditions=conditions, box_labels=args.box_labels)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-generalisation-") as tmp:
            result = run(Path(tmp), cfg=cfg, quick=args.quick, minutes=args.minutes,
                         scene_size=args.scene_size, eval_size=args.eval_size,
                         conditions=conditions, box_labels=args.box_labels)
    write_json(args.out, result)
    for r in result["conditions"]:
        print(f"{r['condition']:10s} object F1 {r['object_f1']:.3f} "
              f"(P {r['object_precision']:.3f} R {r['object_recall']:.3f}) "
              f"gap {r['gap_vs_same']:+.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
