"""Calibrated per-car probabilities and honest count intervals.

A detected car's ``mean_prob`` is a score, not a probability that the detection is a real car:
a U-Net trained with weighted BCE is over- or under-confident in ways that depend on the data.
Training fits a small monotone map from score to "probability this detection is a true car" on
the validation chips (``fit_calibration``) and stores it in the model bundle's metadata
(``metadata["calibration"]``); the batch stage applies it (``apply_calibration``) and adds the
calibrated probabilities up per zone (``count_interval``).

The map is Platt scaling on the logit of the score, ``p = sigmoid(a * logit(s) + b)`` with
``a >= 0`` (so it is monotone: a higher score never gets a lower probability), fitted by maximum
likelihood with a weak Gaussian prior that pulls ``(a, b)`` toward the identity ``(1, 0)``. The
prior is worth about ``PRIOR_WEIGHT`` detections, so with a handful of validation cars the map
stays close to the identity instead of jumping to 0 or 1, and with thousands the data decide.

What the interval means (the README says the same): each detected car in a zone is a real car
with its calibrated probability, independently of the others; the number of real cars among the
detections then follows a Poisson-binomial distribution, whose mean is the expected count and
whose 5th and 95th percentiles bound the 90% interval. When the calibration also recorded the
validation recall (the share of true cars that were detected at all), ``count_interval`` can add
the cars the model missed: each real car is detected with probability ``recall``, so the total
is estimated as detected-real / recall with the extra binomial spread of the misses (a normal
approximation). That second interval assumes nothing about how many cars a zone holds (a flat
prior on the missed cars), so it is conservative where counts vary little from zone to zone
(93-98% in the tests). Neither interval covers errors the validation chips did not show (a new
kind of scene, another GSD, a season the model never saw).
"""

from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger(__name__)

METHOD = "platt_logit"
# Scores are clipped away from 0 and 1 before the logit: a mean probability of exactly 1.0 is
# a rounding of 254/254, not certainty.
EPS = 1e-3
# The prior toward the identity map weighs as much as this many detections.
PRIOR_WEIGHT = 4.0
# Exact Poisson-binomial up to this many cars per zone; a normal approximation above (its error
# is far below one car there).
EXACT_MAX = 2000


def _logit(scores: np.ndarray) -> np.ndarray:
    from scipy import special

    return special.logit(np.clip(np.asarray(scores, dtype=np.float64), EPS, 1.0 - EPS))


def fit_calibration(scores: np.ndarray, is_car: np.ndarray, *, n_true: int | None = None
                    ) -> dict:
    """Fit a monotone score -> probability map on validation detections.

    Args:
        scores: each validation detection's score in [0, 1] (its ``mean_prob``).
        is_car: whether that detection matched a true car (bool or 0/1), same length.
        n_true: how many true cars the validation chips held, matched or not; when given, the
            validation recall is stored so counts can include the cars the model missed.

    Returns:
        A JSON-serialisable dict: ``method``, ``a``, ``b``, ``eps``, ``n``, ``positives``
        and, with ``n_true``, ``recall``.
    """
    # scipy is imported in the functions, not with the module: the batch CLI's up-to-date
    # check stays quick.
    from scipy import optimize, special

    scores = np.asarray(scores, dtype=np.float64).ravel()
    is_car = np.asarray(is_car, dtype=np.float64).ravel()
    if scores.shape != is_car.shape:
        raise ValueError(f"scores ({scores.size}) and is_car ({is_car.size}) differ in length")
    keep = np.isfinite(scores)
    scores, is_car = scores[keep], is_car[keep]
    z = _logit(scores)
    n = len(z)

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = params
        t = a * z + b
        # -log-likelihood of Bernoulli(sigmoid(t)), written stably with logaddexp.
        nll = float(np.sum(np.logaddexp(0.0, t) - is_car * t))
        resid = special.expit(t) - is_car
        grad = np.array([float(resid @ z), float(resid.sum())])
        # Gaussian prior toward the identity, scaled like PRIOR_WEIGHT detections.
        prior = 0.5 * PRIOR_WEIGHT * ((a - 1.0) ** 2 + b**2)
        grad += PRIOR_WEIGHT * np.array([a - 1.0, b])
        return nll + prior, grad

    if n:
        res = optimize.minimize(loss, x0=np.array([1.0, 0.0]), jac=True, method="L-BFGS-B",
                                bounds=[(0.0, 50.0), (-50.0, 50.0)])
        a, b = (float(v) for v in res.x)
    else:
        a, b = 1.0, 0.0
    # Covariance of (a, b) from the curvature at the optimum (Laplace approximation): how far
    # the map itself may be off with this few validation cars; it widens large zones' intervals.
    w = special.expit(a * z + b)
    w = w * (1.0 - w)
    hessian = np.array([[float(w @ (z * z)), float(w @ z)], [float(w @ z), float(w.sum())]])
    cov = np.linalg.inv(hessian + PRIOR_WEIGHT * np.eye(2))
    calibration = {"method": METHOD, "a": a, "b": b, "eps": EPS, "n": int(n),
                   "positives": int(is_car.sum()), "cov": cov.tolist()}
    if n_true is not None:
        matched = int(is_car.sum())
        # The same weak prior idea for recall: with no true cars at all, say nothing.
        calibration["recall"] = (min(1.0, (matched + 0.5) / (n_true + 1.0)) if n_true > 0
                                 else None)
        calibration["n_true"] = int(n_true)
    log.debug("calibration: a=%.3f b=%.3f from %d detections (%d true)", a, b, n,
              calibration["positives"])
    return calibration


