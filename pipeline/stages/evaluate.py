"""Metrics of the predicted scenes against ground-truth car footprints.

Pixel level: truth is rasterized on each predicted mask's grid; pixels the mask marks 255
(nodata) are ignored. Object level: predicted polygons are matched one to one with truth
polygons by an optimal assignment (Hungarian, ``scipy.optimize.linear_sum_assignment``) rather
than greedily, so a car is never lost because a neighbour grabbed its partner first.

Truth may come in any vector format and CRS; it is reprojected to each scene's CRS. A truth car
counts in the one scene that sees most of it, when that is at least half of it; cars cut by every
scene's valid edge are ignored (neither missed nor falsely found), so an edge car is not one FN plus
one FP, and a car in two overlapping scenes is not counted twice.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import numpy as np
import rasterio
import rasterio.features
import rasterio.windows
import shapely
from rasterio.windows import Window
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.config import EvaluateConfig
from pipeline.errors import InputError
from pipeline.files import atomic_dir, write_json
from pipeline.geo import NODATA, PROB_SCALE, gsd_m, metres_per_unit
from pipeline.io import read_vector
from pipeline.layout import Layout
from pipeline.scenes import EMPTY_REASON, has_valid_pixels, list_scenes, open_scene, scene_name
from pipeline.scores import prf

log = logging.getLogger(__name__)

THRESHOLDS = [round(0.05 * i, 2) for i in range(1, 20)]  # 0.05 .. 0.95
STRIP_ROWS = 1024  # rows read at a time: memory stays bounded on any scene size


# === Matching ===

def match_objects(truth: list, pred: list, *, cfg: EvaluateConfig
                  ) -> tuple[list[tuple[int, int, float]], np.ndarray]:
    """Match truth and predicted polygons one to one.

    The assignment maximises the number of matches first and the total IoU (or closeness) second.
    It is solved per connected group of candidate pairs, so memory stays small on scenes with
    thousands of cars.

    Returns:
        ``(truth_index, pred_index, iou)`` for every match, and each truth polygon's best IoU
        with any prediction.
    """
    best_iou = np.zeros(len(truth))
    if not truth or not pred:
        return [], best_iou
    t_geoms, p_geoms = np.asarray(truth, dtype=object), np.asarray(pred, dtype=object)
    if cfg.match_by == "iou":
        ti, pi = shapely.STRtree(p_geoms).query(t_geoms, predicate="intersects")
    else:
        ti, pi = shapely.STRtree(shapely.centroid(p_geoms)).query(
            shapely.centroid(t_geoms), predicate="dwithin", distance=cfg.max_centroid_m)
    if len(ti) == 0:
        return [], best_iou
    inter = shapely.area(shapely.intersection(t_geoms[ti], p_geoms[pi]))
    union = shapely.area(shapely.union(t_geoms[ti], p_geoms[pi]))
    iou = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
    np.maximum.at(best_iou, ti, iou)
    if cfg.match_by == "iou":
        ok = iou >= cfg.iou_threshold
        score = iou
    else:
        dist = shapely.distance(shapely.centroid(t_geoms[ti]), shapely.centroid(p_geoms[pi]))
        ok = dist <= cfg.max_centroid_m
        score = 1.0 - dist / cfg.max_centroid_m
    ti, pi, iou, score = ti[ok], pi[ok], iou[ok], score[ok]
    if len(ti) == 0:
        return [], best_iou
    n_t, n_p = len(truth), len(pred)
    graph = coo_matrix((np.ones(len(ti)), (ti, n_t + pi)), shape=(n_t + n_p,) * 2)
    _, group = connected_components(graph, directed=False)
    pair_iou = dict(zip(zip(ti.tolist(), pi.tolist(), strict=True), iou.tolist(), strict=True))
    matches = []
    pair_group = group[ti]
    for g in np.unique(pair_group):
        sel = pair_group == g
        rows, cols = np.unique(ti[sel]), np.unique(pi[sel])
        r_idx = {v: k for k, v in enumerate(rows.tolist())}
        c_idx = {v: k for k, v in enumerate(cols.tolist())}
        # Each allowed pair is worth more than all score bonuses together: maximise count first.
        big = min(len(rows), len(cols)) + 1.0
        weight = np.zeros((len(rows), len(cols)))
        for t, p, s in zip(ti[sel], pi[sel], score[sel], strict=True):
            weight[r_idx[t], c_idx[p]] = big + s
        r, c = linear_sum_assignment(weight, maximize=True)
        for a, b in zip(r, c, strict=True):
            if weight[a, b] > 0:
                t, p = int(rows[a]), int(cols[b])
                matches.append((t, p, float(pair_iou[(t, p)])))
    return sorted(matches), best_iou


_prf = prf  # the one rule (pipeline.scores)


# === Per scene ===
# A truth car counts where at least this share of it lies on a scene's valid pixels. A car cut by
# the scene's (or the nodata collar's) edge is otherwise "ignored": it is no miss, and a
# prediction matching it is neither a hit nor a false alarm. A car seen by several overlapping
# scenes counts once, in the scene that sees most of it.
MIN_TRUTH_COVER = 0.5


def _scene_truth(truth, src) -> list[tuple[int, object]]:
    """(truth id, polygon in the scene CRS) of the truth polygons that meet the scene's bounds."""
    if truth is None or len(truth) == 0:
        return []
    gdf = truth.to_crs(src.crs) if truth.crs != src.crs else truth
    left, bottom, right, top = src.bounds
    idx = np.sort(gdf.sindex.query(shapely.box(left, bottom, right, top), predicate="intersects"))
    out = []
    for i in idx:
        g = gdf.geometry.iloc[i]
        if g is None or g.is_empty:
            continue
        out.append((int(i), shapely.make_valid(g) if not g.is_valid else g))
    return out


