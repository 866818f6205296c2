"""Box labels: train on car outlines or on their axis-aligned boxes, score against boxes.

    python -m bench.bench_boxes DATA WORK [--labels outlines|boxes] [--config F] [--set k=v ...]
                                [--minutes M] [--retrain] [--out F]

Real car labels are often axis-aligned boxes (the real-imagery check of issue 13 is labelled
so, and scored against boxes), while the sample labels cars by their outlines. This repeats a
sample run as the real data is labelled: ``DATA`` (a sample written by ``make sample``) is
copied to ``WORK/data_<labels>`` with every training label, and the truth, replaced by its
axis-aligned box on the scene grid (:func:`pipeline.stages.rasterize.label_boxes`); then the pipeline's
own stages tile, rasterize, train into ``WORK/model_<labels>`` (kept between runs unless
``--retrain``), predict, vectorize and evaluate the incoming scenes, against the box truth and
against the outline truth. The result holds each evaluation's object F1 variants (IoU 0.5, IoU
0.3, envelopes at IoU 0.5, centroids), the count and the error sources of the box evaluation:
false cars near the scene edge, small ones, and fragments of a truth box; missed boxes that
share one predicted car (merged neighbours).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from bench.harness import prepare_chips

log = logging.getLogger(__name__)


def box_copy(src: Path, dst: Path) -> Path:
    """Copy a sample's data folder with its labels and truth replaced by axis-aligned boxes."""
    import rasterio

    from pipeline.io import list_vectors, read_vector, write_vector
    from pipeline.scenes import list_scenes
    from pipeline.stages.rasterize import label_boxes

    src, dst = Path(src), Path(dst)
    scenes = list_scenes(src / "raw" / "images")
    with rasterio.open(scenes[0]) as ds:
        crs = ds.crs  # the sample's scenes share one grid CRS
    for sub in ("raw/images", "incoming"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
        for path in list_scenes(src / sub):
            if not (dst / sub / path.name).exists():
                shutil.copy2(path, dst / sub / path.name)
    (dst / "raw" / "labels").mkdir(parents=True, exist_ok=True)
    for path in list_vectors(src / "raw" / "labels"):
        boxes = label_boxes(read_vector(path), crs)
        write_vector(boxes, dst / "raw" / "labels" / f"{path.stem}.gpkg", layer="cars")
    truth = read_vector(src / "truth" / "cars.gpkg")
    write_vector(label_boxes(truth, crs), dst / "truth" / "cars.gpkg", layer="cars")
    return dst


def outline_copy(src: Path, dst: Path) -> Path:
    """Copy a sample's data folder as it is (so its interim files stay apart)."""
    if not Path(dst).exists():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("interim", "processed"))
    return Path(dst)


def error_sources(cars_files: list[Path], truth_file: Path, *, iou: float = 0.3) -> dict:
    """Why predicted cars miss the truth boxes: the share of each kind of error.

    A false car (no truth box at IoU >= ``iou`` of its envelope) is an ``edge`` car when it
    lies within 2 m of its scene's edge, a ``fragment`` when more than half of it lies in one
    truth box that is matched by another car or is over twice its envelope's area, else
    ``small`` (under 6 m2) or ``other``. A missed box is ``merged`` when a predicted car covers
    it by half and also another box.
    """
    import geopandas as gpd
    import numpy as np
    import pandas as pd
    import shapely

    from pipeline.io import read_vector

    truth = read_vector(truth_file)
    pred = pd.concat([read_vector(p) for p in cars_files], ignore_index=True)
    pred = gpd.GeoDataFrame(pred, geometry="geometry", crs=truth.crs)
    out = {"false": {"edge": 0, "fragment": 0, "small": 0, "other": 0},
           "missed": {"merged": 0, "other": 0}}
    if not len(pred):
        out["missed"]["other"] = len(truth)
        return out
    t_geoms = truth.geometry.to_numpy()
    env = shapely.envelope(pred.geometry.to_numpy())
    inter = shapely.area(shapely.intersection(env[:, None], t_geoms[None, :]))
    union = shapely.area(shapely.union(env[:, None], t_geoms[None, :]))
    ious = np.where(union > 0, inter / np.maximum(union, 1e-12), 0)
    p_ok = ious.max(axis=1) >= iou
    t_ok = ious.max(axis=0) >= iou
    areas = shapely.area(pred.geometry.to_numpy())
    for i in np.flatnonzero(~p_ok):
        share = inter[i] / max(shapely.area(env[i]), 1e-12)
        j = int(np.argmax(share))
        if pred["edge_dist_m"].iloc[i] < 2.0:
            out["false"]["edge"] += 1
        elif share[j] > 0.5 and (t_ok[j] or shapely.area(t_geoms[j]) > 2 * shapely.area(env[i])):
            out["false"]["fragment"] += 1
        elif areas[i] < 6.0:
            out["false"]["small"] += 1
        else:
            out["false"]["other"] += 1
    cover = inter / np.maximum(shapely.area(t_geoms)[None, :], 1e-12)
    for j in np.flatnonzero(~t_ok):
        i = int(np.argmax(cover[:, j]))
        merged = cover[i, j] > 0.5 and ((cover[i] > 0.5).sum() > 1)
        out["missed"]["merged" if merged else "other"] += 1
    return out