def chip_detections(prob: np.ndarray, target: np.ndarray, valid: np.ndarray | None = None, *,
                    threshold: float, min_pixels: int = 1, iou: float = 0.5
                    ) -> tuple[np.ndarray, np.ndarray, int]:
    """The calibration's raw material from one validation chip.

    Cars are the 8-connected components of ``prob >= threshold`` (predicted) and of
    ``target == 1`` (true) inside ``valid``; components touching the chip's border or invalid
    pixels are left out on both sides (a cut car's score and match say little). Predicted and
    true cars are matched one-to-one, greedily by IoU, at ``iou`` or more.

    Args:
        prob: (rows, cols) probabilities in [0, 1].
        target: (rows, cols) true mask (1 car).
        valid: (rows, cols) bool, pixels that count (default all).
        threshold: the model's car threshold.
        min_pixels: smaller predicted components are no car (the vectors' minimum area).
        iou: the match criterion.

    Returns:
        (mean probability of each predicted car, whether it matched a true car, number of
        true cars), ready for ``fit_calibration(scores, is_car, n_true=...)`` once summed
        over the validation chips.
    """
    from scipy import ndimage

    prob = np.asarray(prob, dtype=np.float64)
    valid = np.ones(prob.shape, bool) if valid is None else np.asarray(valid, bool)
    eight = np.ones((3, 3), bool)
    # Invalid pixels and the chip's border: components touching them are incomplete.
    outside = np.pad(~valid, 1, constant_values=True)
    near_edge = ndimage.binary_dilation(outside, structure=eight)[1:-1, 1:-1]

    def whole_components(mask: np.ndarray) -> tuple[np.ndarray, list[int]]:
        labels, n = ndimage.label(mask & valid, structure=eight)
        cut = set(np.unique(labels[near_edge & (labels > 0)]).tolist())
        return labels, [k for k in range(1, n + 1) if k not in cut]

    pred, pred_ids = whole_components(prob >= threshold)
    true, true_ids = whole_components(np.asarray(target) == 1)
    sizes = ndimage.sum_labels(np.ones_like(prob), pred, index=pred_ids) if pred_ids else []
    pred_ids = [k for k, size in zip(pred_ids, sizes, strict=True) if size >= min_pixels]
    if not pred_ids:
        return np.zeros(0), np.zeros(0, bool), len(true_ids)
    scores = np.asarray(ndimage.mean(prob, pred, index=pred_ids), dtype=np.float64)
    # IoU of every overlapping (predicted, true) pair from one joint histogram.
    both = (pred > 0) & (true > 0)
    pairs, inter = np.unique(np.stack([pred[both], true[both]]), axis=1, return_counts=True)
    area_p = dict(zip(pred_ids, ndimage.sum_labels(np.ones_like(prob), pred, pred_ids),
                      strict=True))
    true_area = dict(zip(true_ids, ndimage.sum_labels(np.ones_like(prob), true, true_ids),
                         strict=True)) if true_ids else {}
    candidates = []
    for (p, t), n in zip(pairs.T, inter, strict=True):
        if p in area_p and t in true_area:
            candidates.append((n / (area_p[p] + true_area[t] - n), int(p), int(t)))
    matched_p, matched_t = set(), set()
    for score, p, t in sorted(candidates, reverse=True):
        if score >= iou and p not in matched_p and t not in matched_t:
            matched_p.add(p)
            matched_t.add(t)
    is_car = np.array([k in matched_p for k in pred_ids], bool)
    return scores, is_car, len(true_ids)


def apply_calibration(scores: np.ndarray, calibration: dict | None) -> np.ndarray:
    """Calibrated probabilities for ``scores`` (identity when ``calibration`` is None).

    NaN scores (a car layer written without a probability raster) stay NaN.

    Raises:
        ValueError: an unknown calibration method.
    """
    from scipy import special

    scores = np.asarray(scores, dtype=np.float64)
    if calibration is None:
        return np.clip(scores, 0.0, 1.0)
    if calibration.get("method") != METHOD:
        raise ValueError(f"unknown calibration method {calibration.get('method')!r}")
    eps = float(calibration.get("eps", EPS))
    z = special.logit(np.clip(scores, eps, 1.0 - eps))
    out = special.expit(float(calibration["a"]) * z + float(calibration["b"]))
    return np.where(np.isnan(scores), np.nan, out)