def _pixel_counts(src, prob_src, geoms: list) -> tuple[dict, np.ndarray, tuple]:
    """Pixel TP/FP/FN, each truth polygon's count of valid pixels, probability histograms.

    Read in strips of rows, so memory stays bounded on any scene size.
    """
    tree = shapely.STRtree(geoms) if geoms else None
    counts = {"tp": 0, "fp": 0, "fn": 0}
    valid_px = np.zeros(len(geoms), np.int64)
    hist_pos = np.zeros(255, np.int64) if prob_src is not None else None
    hist_neg = np.zeros(255, np.int64) if prob_src is not None else None
    for row in range(0, src.height, STRIP_ROWS):
        win = Window(0, row, src.width, min(STRIP_ROWS, src.height - row))
        wt = rasterio.windows.transform(win, src.transform)
        mask = src.read(1, window=win)
        valid = mask != NODATA
        truth_px = np.zeros(mask.shape, bool)
        if tree is not None:
            box = shapely.box(*rasterio.windows.bounds(win, src.transform))
            near = np.sort(tree.query(box, predicate="intersects"))
            if len(near):
                ids = rasterio.features.rasterize(
                    [(geoms[i], int(i) + 1) for i in near], out_shape=mask.shape, transform=wt,
                    fill=0, dtype="int32")
                truth_px = ids > 0
                valid_px += np.bincount(ids[valid & truth_px] - 1, minlength=len(geoms))
        truth_px &= valid
        pred_px = (mask == 1) & valid
        counts["tp"] += int(np.sum(pred_px & truth_px))
        counts["fp"] += int(np.sum(pred_px & ~truth_px))
        counts["fn"] += int(np.sum(~pred_px & truth_px))
        if prob_src is not None:
            # Histograms of probability for truth and background pixels give every threshold.
            prob = prob_src.read(1, window=win)
            ok = valid & (prob != NODATA)
            hist_pos += np.bincount(prob[ok & truth_px], minlength=256)[:255]
            hist_neg += np.bincount(prob[ok & ~truth_px], minlength=256)[:255]
    return counts, valid_px, (hist_pos, hist_neg)


