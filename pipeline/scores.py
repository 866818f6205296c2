"""Precision, recall, F1 and IoU from counts: one rule for training, post-processing and
evaluation.

A ratio of 0/0 (nothing to find and nothing found) is undefined: NaN in reports. Where a number
must be ranked (keeping the best weights, choosing a threshold) :func:`for_ranking` reads it as
a perfect 1.0: with nothing to find, finding nothing is right.
"""

from __future__ import annotations

import math


def prf(tp: float, fp: float, fn: float) -> dict:
    """Counts and their precision, recall, F1 and IoU (NaN where undefined)."""
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / (tp + fn) if tp + fn else math.nan
    return {"tp": int(tp), "fp": int(fp), "fn": int(fn), "precision": precision,
            "recall": recall, "f1": f1(tp, fp, fn),
            "iou": tp / (tp + fp + fn) if tp + fp + fn else math.nan}


def f1(tp: float, fp: float, fn: float) -> float:
    """F1 = 2 TP / (2 TP + FP + FN); 0 when nothing found was right, NaN when there was nothing."""
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan


def for_ranking(value: float) -> float:
    """A score that can be compared: NaN (nothing to find, nothing found) counts as 1.0."""
    return 1.0 if math.isnan(value) else value
