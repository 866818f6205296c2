"""Post-processing chosen for objects: the car threshold and minimum car area, by object F1.

After training, the validation chips' probabilities are turned into cars the way ``vectorize``
does it (threshold, 8-connected blobs, touching cars split with ``vectorize.split_component``,
blobs outside ``[min_area_m2, max_area_m2]`` dropped) for every candidate threshold and minimum
area, and the pair with the best object F1 at IoU 0.5 wins. Pixel IoU rewards fat masks and
keeps small fragments; object F1 counts each fragment and sliver as a false car, which is what
a user counting cars sees.

Truth cars on a chip are the blobs of its mask, split the same way (touching cars share pixels
in a mask, so their polygons are gone by now; the same splitter that parts predicted touching
cars parts them). Objects cut by the chip's edge or by nodata are "don't care" on both sides:
a car whose other half lies on the next chip is neither a hit nor a miss here.

At IoU >= 0.5 a car can overlap at most one other car that well, so matching is one to one
without an assignment solver.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.config import VectorConfig

IGNORE = 255
MATCH_IOU = 0.5
# Candidates searched on validation. Thresholds span the useful range of a sigmoid output; areas
# run from below the smallest car (~4.5 m2) up to where the real data peaked (6 m2) and a
# bit beyond, so a good model can still choose a low value.
THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(4, 18))  # 0.20 .. 0.85
MIN_AREAS_M2 = (1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 7.0)
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass
class Objects:
    """Cars on one chip: a label raster and per-car area (m2), mean probability, don't-care."""

    labels: np.ndarray  # int32, 0 = no car, k = car k (1-based)
    area_m2: np.ndarray  # (n,)
    mean_prob: np.ndarray  # (n,) NaN where no probability was given
    dont_care: np.ndarray  # (n,) bool: touches the chip edge or nodata


def find_objects(cars: np.ndarray, *, gsd: float, cfg: VectorConfig, valid: np.ndarray,
                 prob: np.ndarray | None = None) -> Objects:
    """Cars in a boolean chip mask, split like ``vectorize`` splits them (no area filter).

    Args:
        cars: boolean (rows, cols) car pixels.
        gsd: pixel size in metres.
        cfg: vector settings (splitting knobs; its ``min_area_m2`` only limits split pieces).
        valid: boolean mask of pixels with data.
        prob: car probability in [0, 1], used to split touching cars and for ``mean_prob``.
    """
    from pipeline.vectorize import PROB_SCALE, split_component

    comps, n = ndimage.label(cars, structure=_EIGHT)
    labels = np.zeros(cars.shape, np.int32)
    edge = np.ones(cars.shape, bool)
    edge[1:-1, 1:-1] = False
    near_void = edge | ndimage.binary_dilation(~valid, structure=_EIGHT)
    prob_u8 = None if prob is None else np.round(np.clip(prob, 0, 1) * PROB_SCALE)
    k = 0
    for i, sl in enumerate(ndimage.find_objects(comps), start=1):
        if sl is None:
            continue
        comp = comps[sl] == i
        pieces = split_component(comp, gsd=gsd, cfg=cfg,
                                 prob=None if prob_u8 is None else prob_u8[sl])
        for v in range(1, int(pieces.max()) + 1):
            piece = pieces == v
            if not piece.any():
                continue
            k += 1
            labels[sl][piece] = k
    idx = np.arange(1, k + 1)
    area = ndimage.sum_labels(np.ones(cars.shape), labels, idx) * gsd * gsd if k else np.zeros(0)
    if prob is not None and k:
        mean_prob = ndimage.mean(prob, labels, idx)
    else:
        mean_prob = np.full(k, np.nan)
    dont_care = (ndimage.maximum(near_void, labels, idx) > 0 if k else np.zeros(0, bool))
    return Objects(labels, np.asarray(area, float), np.asarray(mean_prob, float),
                   np.asarray(dont_care, bool))


def match(pred: Objects, truth: Objects, keep: np.ndarray) -> tuple[int, int, int, np.ndarray]:
    """Object counts at IoU >= 0.5 of the kept predicted cars against the truth cars.

    Args:
        pred: predicted cars; ``keep`` (bool per car) says which survive the area filter.
        truth: truth cars.

    Returns:
        ``(tp, fp, fn, matched)``: counts over cars that are not don't-care, and per kept
        predicted car whether it matched (don't-care cars report False and count nowhere).
    """
    n_p, n_t = len(pred.area_m2), len(truth.area_m2)
    kept_ids = np.flatnonzero(keep) + 1
    matched = np.zeros(n_p, bool)
    p_lab = np.where(np.isin(pred.labels, kept_ids), pred.labels, 0)
    both = (p_lab > 0) & (truth.labels > 0)
    partner_t = np.full(n_p, -1)
    partner_p = np.full(n_t, -1)
    if both.any():
        pairs, inter = np.unique(
            np.stack([p_lab[both], truth.labels[both]]), axis=1, return_counts=True)
        p_px = np.bincount(p_lab.ravel(), minlength=n_p + 1)
        t_px = np.bincount(truth.labels.ravel(), minlength=n_t + 1)
        iou = inter / (p_px[pairs[0]] + t_px[pairs[1]] - inter)
        for (p, t), value in zip(pairs.T, iou, strict=True):
            if value >= MATCH_IOU and partner_t[p - 1] < 0 and partner_p[t - 1] < 0:
                partner_t[p - 1], partner_p[t - 1] = t - 1, p - 1
    tp = fp = fn = 0
    for p in kept_ids - 1:
        t = partner_t[p]
        # A car matched to a don't-care truth car (or itself cut by the edge) counts nowhere.
        if pred.dont_care[p] or (t >= 0 and truth.dont_care[t]):
            continue
        if t >= 0:
            tp += 1
            matched[p] = True
        else:
            fp += 1
    for t in range(n_t):
        p = partner_p[t]
        if truth.dont_care[t] or p >= 0 and pred.dont_care[p]:
            continue
        if p < 0:
            fn += 1
    return tp, fp, fn, matched