def _scene_pass(mask_tif: Path, out_dir: Path, truth, *, cfg: EvaluateConfig) -> dict:
    """First pass over one scene: pixel counts, how much of each truth car it sees, its cars."""
    scene = scene_name(mask_tif)
    prob_tif = out_dir / "probability" / f"{scene}.tif"
    with open_scene(mask_tif) as src:
        gsd = gsd_m(src.transform, src.crs)
        pixel_area = abs(src.transform.determinant)
        crs = src.crs
        candidates = _scene_truth(truth, src)
        prob_src = rasterio.open(prob_tif) if prob_tif.exists() else None
        try:
            counts, valid_px, hists = _pixel_counts(src, prob_src, [g for _, g in candidates])
        finally:
            if prob_src is not None:
                prob_src.close()
    cover = {tid: float(n * pixel_area / g.area) if g.area > 0 else 0.0
             for (tid, g), n in zip(candidates, valid_px, strict=True)}
    cars_file = Layout(out=Path(out_dir)).find_cars(scene)
    pred_geoms: list = []
    pred_prob: list = []
    if cars_file is None:
        log.warning("%s: no car polygons in %s; object metrics count it as no cars", scene,
                    out_dir / "cars")
    else:
        cars = read_vector(cars_file)
        if len(cars):
            cars = cars.to_crs(crs) if cars.crs != crs else cars
            pred_geoms = list(cars.geometry)
            pred_prob = [float(v) for v in cars.get("mean_prob", [float("nan")] * len(cars))]
    return {"scene": scene, "gsd": gsd, "unit": metres_per_unit(crs), "counts": counts,
            "hists": hists, "candidates": candidates, "cover": cover, "pred": pred_geoms,
            "pred_prob": pred_prob, "vectors": str(cars_file) if cars_file else None}


def _object_prf(counted: list, ignored: list, pred: list, cfg: EvaluateConfig) -> tuple:
    """Object P/R/F1 with the ignored truth cars taking their matches out of play."""
    matches, best = match_objects(counted + ignored, pred, cfg=cfg)
    n = len(counted)
    hits = [(t, p, i) for t, p, i in matches if t < n]
    taken = {p for t, p, _ in matches if t >= n}  # matched an ignored car: not a false alarm
    if ignored:
        # A sliver of an ignored car (seen cut by the edge) is no false alarm either: a
        # prediction lying mostly on one is taken out of play too.
        hit = {p for _, p, _ in hits}
        rest = [j for j in range(len(pred)) if j not in hit and j not in taken]
        if rest:
            union = shapely.union_all(ignored)
            for j in rest:
                area = pred[j].area
                if area > 0 and pred[j].intersection(union).area >= 0.5 * area:
                    taken.add(j)
    tp = len(hits)
    return _prf(tp, len(pred) - tp - len(taken), n - tp), hits, best[:n], taken


