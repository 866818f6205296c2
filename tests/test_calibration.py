"""Calibration of per-car probabilities and the zone count interval, on generated detections."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.calibration import (
    apply_calibration,
    count_interval,
    fit_calibration,
    poisson_binomial_pmf,
)


def _detections(rng: np.random.Generator, n_real: int, *, recall: float, fp_rate: float):
    """Scores and truth of one zone: real cars detected with ``recall`` plus false positives.

    Real detections score high (Beta(6, 2)) and false ones low (Beta(2, 4)), so the raw score
    is a miscalibrated probability; the calibration must learn P(real | score).
    """
    found = rng.binomial(n_real, recall)
    false = rng.poisson(fp_rate)
    scores = np.concatenate([rng.beta(6, 2, found), rng.beta(2, 4, false)])
    is_car = np.concatenate([np.ones(found, bool), np.zeros(false, bool)])
    return scores, is_car


def _validation(rng, zones: int = 80, recall: float = 0.85):
    scores, truth, n_true = [], [], 0
    for _ in range(zones):
        n_real = rng.poisson(20)
        s, t = _detections(rng, n_real, recall=recall, fp_rate=5)
        scores.append(s)
        truth.append(t)
        n_true += n_real
    return np.concatenate(scores), np.concatenate(truth), n_true


def test_identity_without_calibration():
    scores = np.array([0.0, 0.2, 0.7, 1.0, np.nan])
    out = apply_calibration(scores, None)
    np.testing.assert_allclose(out[:4], scores[:4])
    assert np.isnan(out[4])


def test_calibration_is_json_and_monotone():
    rng = np.random.default_rng(0)
    scores, is_car, n_true = _validation(rng, zones=20)
    cal = fit_calibration(scores, is_car, n_true=n_true)
    cal2 = json.loads(json.dumps(cal))  # what the bundle's metadata.json round-trips
    grid = np.linspace(0, 1, 201)
    probs = apply_calibration(grid, cal2)
    assert np.all(np.diff(probs) >= 0), "a higher score must never get a lower probability"
    assert 0 < probs.min() and probs.max() < 1
    assert 0.7 < cal2["recall"] < 1.0


def test_few_samples_stay_near_identity():
    cal = fit_calibration(np.array([0.9, 0.8, 0.6]), np.array([1, 1, 0]))
    probs = apply_calibration(np.array([0.1, 0.5, 0.9]), cal)
    # Three detections must not turn scores into certainties.
    assert np.all((probs > 0.02) & (probs < 0.98))
    assert probs[0] < probs[1] < probs[2]
    empty = fit_calibration(np.array([]), np.array([]))
    np.testing.assert_allclose(apply_calibration(np.array([0.3, 0.6]), empty), [0.3, 0.6])
    one_class = fit_calibration(np.full(5, 0.9), np.ones(5))
    assert 0.9 <= apply_calibration(np.array([0.9]), one_class)[0] < 1.0


def test_calibration_beats_raw_scores():
    rng = np.random.default_rng(1)
    scores, is_car, _ = _validation(rng)
    cal = fit_calibration(scores, is_car)
    test_scores, test_truth, _ = _validation(rng, zones=40)

    def log_loss(p):
        p = np.clip(p, 1e-6, 1 - 1e-6)
        return -np.mean(test_truth * np.log(p) + (1 - test_truth) * np.log(1 - p))

    assert log_loss(apply_calibration(test_scores, cal)) < log_loss(test_scores) - 0.01


def test_poisson_binomial_matches_binomial():
    from scipy import stats

    pmf = poisson_binomial_pmf(np.full(30, 0.3))
    np.testing.assert_allclose(pmf, stats.binom.pmf(np.arange(31), 30, 0.3), atol=1e-12)
    assert count_interval(np.array([])) == {"expected": 0.0, "lo": 0, "hi": 0}


@pytest.mark.parametrize("n_large", [False, True])
def test_interval_covers_true_count_about_90_percent(n_large):
    """Over many zones the 90% interval holds the number of real cars about 90% of the time."""
    rng = np.random.default_rng(2)
    recall = 0.85
    scores, is_car, n_true = _validation(rng, recall=recall)
    cal = fit_calibration(scores, is_car, n_true=n_true)
    hits = hits_all = 0
    zones = 150 if n_large else 400
    for _ in range(zones):
        n_real = rng.poisson(1200 if n_large else 15)
        s, t = _detections(rng, n_real, recall=recall, fp_rate=300 if n_large else 4)
        iv = count_interval(apply_calibration(s, cal), calibration=cal)
        hits += iv["lo"] <= t.sum() <= iv["hi"]
        hits_all += iv["lo_all"] <= n_real <= iv["hi_all"]
    assert 0.80 <= hits / zones <= 0.97, hits / zones
    # Missed cars: a flat-prior interval, conservative when zone counts vary little.
    assert 0.85 <= hits_all / zones <= 0.99, hits_all / zones


def test_chip_detections_known_answer():
    from pipeline.calibration import chip_detections

    prob = np.zeros((40, 40))
    target = np.zeros((40, 40), np.uint8)
    target[5:15, 5:10] = 1  # true car, found (prob 0.9)
    prob[5:15, 5:10] = 0.9
    prob[20:28, 20:24] = 0.6  # a false car
    target[30:38, 10:14] = 1  # a missed car
    prob[0:6, 30:34] = 0.95  # cut by the chip's border: left out
    target[0:6, 30:34] = 1
    prob[12:14, 30:31] = 0.8  # too small to be a car
    valid = np.ones((40, 40), bool)
    scores, is_car, n_true = chip_detections(prob, target, valid, threshold=0.5, min_pixels=4)
    order = np.argsort(scores)
    np.testing.assert_allclose(scores[order], [0.6, 0.9])
    assert is_car[order].tolist() == [False, True]
    assert n_true == 2  # the found and the missed car; the cut one is left out
    valid[25:40, 0:20] = False  # nodata over the missed car: it touches invalid pixels
    assert chip_detections(prob, target, valid, threshold=0.5, min_pixels=4)[2] == 1