def _stages(data: Path, work: Path, model_dir: Path, cfg, *, retrain: bool) -> dict:
    from pipeline.stages.train import train

    times = {}
    if retrain or not (model_dir / "model.keras").exists():
        t0 = time.perf_counter()
        chips, masks = prepare_chips(data, work, cfg)
        times["prepare_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        if model_dir.exists():
            shutil.rmtree(model_dir)
        train(chips, masks, model_dir, cfg=cfg)
        times["train_s"] = round(time.perf_counter() - t0, 1)
    return times


def score(data: Path, model_dir: Path, out: Path, cfg, truths: dict[str, Path]) -> dict:
    """Predict, vectorize and evaluate ``data/incoming``; metrics against each truth file."""
    from pipeline.scenes import list_scenes
    from pipeline.stages.evaluate import evaluate
    from pipeline.stages.predict import predict_scene
    from pipeline.stages.vectorize import vectorize_scene

    if out.exists():
        shutil.rmtree(out)
    cars = []
    for scene in list_scenes(data / "incoming"):
        _, mask = predict_scene(scene, model_dir, out, cfg=cfg.predict)
        cars.append(vectorize_scene(mask, out, cfg=cfg.vectors))
    result = {}
    for name, truth in truths.items():
        metrics = json.loads(evaluate(out, truth, cfg=cfg.evaluate).read_text())["overall"]
        variants = {k: round(v["f1"], 4) for k, v in metrics["object_variants"].items()}
        result[name] = {"object_f1_iou_0.5": round(metrics["object"]["f1"], 4), **variants,
                        "count": metrics.get("count", {}),
                        "errors": error_sources(cars, truth)}
    return result


def run(data: Path, work: Path, *, labels: str = "boxes", cfg=None, retrain: bool = False
        ) -> dict:
    """Train on ``labels`` (outlines or boxes) from sample ``data``; score against both truths."""
    from pipeline.bundle import read_metadata
    from pipeline.config import Config

    cfg = cfg or Config()
    work = Path(work)
    outline_data = outline_copy(data, work / "data_outlines")
    box_data = box_copy(data, work / "data_boxes")
    train_data = box_data if labels == "boxes" else outline_data
    model_dir = work / f"model_{labels}"
    times = _stages(train_data, work / f"interim_{labels}", model_dir, cfg, retrain=retrain)
    meta = read_metadata(model_dir)
    t0 = time.perf_counter()
    scores = score(outline_data, model_dir, work / f"out_{labels}", cfg,
                   {"boxes": box_data / "truth" / "cars.gpkg",
                    "outlines": outline_data / "truth" / "cars.gpkg"})
    times["score_s"] = round(time.perf_counter() - t0, 1)
    return {"labels": labels, **times, "postprocess": meta.get("postprocess", {}),
            "threshold": meta.get("threshold"), "val_metrics": meta.get("val_metrics", {}),
            "box_labels_loss": meta.get("box_labels"), "scores": scores}


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import load_config
    from pipeline.files import write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="a sample data folder (make sample)")
    ap.add_argument("work", type=Path, help="scratch folder (models kept here)")
    ap.add_argument("--labels", choices=("outlines", "boxes"), default="boxes")
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--out", type=Path, help="result JSON (default WORK/result_<labels>.json)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    result = run(args.data, args.work, labels=args.labels, cfg=cfg, retrain=args.retrain)
    result["settings"] = args.overrides
    write_json(args.out or args.work / f"result_{args.labels}.json", result)
    print(json.dumps(result["scores"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