def _scene_objects(first: dict, owned: set[int], cfg: EvaluateConfig) -> dict:
    """Second pass: object metrics of one scene, counting only the truth cars it owns."""
    scene, unit = first["scene"], first["unit"]
    area_m2 = unit * unit
    counted = [g for tid, g in first["candidates"] if tid in owned]
    ignored = [g for tid, g in first["candidates"]
               if tid not in owned and first["cover"].get(tid, 0) > 0]
    pred = first["pred"]
    obj, matches, best_iou, taken = _object_prf(counted, ignored, pred, cfg)
    obj["mean_iou_matched"] = float(np.mean([m[2] for m in matches])) if matches else float("nan")
    # Labels are often boxes: the same matching at IoU 0.3, of envelopes, and by centroids.
    variants = {
        "iou_0.3": _object_prf(counted, ignored, pred,
                               cfg.model_copy(update={"match_by": "iou", "iou_threshold": 0.3}))[0],
        "iou_0.5": _object_prf(counted, ignored, pred,
                               cfg.model_copy(update={"match_by": "iou", "iou_threshold": 0.5}))[0],
        "envelope_iou_0.5": _object_prf(
            [g.envelope for g in counted], [g.envelope for g in ignored],
            [g.envelope for g in pred],
            cfg.model_copy(update={"match_by": "iou", "iou_threshold": 0.5}))[0],
        "centroid": _object_prf(counted, ignored, pred,
                                cfg.model_copy(update={"match_by": "centroid"}))[0],
    }
    t_match = {t: (p, i) for t, p, i in matches}
    p_match = {p: (t, i) for t, p, i in matches}
    objects = []
    for i, g in enumerate(counted):
        p, iou = t_match.get(i, (None, best_iou[i] if len(best_iou) else 0.0))
        c = g.centroid
        objects.append({"scene": scene, "kind": "truth", "id": i, "matched": p is not None,
                        "match_id": "" if p is None else p, "iou": round(float(iou), 4),
                        "area_m2": round(g.area * area_m2, 3), "x": round(c.x, 3),
                        "y": round(c.y, 3), "mean_prob": ""})
    for j, g in enumerate(pred):
        if j in taken:
            continue
        t, iou = p_match.get(j, (None, 0.0))
        c = g.centroid
        objects.append({"scene": scene, "kind": "pred", "id": j, "matched": t is not None,
                        "match_id": "" if t is None else t, "iou": round(float(iou), 4),
                        "area_m2": round(g.area * area_m2, 3), "x": round(c.x, 3),
                        "y": round(c.y, 3),
                        "mean_prob": round(first["pred_prob"][j], 4) if first["pred_prob"] else ""})
    n_pred = len(pred) - len(taken)
    counts = first["counts"]
    return {"scene": scene, "gsd": first["gsd"],
            "pixel": _prf(counts["tp"], counts["fp"], counts["fn"]), "object": obj,
            "object_variants": variants, "truth_cars": len(counted), "pred_cars": n_pred,
            "ignored_truth_cars": len(ignored), "count_error": n_pred - len(counted),
            "vectors": first["vectors"], "_hist": first["hists"], "_objects": objects,
            "_truth_areas": [(g.area * area_m2, i in t_match) for i, g in enumerate(counted)]}


def assign_truth(firsts: list[dict]) -> list[set[int]]:
    """The truth cars each scene counts: those it sees at least half of, each in one scene only
    (the one that sees most of it; the first such scene on a tie)."""
    best: dict[int, tuple[float, int]] = {}
    for k, first in enumerate(firsts):
        for tid, cover in first["cover"].items():
            if cover >= MIN_TRUTH_COVER and cover > best.get(tid, (-1.0, 0))[0] + 1e-9:
                best[tid] = (cover, k)
    owned: list[set[int]] = [set() for _ in firsts]
    for tid, (_, k) in best.items():
        owned[k].add(tid)
    return owned


def evaluate_scene(mask_tif: Path, out_dir: Path, truth, *, cfg: EvaluateConfig) -> dict:
    """Pixel, threshold and object counts of one scene evaluated on its own."""
    first = _scene_pass(mask_tif, out_dir, truth, cfg=cfg)
    return _scene_objects(first, assign_truth([first])[0], cfg)


# === All scenes ===

def _threshold_rows(hist_pos: np.ndarray, hist_neg: np.ndarray) -> list[dict]:
    values = np.arange(255) / PROB_SCALE
    rows = []
    for t in THRESHOLDS:
        above = values >= t - 1e-9
        tp, fp = hist_pos[above].sum(), hist_neg[above].sum()
        fn = hist_pos[~above].sum()
        m = _prf(tp, fp, fn)
        rows.append({"threshold": t, **{k: m[k] for k in ("precision", "recall", "f1", "iou")}})
    return rows