def poisson_binomial_pmf(probs: np.ndarray) -> np.ndarray:
    """Probability of k = 0..n successes among independent Bernoulli(probs) trials."""
    pmf = np.zeros(len(probs) + 1)
    pmf[0] = 1.0
    for i, p in enumerate(np.asarray(probs, dtype=np.float64), start=1):
        # One more trial: k successes now came from k-1 (success) or k (failure).
        pmf[1:i + 1] = pmf[1:i + 1] * (1.0 - p) + pmf[:i] * p
        pmf[0] *= 1.0 - p
    return pmf


def _map_variance(probs: np.ndarray, calibration: dict | None) -> float:
    """Variance of the expected count that comes from the calibration's own uncertainty."""
    from scipy import special

    if not calibration or "cov" not in calibration or len(probs) == 0:
        return 0.0
    a, b = float(calibration["a"]), float(calibration["b"])
    p = np.clip(probs, 1e-12, 1.0 - 1e-12)
    # Each p = sigmoid(a z + b): recover z to get d(sum p)/d(a, b) (the delta method).
    z = (special.logit(p) - b) / a if a > 1e-9 else np.zeros_like(p)
    w = p * (1.0 - p)
    grad = np.array([float(w @ z), float(w.sum())])
    return float(grad @ np.asarray(calibration["cov"], dtype=np.float64) @ grad)


def _quantiles(probs: np.ndarray, level: float, extra_var: float = 0.0) -> tuple[int, int]:
    from scipy import stats

    lo_q, hi_q = (1.0 - level) / 2.0, 1.0 - (1.0 - level) / 2.0
    n = len(probs)
    if n == 0:
        return 0, 0
    pb_var = float(np.sum(probs * (1.0 - probs)))
    # Exact Poisson-binomial while the calibration's uncertainty is small beside the cars'
    # own spread (zones of tens of cars); a normal law with both variances otherwise.
    if n <= EXACT_MAX and extra_var <= 0.1 * pb_var:
        cdf = np.cumsum(poisson_binomial_pmf(probs))
        # Each tail left out holds as near (1 - level) / 2 as whole cars allow. The usual
        # discrete quantiles (leave out at most that much) guarantee at least 90% and so give
        # 95-97% in zones of a few tens of cars; nearest gives about the stated coverage.
        below = np.concatenate([[0.0], cdf])  # below[k] = P(X < k)
        above = 1.0 - cdf  # above[k] = P(X > k)
        lo = int(np.argmin(np.abs(below[:n + 1] - lo_q)))
        hi = int(np.argmin(np.abs(above - lo_q)))
        return min(lo, hi), max(lo, hi)
    mean, sd = float(probs.sum()), math.sqrt(pb_var + extra_var)
    z = stats.norm.ppf(hi_q)
    return max(0, round(mean - z * sd)), min(n, round(mean + z * sd))


def count_interval(probs: np.ndarray, *, level: float = 0.9, calibration: dict | None = None
                   ) -> dict:
    """Expected number of real cars among a zone's detections, and an interval.

    Args:
        probs: calibrated probabilities of the zone's detected cars (NaN ignored).
        level: coverage of the interval (0.9 = the 5th to the 95th percentile).
        calibration: the calibration that made ``probs``. Its parameter covariance widens
            the interval where the map's own error matters (zones of hundreds of cars); with
            a validation ``recall`` it adds ``expected_all``, ``lo_all`` and ``hi_all``: every
            real car in the zone, detected or missed (the recall's sampling error included).

    Returns:
        ``{"expected", "lo", "hi"}`` (plus the ``*_all`` keys with ``recall``).
    """
    from scipy import stats

    probs = np.asarray(probs, dtype=np.float64)
    probs = np.clip(probs[np.isfinite(probs)], 0.0, 1.0)
    map_var = _map_variance(probs, calibration)
    lo, hi = _quantiles(probs, level, map_var)
    out = {"expected": float(probs.sum()), "lo": lo, "hi": hi}
    recall = (calibration or {}).get("recall")
    recall_n = (calibration or {}).get("n_true")
    if recall is not None and 0.0 < recall <= 1.0:
        mean_t = float(probs.sum())
        var_t = float(np.sum(probs * (1.0 - probs))) + map_var
        total = mean_t / recall
        # N real cars, each detected with probability r: T ~ Binomial(N, r), so T / r has the
        # Poisson-binomial spread scaled by 1/r plus N (1 - r) / r from which cars were missed.
        var = var_t / recall**2 + total * (1.0 - recall) / recall
        if recall_n:
            # The recall itself is an estimate: Var(r) = r (1 - r) / n, and N ~ T / r.
            var += total**2 * (1.0 - recall) / (recall * recall_n)
        sd = math.sqrt(var)
        z = stats.norm.ppf(1.0 - (1.0 - level) / 2.0)
        # Nearest whole cars: floor/ceil would add up to a car on each side (over-covering).
        out.update({"expected_all": total, "lo_all": max(0, round(total - z * sd)),
                    "hi_all": round(total + z * sd)})
    return out