def f1_score(tp: int, fp: int, fn: int) -> float:
    """Object F1 (1.0 when there was nothing to find and nothing was found)."""
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0


def choose(chips, *, gsd: float, cfg: VectorConfig, thresholds=THRESHOLDS,
           min_areas=MIN_AREAS_M2) -> dict:
    """Pick the threshold and minimum area with the best object F1 on validation chips.

    Args:
        chips: iterable of ``(prob, mask)`` per chip: probability (rows, cols) in [0, 1] and the
            truth mask (0, 1, 255 = ignore). It is walked once and kept in memory.
        gsd: pixel size in metres.
        cfg: vector settings (splitting and ``max_area_m2`` as predict's vectors will use them).
        thresholds, min_areas: the candidates.

    Returns:
        ``{"threshold", "min_area_m2", "object_f1", "precision", "recall", "tp", "fp", "fn",
        "table": [{threshold, min_area_m2, f1, tp, fp, fn}, ...], "validation_cars":
        {"mean_prob": [...], "matched": [...]}}``. Ties go to the threshold nearest 0.5, then
        to the smaller area (the least surprising choice).
    """
    chips = list(chips)
    # Split pieces smaller than the smallest candidate are never cars; larger ones are judged
    # by the area filter below, so splitting uses the smallest candidate.
    split_cfg = cfg.model_copy(update={"min_area_m2": float(min(min_areas))})
    truths = []
    for _prob, mask in chips:
        valid = mask != IGNORE
        truths.append(find_objects(mask == 1, gsd=gsd, cfg=split_cfg, valid=valid))
    counts = np.zeros((len(thresholds), len(min_areas), 3), np.int64)
    preds: dict[float, list[Objects]] = {}
    for a, th in enumerate(thresholds):
        preds[th] = []
        for (prob, mask), truth in zip(chips, truths, strict=True):
            valid = mask != IGNORE
            pred = find_objects((prob >= th) & valid, gsd=gsd, cfg=split_cfg, valid=valid,
                                prob=prob)
            preds[th].append(pred)
            for b, min_area in enumerate(min_areas):
                keep = (pred.area_m2 >= min_area) & (pred.area_m2 <= cfg.max_area_m2)
                counts[a, b] += match(pred, truth, keep)[:3]
    f1 = np.array([[f1_score(*counts[a, b]) for b in range(len(min_areas))]
                   for a in range(len(thresholds))])
    order = sorted(((a, b) for a in range(len(thresholds)) for b in range(len(min_areas))),
                   key=lambda ab: (-round(f1[ab], 6), abs(thresholds[ab[0]] - 0.5),
                                   min_areas[ab[1]]))
    a, b = order[0]
    th, min_area = float(thresholds[a]), float(min_areas[b])
    tp, fp, fn = (int(v) for v in counts[a, b])
    mean_prob, matched = [], []
    for pred, truth in zip(preds[th], truths, strict=True):
        keep = (pred.area_m2 >= min_area) & (pred.area_m2 <= cfg.max_area_m2)
        hit = match(pred, truth, keep)[3]
        for k in np.flatnonzero(keep & ~pred.dont_care):
            mean_prob.append(round(float(pred.mean_prob[k]), 4))
            matched.append(bool(hit[k]))
    table = [{"threshold": float(thresholds[i]), "min_area_m2": float(min_areas[j]),
              "f1": round(float(f1[i, j]), 4), "tp": int(counts[i, j, 0]),
              "fp": int(counts[i, j, 1]), "fn": int(counts[i, j, 2])}
             for i in range(len(thresholds)) for j in range(len(min_areas))]
    return {"threshold": th, "min_area_m2": min_area, "object_f1": float(f1[a, b]),
            "precision": tp / (tp + fp) if tp + fp else 1.0,
            "recall": tp / (tp + fn) if tp + fn else 1.0, "tp": tp, "fp": fp, "fn": fn,
            "table": table, "validation_cars": {"mean_prob": mean_prob, "matched": matched}}


def object_f1(chips, *, gsd: float, cfg: VectorConfig, threshold: float = 0.5) -> float:
    """Object F1 at IoU 0.5 at one threshold and ``cfg.min_area_m2`` (the cheap per-validation
    score used to keep the best weights during training)."""
    return choose(chips, gsd=gsd, cfg=cfg, thresholds=(threshold,),
                  min_areas=(cfg.min_area_m2,))["object_f1"]