def _recall_by_size(areas: list[tuple[float, bool]], bins: list[float]) -> list[dict]:
    rows = []
    for lo, hi in zip(bins[:-1], bins[1:], strict=True):
        inside = [m for a, m in areas if lo <= a < hi]
        rows.append({"min_m2": lo, "max_m2": hi, "truth_cars": len(inside),
                     "recall": (sum(inside) / len(inside)) if inside else float("nan")})
    return rows


def _write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _clean(value):
    """NaN is not JSON: write null instead."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, float | np.floating):
        return None if math.isnan(value) else round(float(value), 6)
    if isinstance(value, np.integer):
        return int(value)
    return value


EVALUATION_FILES = ("metrics.json", "per_scene.csv", "objects.csv", "thresholds.csv")


def _masks_to_score(out_dir: Path, images: Path | None) -> tuple[list[Path], list[str]]:
    """The predicted masks to score (of the scenes in ``images`` when given, so a scene
    removed from the batch is not scored on an old mask) and the empty scenes left out."""
    masks = list_scenes(out_dir / "masks")
    if images is not None:
        batch = {scene_name(p) for p in list_scenes(images)}
        masks = [m for m in masks if scene_name(m) in batch]
    if not masks:
        where = f" of the scenes in {images}" if images is not None else ""
        raise InputError(f"{out_dir / 'masks'}: no predicted masks{where}; run `make predict` "
                         "first")
    # A scene without one valid pixel was never looked at: listing it with 0 truth and 0
    # predicted cars would read as a perfect scene (summary.csv gives it status "empty").
    empty = [scene_name(m) for m in masks if not has_valid_pixels(m)]
    for scene in empty:
        log.warning("%s: %s; left out of the evaluation", scene, EMPTY_REASON)
    masks = [m for m in masks if scene_name(m) not in empty]
    if not masks:
        raise InputError(f"{out_dir / 'masks'}: no predicted scene has a valid pixel; "
                         "nothing to evaluate")
    return masks, empty


def _read_truth(truth: Path):
    """The truth's polygons; an empty file warns (evaluate then finds no car to score)."""
    truth_gdf = read_vector(truth, role="truth")
    if not len(truth_gdf):
        log.warning("%s: the ground truth holds no car", truth)
        return truth_gdf
    polys = truth_gdf.geometry.geom_type.isin(["Polygon", "MultiPolygon"])
    if not polys.all():
        log.warning("%s: %d non-polygon truth features ignored", truth, int((~polys).sum()))
        truth_gdf = truth_gdf[polys]
    return truth_gdf


def _check_truth_seen(truth: Path, firsts: list[dict]) -> None:
    """Warn per scene without a truth car on its valid pixels; refuse when no scene has one:
    scores against no truth (recall of nothing, every car a false alarm) measure where the
    truth lies (wrong CRS, another place), not the model."""
    seen = [any(c > 0 for c in first["cover"].values()) for first in firsts]
    for first, ok in zip(firsts, seen, strict=True):
        if not ok:
            log.warning("%s: no truth car of %s in this scene's footprint", first["scene"], truth)
    if not any(seen):
        raise InputError(f"{truth}: no truth car lies in the footprint of the "
                         f"{len(firsts)} scenes evaluated; check its CRS and extent")


