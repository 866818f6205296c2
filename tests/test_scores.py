"""One rule for precision, recall and F1 in training, post-processing and evaluation."""

import math

from pipeline import postprocess
from pipeline.scores import for_ranking, prf
from pipeline.stages import evaluate, train


def test_every_stage_scores_counts_alike():
    for counts in [(5, 2, 1), (0, 3, 0), (0, 0, 4)]:
        ref = prf(*counts)
        assert evaluate._prf(*counts) == ref
        for key, value in train.scores(*counts).items():
            assert value == ref[key] or (math.isnan(value) and math.isnan(ref[key]))
        assert postprocess.f1_score(*counts) == for_ranking(ref["f1"])


def test_nothing_to_find_is_undefined_in_reports_and_perfect_in_rankings():
    assert all(math.isnan(prf(0, 0, 0)[k]) for k in ("precision", "recall", "f1", "iou"))
    assert math.isnan(train.scores(0, 0, 0)["precision"])  # was 1.0 in training, NaN elsewhere
    assert postprocess.f1_score(0, 0, 0) == 1.0
    assert prf(0, 3, 0)["f1"] == 0.0 and math.isnan(prf(0, 3, 0)["recall"])
