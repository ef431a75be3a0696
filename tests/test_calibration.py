"""Thresholds from good images: the order statistic against brute force, the bound against scipy, storage."""
import argparse
import math

import numpy as np
import pytest
from scipy import stats

from scoring.calibration import allowed_false_alarms, budget_threshold, calibrate, images_needed, upper_bound
from training.checkpoint import ModelInfo


def flagged(scores: np.ndarray, threshold: float) -> int:
    return int((scores >= np.float32(threshold)).sum())


def brute_force_best(scores: np.ndarray, allowed: int) -> int:
    """The most images any threshold can flag without flagging more than allowed: try every candidate."""
    candidates = list(np.unique(scores)) + [np.float32(np.inf)]
    return max(n for n in (flagged(scores, t) for t in candidates) if n <= allowed)


@pytest.mark.parametrize("seed", range(6))
def test_threshold_flags_as_many_as_the_budget_allows_and_never_more(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    scores = rng.normal(0.3, 0.1, n).astype(np.float32)
    scores[rng.integers(0, n, n // 3)] = scores[0]  # ties, and neighbours one float apart
    scores[rng.integers(0, n, 3)] = np.nextafter(scores[0], np.float32(1))
    for rate in (0.001, 0.01, 0.05, 0.29, 0.5, 0.99):
        allowed = allowed_false_alarms(n, rate)
        threshold = budget_threshold(scores, rate)
        assert flagged(scores, threshold) == brute_force_best(scores, allowed) <= allowed
        # the comparison gives the same answer in float64, as Python floats compare
        assert flagged(scores, threshold) == int((scores.astype(np.float64) >= threshold).sum())


def test_allowed_count_is_the_floor_of_rate_times_n():
    assert [allowed_false_alarms(100, r) for r in (0.29, 0.01, 0.005)] == [29, 1, 0]
    assert allowed_false_alarms(50, 0.01) == 0


def test_one_tie_group_spanning_the_budget_flags_none_of_it():
    scores = np.array([0.1, 0.5, 0.5, 0.5, 0.2], np.float32)
    threshold = budget_threshold(scores, 0.4)  # 2 of 5 allowed, but the top three are equal
    assert threshold > 0.5 and flagged(scores, threshold) == 0


@pytest.mark.parametrize("flagged_count,n", [(0, 50), (0, 299), (1, 100), (3, 300), (17, 1000), (49, 50)])
def test_upper_bound_is_the_clopper_pearson_bound(flagged_count, n):
    expected = stats.beta.ppf(0.95, flagged_count + 1, n - flagged_count)
    assert upper_bound(flagged_count, n) == pytest.approx(expected, rel=1e-9)


def test_upper_bound_by_hand_and_images_needed():
    assert upper_bound(0, 50) == pytest.approx(1 - 0.05 ** (1 / 50), rel=1e-12)  # P(no false alarm) = (1-p)^n
    assert upper_bound(5, 5) == 1.0
    needed = images_needed(0.01)
    assert needed == 299 == math.ceil(math.log(0.05) / math.log(0.99))
    assert upper_bound(0, needed) <= 0.01 < upper_bound(0, needed - 1)


def test_calibration_record_and_refused_rates():
    rng = np.random.default_rng(0)
    scores, maxima = rng.random(200).astype(np.float32), rng.random(200).astype(np.float32) + 1
    result = calibrate(scores, maxima, 0.05, "folder good/")
    assert result["images"] == 200 and result["image"]["flagged"] == 10 == result["pixel"]["flagged"]
    assert result["image"]["observed_rate"] == 0.05 and result["pixel"]["threshold"] > 1
    from training.cli import false_alarm_rate  # the one check of a rate, for both scripts' flags
    assert false_alarm_rate("0.05") == 0.05
    for rate in (0, 1, -0.1, 1.5, "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            false_alarm_rate(str(rate))


def test_the_deployed_threshold_is_the_calibrated_one_and_says_so():
    from scoring.thresholds import choose
    calibration = calibrate(np.arange(100, dtype=np.float32), np.arange(100, dtype=np.float32), 0.01, "folder g")
    only_calibrated = ModelInfo({}, "c", "run", "draem", calibration=calibration)
    assert only_calibrated.threshold("image") == calibration["image"]["threshold"] == pytest.approx(98.5)
    assert choose(None, only_calibrated, "image").source.startswith("calibrated for 1 % false alarms on 100 good")
    tested = ModelInfo({}, "c", "run", "draem", {"operating_points": {"image": {"threshold": 0.7}}},
                       calibration=calibration)
    # the engineer's false-alarm budget wins over the test set's max F1, which stays one flag away
    assert tested.threshold("image") == calibration["image"]["threshold"]
    for given in (None, "auto", "calibrated"):
        assert choose(given, tested, "image").value == calibration["image"]["threshold"]
    assert choose("max_f1", tested, "image").value == 0.7
    assert choose("max_f1", tested, "image", own_max_f1=0.6).value == 0.6
    test_set_only = ModelInfo({}, "c", "run", "draem", {"operating_points": {"image": {"threshold": 0.7}}})
    assert test_set_only.threshold("image") == 0.7 and test_set_only.threshold("pixel") is None
    assert choose(None, test_set_only, "image").source == "max F1 on the labelled test set"
    assert ModelInfo({}, "c", "run", "draem").threshold("image") is None

@pytest.mark.parametrize("seed", range(3))
def test_no_good_score_sits_on_a_calibrated_threshold(seed):
    """A score on the threshold flips its verdict under any rounding (an export, another CPU)."""
    rng = np.random.default_rng(seed)
    scores = np.round(rng.random(300), 4).astype(np.float32)  # distinct values at least 1e-4 apart
    for rate in (0.001, 0.01, 0.1):
        threshold = np.float32(budget_threshold(scores, rate))
        assert np.abs(scores - threshold).min() > 1e-5
        for shift in (-1e-6, 1e-6):
            assert flagged(scores + np.float32(shift), threshold) == flagged(scores, threshold)