def evaluate(out_dir: Path, truth: Path, *, cfg: EvaluateConfig,
             images: Path | None = None) -> Path:
    """Evaluate the predicted scenes in ``out_dir`` against ``truth``.

    Writes ``out_dir/evaluation/`` (atomically, as one folder): ``metrics.json`` (overall and
    per scene), ``per_scene.csv``, ``objects.csv`` (every truth and predicted car with its match
    and IoU) and ``thresholds.csv`` (pixel precision/recall/F1 for thresholds 0.05..0.95).

    Args:
        truth: a vector file or ``file:layer``, any CRS.
        images: the batch's folder: only its scenes are scored (default every mask in OUT).

    Returns:
        The path of ``metrics.json``.

    Raises:
        InputError: no predicted masks, an unreadable truth file, or no truth car in the
            footprint of the scenes evaluated.
    """
    out_dir, truth = Path(out_dir), Path(truth)
    masks, empty = _masks_to_score(out_dir, Path(images) if images is not None else None)
    truth_gdf = _read_truth(truth)
    firsts = [_scene_pass(m, out_dir, truth_gdf, cfg=cfg) for m in masks]
    _check_truth_seen(truth, firsts)
    results = [_scene_objects(f, owned, cfg)
               for f, owned in zip(firsts, assign_truth(firsts), strict=True)]

    sums = {k: sum(r["pixel"][k] for r in results) for k in ("tp", "fp", "fn")}
    pixel = _prf(sums["tp"], sums["fp"], sums["fn"])
    osums = {k: sum(r["object"][k] for r in results) for k in ("tp", "fp", "fn")}
    obj = _prf(osums["tp"], osums["fp"], osums["fn"])
    variants = {}
    for name in results[0]["object_variants"]:
        v = {k: sum(r["object_variants"][name][k] for r in results) for k in ("tp", "fp", "fn")}
        variants[name] = _prf(v["tp"], v["fp"], v["fn"])
    errors = [r["count_error"] for r in results]
    truth_cars = sum(r["truth_cars"] for r in results)
    count = {"truth_cars": truth_cars, "pred_cars": sum(r["pred_cars"] for r in results),
             "mean_abs_error": float(np.mean(np.abs(errors))),
             "total_error": int(sum(errors)),
             "relative_error": (sum(errors) / truth_cars) if truth_cars else float("nan")}
    areas = [a for r in results for a in r["_truth_areas"]]
    hists = [r["_hist"] for r in results if r["_hist"][0] is not None]
    thresholds = (_threshold_rows(sum(h[0] for h in hists), sum(h[1] for h in hists))
                  if hists else [])
    metrics = {
        "truth": str(truth),
        "settings": cfg.model_dump(mode="json"),
        "overall": {"pixel": pixel, "object": obj, "object_variants": variants, "count": count,
                    "recall_by_size": _recall_by_size(areas, cfg.size_bins_m2),
                    "scenes": len(results), "empty_scenes": empty},
        "per_scene": {r["scene"]: {k: v for k, v in r.items() if not k.startswith("_")}
                      for r in results},
    }
    per_scene = [{"scene": r["scene"], "truth_cars": r["truth_cars"], "pred_cars": r["pred_cars"],
                  "count_error": r["count_error"],
                  **{f"pixel_{k}": r["pixel"][k] for k in ("iou", "precision", "recall", "f1")},
                  **{f"object_{k}": r["object"][k] for k in ("precision", "recall", "f1")},
                  "object_tp": r["object"]["tp"], "object_fp": r["object"]["fp"],
                  "object_fn": r["object"]["fn"]} for r in results]
    objects = [o for r in results for o in r["_objects"]]
    target = out_dir / "evaluation"
    # Only these four are evaluate's: anything else in the folder (a user's notes, the
    # folder's lock and manifest) is carried into the new one.
    with atomic_dir(target, owned=EVALUATION_FILES) as tmp:
        write_json(tmp / "metrics.json", _clean(metrics))
        _write_csv(tmp / "per_scene.csv", _clean(per_scene), list(per_scene[0]))
        _write_csv(tmp / "objects.csv", objects,
                   ["scene", "kind", "id", "matched", "match_id", "iou", "area_m2", "x", "y",
                    "mean_prob"])
        _write_csv(tmp / "thresholds.csv", _clean(thresholds),
                   ["threshold", "precision", "recall", "f1", "iou"])
    log.info("evaluated %d scenes: pixel IoU %.3f, object F1 %.3f, %d/%d cars matched",
             len(results), pixel["iou"] if not math.isnan(pixel["iou"]) else float("nan"),
             obj["f1"] if not math.isnan(obj["f1"]) else float("nan"), osums["tp"], truth_cars)
    return target / "metrics.json"
