"""Post-processing chosen for objects: threshold, minimum car area and mean probability, by F1.

After training, the validation chips' probabilities are turned into cars the way ``vectorize``
does it (threshold, 8-connected blobs, touching cars split with ``splitting.split_component``,
blobs outside ``[min_area_m2, max_area_m2]`` dropped, and cars whose mean probability is below
``min_mean_prob``) for every candidate, and the combination with the best object F1 at IoU 0.5
wins. Pixel IoU rewards fat masks and
keeps small fragments; object F1 counts each fragment and sliver as a false car, which is what
a user counting cars sees.

Truth cars on a chip are the blobs of its mask, split the same way (touching cars share pixels
in a mask, so their polygons are gone by now; the same splitter that parts predicted touching
cars parts them). Objects cut by the chip's edge or by nodata are "don't care" on both sides:
a car whose other half lies on the next chip is neither a hit nor a miss here.

At IoU >= 0.5 a car can overlap at most one other car that well, so matching is one to one
without an assignment solver.

The minimum area of cars cut by the scene's edge (``vectors.min_truncated_area_m2``) is chosen
the same way on the validation chips at a scene's edge (``choose_truncated``): there a cut car
is scored like any other, since whether such a car is labelled at all is the convention to learn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.config import VectorConfig
from pipeline.geo import NODATA, PROB_SCALE
from pipeline.scores import f1, for_ranking, prf

IGNORE = NODATA  # mask pixels counted nowhere
MATCH_IOU = 0.5
# Candidates searched on validation. Thresholds span the useful range of a sigmoid output; areas
# run from below the smallest car (~4.5 m2) up to where the real data peaked (6 m2) and a
# bit beyond, so a good model can still choose a low value.
THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(4, 18))  # 0.20 .. 0.85
MIN_AREAS_M2 = (1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 7.0)
# A car's mean probability must reach this (0 = no filter): false blobs are often fainter than
# cars even where their peak passes the threshold.
MIN_MEAN_PROBS = (0.0, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)
_EIGHT = np.ones((3, 3), dtype=bool)
# Blobs larger than this many largest cars are not split here (splitting is the costly part and
# a poor model's sprawling blobs would make the search slow): they count as one blob that the
# area filter drops, a false car, which is what such a threshold deserves.
MAX_SPLIT_CARS = 8


@dataclass
class Objects:
    """Cars on one chip: a label raster and per-car area (m2), mean probability, don't-care."""

    labels: np.ndarray  # int32, 0 = no car, k = car k (1-based)
    area_m2: np.ndarray  # (n,)
    mean_prob: np.ndarray  # (n,) NaN where no probability was given
    dont_care: np.ndarray  # (n,) bool: touches the chip edge or nodata


def find_objects(cars: np.ndarray, *, gsd: float, cfg: VectorConfig, valid: np.ndarray,
                 prob: np.ndarray | None = None, split: bool = True) -> Objects:
    """Cars in a boolean chip mask, split like ``vectorize`` splits them (no area filter).

    Args:
        cars: boolean (rows, cols) car pixels.
        gsd: pixel size in metres.
        cfg: vector settings (splitting knobs; its ``min_area_m2`` only limits split pieces).
        valid: boolean mask of pixels with data.
        prob: car probability in [0, 1], used to split touching cars and for ``mean_prob``.
        split: split touching cars (False: blobs as they are, several times faster).
    """
    from pipeline.splitting import split_component

    if cfg.min_area_m2 is None:
        cfg = cfg.resolve()

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
        if not split or comp.sum() * gsd * gsd > MAX_SPLIT_CARS * cfg.max_car_area_m2:
            pieces = comp.astype(np.int32)
        else:
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


def _boxes(labels: np.ndarray, n: int) -> np.ndarray:
    """(n, 4) row0, col0, row1, col1 of each labelled car's axis-aligned box (1-based ids)."""
    out = np.zeros((n, 4), np.int64)
    for i, sl in enumerate(ndimage.find_objects(labels, max_label=n)):
        if sl is not None:
            out[i] = sl[0].start, sl[1].start, sl[0].stop, sl[1].stop
    return out


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of paired boxes (rows of ``a`` and ``b``, as ``_boxes`` gives them)."""
    rows = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    cols = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = rows * cols
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1)


def partners(pred: Objects, truth: Objects, *, envelopes: bool = False
             ) -> tuple[np.ndarray, np.ndarray]:
    """Each predicted car's truth partner at IoU >= 0.5 and each truth car's (-1 = none).

    At IoU >= 0.5 a car overlaps at most one other car that well, so partners do not depend on
    which other predicted cars are kept: they are found once and filtered by area afterwards.
    With ``envelopes`` the IoU is that of the cars' axis-aligned boxes (for box labels: a car
    drawn at its true heading fills only part of its label's box, and is still that car);
    only cars that share pixels are compared.
    """
    n_p, n_t = len(pred.area_m2), len(truth.area_m2)
    partner_t = np.full(n_p, -1)
    partner_p = np.full(n_t, -1)
    both = (pred.labels > 0) & (truth.labels > 0)
    if not both.any():
        return partner_t, partner_p
    key = pred.labels[both].astype(np.int64) * (n_t + 1) + truth.labels[both]
    pairs, inter = np.unique(key, return_counts=True)
    p_ids, t_ids = pairs // (n_t + 1), pairs % (n_t + 1)
    p_px = np.bincount(pred.labels.ravel(), minlength=n_p + 1)
    t_px = np.bincount(truth.labels.ravel(), minlength=n_t + 1)
    if envelopes:
        iou = _box_iou(_boxes(pred.labels, n_p)[p_ids - 1], _boxes(truth.labels, n_t)[t_ids - 1])
    else:
        iou = inter / (p_px[p_ids] + t_px[t_ids] - inter)
    for p, t, value in zip(p_ids, t_ids, iou, strict=True):
        if value >= MATCH_IOU and partner_t[p - 1] < 0 and partner_p[t - 1] < 0:
            partner_t[p - 1], partner_p[t - 1] = t - 1, p - 1
    return partner_t, partner_p


def count(pred: Objects, truth: Objects, keep: np.ndarray, found=None
          ) -> tuple[int, int, int, np.ndarray]:
    """Object counts at IoU >= 0.5 of the kept predicted cars against the truth cars.

    Args:
        pred: predicted cars; ``keep`` (bool per car) says which survive the area filter.
        truth: truth cars.
        found: ``partners(pred, truth)`` when already known.

    Returns:
        ``(tp, fp, fn, matched)``: counts over cars that are not don't-care, and per predicted
        car whether it is kept and matched (don't-care cars report False and count nowhere).
    """
    partner_t, partner_p = found if found is not None else partners(pred, truth)
    has_t = partner_t >= 0
    t_dc = np.zeros(len(partner_t), bool)
    t_dc[has_t] = truth.dont_care[partner_t[has_t]]
    scored = keep & ~pred.dont_care & ~t_dc
    matched = scored & has_t
    tp = int(matched.sum())
    fp = int((scored & ~has_t).sum())
    # A truth car is missed unless its partner is kept; a don't-care partner excuses it.
    has_p = partner_p >= 0
    p_kept = np.zeros(len(partner_p), bool)
    p_dc = np.zeros(len(partner_p), bool)
    p_kept[has_p] = keep[partner_p[has_p]]
    p_dc[has_p] = pred.dont_care[partner_p[has_p]]
    fn = int((~truth.dont_care & ~(has_p & p_dc) & ~(has_p & p_kept)).sum())
    return tp, fp, fn, matched


def match(pred: Objects, truth: Objects, keep: np.ndarray) -> tuple[int, int, int, np.ndarray]:
    """``count`` with partners found here (see there)."""
    return count(pred, truth, keep)


def f1_score(tp: int, fp: int, fn: int) -> float:
    """Object F1 for ranking candidates (1.0 when there was nothing to find and none found)."""
    return for_ranking(f1(tp, fp, fn))


def _take(values: np.ndarray, index: np.ndarray, fill) -> np.ndarray:
    """``values[index]`` where ``index >= 0``, ``fill`` elsewhere."""
    out = np.full(len(index), fill, dtype=np.asarray(values).dtype if len(values) else None)
    ok = index >= 0
    out[ok] = values[index[ok]]
    return out


@dataclass
class _Scored:
    """Every predicted and truth car of all chips at one threshold, as flat arrays."""

    area: np.ndarray  # predicted cars
    mean_prob: np.ndarray
    dont_care: np.ndarray
    has_truth: np.ndarray  # a truth partner at IoU >= 0.5
    truth_dont_care: np.ndarray  # ... which is don't-care
    t_dont_care: np.ndarray  # truth cars
    t_has_pred: np.ndarray
    t_pred_area: np.ndarray  # the partner's area, mean probability, don't-care
    t_pred_prob: np.ndarray
    t_pred_dont_care: np.ndarray

    @classmethod
    def gather(cls, pairs: list[tuple[Objects, Objects, tuple]]) -> _Scored:
        parts: dict[str, list] = {k: [] for k in cls.__dataclass_fields__}
        for pred, truth, (partner_t, partner_p) in pairs:
            has_t, has_p = partner_t >= 0, partner_p >= 0
            prob = np.nan_to_num(pred.mean_prob, nan=1.0)
            parts["area"].append(pred.area_m2)
            parts["mean_prob"].append(prob)
            parts["dont_care"].append(pred.dont_care)
            parts["has_truth"].append(has_t)
            parts["truth_dont_care"].append(_take(truth.dont_care, partner_t, False))
            parts["t_dont_care"].append(truth.dont_care)
            parts["t_has_pred"].append(has_p)
            parts["t_pred_area"].append(_take(pred.area_m2, partner_p, 0.0))
            parts["t_pred_prob"].append(_take(prob, partner_p, 0.0))
            parts["t_pred_dont_care"].append(_take(pred.dont_care, partner_p, False))
        return cls(**{k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()})

    def counts(self, min_area: float, max_area: float, min_prob: float) -> tuple[int, int, int]:
        keep = (self.area >= min_area) & (self.area <= max_area) & (self.mean_prob >= min_prob)
        scored = keep & ~self.dont_care & ~self.truth_dont_care
        tp = int(np.sum(scored & self.has_truth))
        fp = int(np.sum(scored & ~self.has_truth))
        kept = (self.t_has_pred & (self.t_pred_area >= min_area)
                & (self.t_pred_area <= max_area) & (self.t_pred_prob >= min_prob))
        excused = self.t_has_pred & self.t_pred_dont_care
        fn = int(np.sum(~self.t_dont_care & ~excused & ~kept))
        return tp, fp, fn


def choose(chips, *, gsd: float, cfg: VectorConfig, thresholds=THRESHOLDS,
           min_areas=MIN_AREAS_M2, min_mean_probs=MIN_MEAN_PROBS, refine: bool = True,
           max_chips: int = 400, split: bool = True, envelopes: bool = False) -> dict:
    """Pick the threshold, minimum area and minimum mean probability with the best object F1.

    Thresholds are searched coarse to fine: every other candidate with blobs unsplit first,
    then the best of those and its two neighbours with touching cars split as ``vectorize``
    splits them (splitting costs most of the time here); the choice is among the latter. At
    most ``max_chips`` chips are used (all chips with cars first, then evenly spread empty
    ones), so the search stays a small share of a training budget on large validation sets.

    Args:
        chips: iterable of ``(prob, mask)`` per chip: probability (rows, cols) in [0, 1] and the
            truth mask (0, 1, 255 = ignore). It is walked once and kept in memory.
        gsd: pixel size in metres.
        cfg: vector settings (splitting and ``max_area_m2`` as predict's vectors will use them).
        thresholds, min_areas, min_mean_probs: the candidates (a car is kept when its area is
            at least the minimum area and its mean probability at least the minimum).
        refine: search thresholds coarse to fine (False = every candidate).
        max_chips: cap on the chips used.
        split: split touching cars as vectorize does (False: a faster approximation).
        envelopes: match cars by the IoU of their axis-aligned boxes (box labels; see
            ``partners``).

    Returns:
        ``{"threshold", "min_area_m2", "min_mean_prob", "object_f1", "precision", "recall",
        "tp", "fp", "fn", "table": [{threshold, min_area_m2, min_mean_prob, f1, tp, fp, fn},
        ...] (thresholds tried exactly), "validation_cars": {"mean_prob": [...],
        "matched": [...]}}``. Ties go to the threshold nearest 0.5, then to the smaller area,
        then to the smaller minimum probability (the least surprising choice).
    """
    cfg = cfg.resolve()  # min_area_m2 left to "the model's choice" is not chosen yet
    chips = _cap(list(chips), max_chips)
    thresholds = sorted(float(t) for t in thresholds)
    # Split pieces smaller than the smallest candidate are never cars; larger ones are judged
    # by the area filter below, so splitting uses the smallest candidate.
    split_cfg = cfg.model_copy(update={"min_area_m2": float(min(min_areas))})
    truths_for = {split: [find_objects(mask == 1, gsd=gsd, cfg=split_cfg, valid=mask != IGNORE,
                                       split=split) for _prob, mask in chips]}
    grid = [(a, m) for a in min_areas for m in min_mean_probs]
    exact: dict[float, np.ndarray] = {}
    kept: dict[float, list] = {}

    def run(th: float, table: dict, do_split: bool) -> None:
        if th in table:
            return
        pairs = []
        for (prob, mask), truth in zip(chips, truths_for[do_split], strict=True):
            valid = mask != IGNORE
            pred = find_objects((prob >= th) & valid, gsd=gsd, cfg=split_cfg, valid=valid,
                                prob=prob.astype(np.float32), split=do_split)
            pairs.append((pred, truth, partners(pred, truth, envelopes=envelopes)))
        scored = _Scored.gather(pairs)
        table[th] = np.array([scored.counts(a, cfg.max_area_m2, m) for a, m in grid])
        if table is exact:
            kept[th] = pairs

    def best(table: dict) -> tuple[float, int]:
        cells = [(th, g) for th in table for g in range(len(grid))]
        return min(cells, key=lambda c: (-round(f1_score(*table[c[0]][c[1]]), 6),
                                         abs(c[0] - 0.5), grid[c[1]][0], grid[c[1]][1]))

    if refine and len(thresholds) > 3:
        # Coarse: every other threshold, blobs unsplit (several times cheaper); fine: the best
        # coarse threshold and its two neighbours, split exactly as vectorize will.
        if split:
            truths_for[False] = [find_objects(mask == 1, gsd=gsd, cfg=split_cfg,
                                              valid=mask != IGNORE, split=False)
                                 for _prob, mask in chips]
        coarse: dict[float, np.ndarray] = {}
        for th in thresholds[::2]:
            run(th, coarse, False)
        k = thresholds.index(best(coarse)[0])
        for j in (k - 1, k, k + 1):
            if 0 <= j < len(thresholds):
                run(thresholds[j], exact, split)
    else:
        for th in thresholds:
            run(th, exact, split)
    th, g = best(exact)
    min_area, min_prob = (float(v) for v in grid[g])
    tp, fp, fn = (int(v) for v in exact[th][g])
    mean_prob, matched = [], []
    for pred, truth, found in kept[th]:
        keep = ((pred.area_m2 >= min_area) & (pred.area_m2 <= cfg.max_area_m2)
                & (np.nan_to_num(pred.mean_prob, nan=1.0) >= min_prob))
        hit = count(pred, truth, keep, found)[3]
        for k in np.flatnonzero(keep & ~pred.dont_care):
            mean_prob.append(round(float(pred.mean_prob[k]), 4))
            matched.append(bool(hit[k]))
    table = [{"threshold": t, "min_area_m2": float(a), "min_mean_prob": float(m),
              "f1": round(f1_score(*exact[t][j]), 4), "tp": int(exact[t][j][0]),
              "fp": int(exact[t][j][1]), "fn": int(exact[t][j][2])}
             for t in sorted(exact) for j, (a, m) in enumerate(grid)]
    return {"threshold": float(th), "min_area_m2": min_area, "min_mean_prob": min_prob,
            "object_f1": f1_score(tp, fp, fn),
            "precision": prf(tp, fp, fn)["precision"],
            "recall": prf(tp, fp, fn)["recall"], "tp": tp, "fp": fp, "fn": fn,
            "table": table, "validation_cars": {"mean_prob": mean_prob, "matched": matched}}


def _cap(chips: list, max_chips: int) -> list:
    if len(chips) <= max_chips:
        return chips
    with_cars = [c for c in chips if (c[1] == 1).any()]
    empty = [c for c in chips if not (c[1] == 1).any()]
    if len(with_cars) >= max_chips:
        step = len(with_cars) / max_chips
        return [with_cars[int(i * step)] for i in range(max_chips)]
    room = max_chips - len(with_cars)
    step = len(empty) / room
    return with_cars + [empty[int(i * step)] for i in range(room)]


def object_f1(chips, *, gsd: float, cfg: VectorConfig, threshold: float = 0.5,
              split: bool = False, envelopes: bool = False) -> float:
    """Object F1 at IoU 0.5 at one threshold and ``cfg.min_area_m2``: the cheap score that keeps
    the best weights during training. Touching cars are not split by default (splitting costs
    most of the time; the ranking of checkpoints hardly depends on it)."""
    cfg = cfg.resolve()
    return choose(chips, gsd=gsd, cfg=cfg, thresholds=(threshold,),
                  min_areas=(cfg.min_area_m2,), min_mean_probs=(0.0,), refine=False,
                  split=split, envelopes=envelopes)["object_f1"]


# === The truncated-car rule, learnt from the labels ===

# Candidates for vectors.min_truncated_area_m2: from "keep every sliver" to "only cars mostly
# inside" (a whole car covers about 8-10 m2), so a labeller's convention either way is found.
TRUNCATED_AREAS_M2 = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 12.0)


def _edge_flags(labels: np.ndarray, n: int, valid: np.ndarray, border: tuple) -> tuple:
    """Per car: truncated (touches the scene's void) and cut (touches the chip's inner sides).

    ``border`` says which chip sides (top, bottom, left, right) lie on the scene's border:
    beyond those the scene ends; beyond the others lies the next chip, where the car may go on.
    """
    top, bottom, left, right = border
    void = np.pad(~valid, 1, constant_values=False)
    void[0, :], void[-1, :] = top, bottom
    void[:, 0], void[:, -1] = left, right
    near_void = ndimage.binary_dilation(void, structure=_EIGHT)[1:-1, 1:-1]
    inner = np.zeros(labels.shape, bool)
    for side, on_border in zip(((0, slice(None)), (-1, slice(None)), (slice(None), 0),
                                (slice(None), -1)), border, strict=True):
        if not on_border:
            inner[side] = True
    if not n:
        return np.zeros(0, bool), np.zeros(0, bool)
    idx = np.arange(1, n + 1)
    return (ndimage.maximum(near_void, labels, idx) > 0,
            ndimage.maximum(inner, labels, idx) > 0)


def _edge_chip_counts(prob, mask, border, *, gsd: float, cfg: VectorConfig, post: dict,
                      areas, envelopes: bool) -> tuple[np.ndarray, int, int]:
    """(tp, fp, fn) per candidate on one chip at the scene's edge, and its cut cars (predicted,
    true) that are not don't-care."""
    split_cfg = cfg.model_copy(update={"min_area_m2": float(min(MIN_AREAS_M2))})
    valid = mask != IGNORE
    prob = np.asarray(prob, np.float32)
    pred = find_objects((prob >= post["threshold"]) & valid, gsd=gsd, cfg=split_cfg,
                        valid=valid, prob=prob)
    truth = find_objects(mask == 1, gsd=gsd, cfg=split_cfg, valid=valid)
    p_trunc, pred.dont_care = _edge_flags(pred.labels, len(pred.area_m2), valid, border)
    t_trunc, truth.dont_care = _edge_flags(truth.labels, len(truth.area_m2), valid, border)
    found = partners(pred, truth, envelopes=envelopes)
    base = ((pred.area_m2 >= post["min_area_m2"]) & (pred.area_m2 <= cfg.max_area_m2)
            & (np.nan_to_num(pred.mean_prob, nan=1.0) >= post["min_mean_prob"]))
    counts = np.zeros((len(areas), 3), np.int64)
    for i, a in enumerate(areas):
        counts[i] = count(pred, truth, base & ~(p_trunc & (pred.area_m2 < a)), found)[:3]
    return (counts, int((p_trunc & ~pred.dont_care).sum()),
            int((t_trunc & ~truth.dont_care).sum()))


def choose_truncated(chips, *, gsd: float, cfg: VectorConfig, post: dict,
                     areas=TRUNCATED_AREAS_M2, envelopes: bool = False) -> dict:
    """Pick ``min_truncated_area_m2`` on the validation chips at the scene's edge by object F1.

    Labellers differ on cars cut by the scene's edge: some draw every sliver, some only cars
    mostly inside. A cut car counts here like any other (a hit, a false car, a miss), so the
    minimum area at which the labels stop leaving cut cars out is where F1 peaks. Cars cut
    by a chip's inner side (the car goes on in the next chip) are don't-care, as in ``choose``.

    Args:
        chips: iterable of ``(prob, mask, border)``: as ``choose`` takes them, plus which chip
            sides (top, bottom, left, right) lie on the scene's border.
        gsd: pixel size in metres.
        cfg: vector settings.
        post: ``choose``'s result (threshold, min_area_m2, min_mean_prob are held fixed).
        areas: the candidates.
        envelopes: match by box IoU (see ``partners``).

    Returns:
        ``{"min_truncated_area_m2", "object_f1", "tp", "fp", "fn", "edge_chips",
        "truncated_predicted", "truncated_true", "table"}``; ``min_truncated_area_m2`` is None
        when no chip shows a cut car or no candidate finds any car right (nothing to learn:
        vectors keeps its default). Ties go to
        the middle of the best candidates, between the sizes the labels keep and leave out.
    """
    cfg = cfg.resolve()
    totals = np.zeros((len(areas), 3), np.int64)
    n_chips = n_pred = n_true = 0
    for prob, mask, border in chips:
        valid = mask != IGNORE
        if not any(border) and valid.all():
            continue  # not at the scene's edge: no car here is truncated
        n_chips += 1
        counts, cut_pred, cut_true = _edge_chip_counts(prob, mask, border, gsd=gsd, cfg=cfg,
                                                       post=post, areas=areas,
                                                       envelopes=envelopes)
        totals += counts
        n_pred, n_true = n_pred + cut_pred, n_true + cut_true
    f1s = [round(f1_score(*t), 6) for t in totals]
    table = [{"min_truncated_area_m2": float(a), "f1": round(f, 4), "tp": int(t[0]),
              "fp": int(t[1]), "fn": int(t[2])} for a, f, t in zip(areas, f1s, totals,
                                                                    strict=True)]
    out = {"min_truncated_area_m2": None, "object_f1": None, "tp": 0, "fp": 0, "fn": 0,
           "edge_chips": n_chips, "truncated_predicted": n_pred, "truncated_true": n_true,
           "chosen_by": "object F1 at IoU 0.5 on the validation chips at the scene's edge",
           "table": table}
    if n_pred + n_true == 0:
        return out
    tied = [i for i, f in enumerate(f1s) if f == max(f1s)]
    best = tied[(len(tied) - 1) // 2]
    tp, fp, fn = (int(v) for v in totals[best])
    if tp == 0:
        return out  # no car found right at any candidate: the labels teach nothing here
    out.update({"min_truncated_area_m2": float(areas[best]), "object_f1": f1_score(tp, fp, fn),
                "tp": tp, "fp": fp, "fn": fn})
    return out
