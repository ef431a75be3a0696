"""Operating points against brute force, defect masks and regions against OpenCV, labelled panels."""
import cv2
import numpy as np
import pytest
import torch
from sklearn.metrics import precision_recall_curve

from scoring.detector import defect_regions
from scoring.metrics import image_operating_points
from scoring.visualize import panel


def scores_with_ties(n: int, decimals: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scores = np.round(rng.random(n), decimals)
    labels = rng.random(n) < 0.4
    labels[:2] = [True, False]
    return scores, labels


def midpoints(scores: np.ndarray) -> np.ndarray:
    """Every threshold that separates two neighbouring distinct float32 scores, computed here in float64 and
    rounded once, plus one half a gap beyond each end: the candidates a threshold between scores may take."""
    distinct = np.unique(scores.astype(np.float32)).astype(np.float64)
    inner = (distinct[1:] + distinct[:-1]) / 2
    ends = [distinct[0] - (distinct[1] - distinct[0]) / 2, distinct[-1] + (distinct[-1] - distinct[-2]) / 2]
    return np.sort(np.concatenate([inner, ends]).astype(np.float32))


@pytest.mark.parametrize("n,decimals,seed", [(9, 1, 0), (60, 1, 1), (500, 2, 2), (3000, 3, 3)])
def test_max_f1_threshold_equals_scikit_learn_and_sits_between_two_scores(n, decimals, seed):
    scores, labels = scores_with_ties(n, decimals, seed)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-300)
    best = np.argmax(f1)  # thresholds ascend: the lowest threshold wins a tie, as in anomalib
    ours = image_operating_points(torch.tensor(scores), torch.tensor(labels))
    assert ours["f1"] == pytest.approx(f1[best], abs=1e-12)
    assert (ours["precision"], ours["recall"]) == pytest.approx((precision[best], recall[best]), abs=1e-12)
    # the same images flagged as at scikit-learn's threshold (a score), from a threshold halfway below it
    as_float32 = scores.astype(np.float32)
    assert np.array_equal(as_float32 >= np.float32(ours["threshold"]), as_float32 >= np.float32(thresholds[best]))
    score, below = thresholds[best], as_float32[as_float32 < np.float32(thresholds[best])]
    # the next lower distinct score; below the lowest one, a virtual one as far as the next higher score is above
    lower = float(below.max()) if below.size else score - (float(as_float32[as_float32 > score].min()) - score)
    assert ours["threshold"] == pytest.approx((lower + score) / 2, abs=1e-7)
    assert not np.isin(np.float32(ours["threshold"]), as_float32)


def brute_force_points(scores: np.ndarray, labels: np.ndarray) -> dict:
    good, bad = scores[~labels], scores[labels]
    candidates = midpoints(scores)
    no_escape = max(t for t in candidates if (bad >= t).all())
    no_false_alarm = min(t for t in candidates if not (good >= t).any())
    return {"threshold_no_escape": no_escape, "false_alarm_rate": (good >= no_escape).mean(),
            "threshold_no_false_alarm": no_false_alarm, "escape_rate": (bad < no_false_alarm).mean()}


@pytest.mark.parametrize("n,decimals,seed", [(9, 1, 0), (60, 1, 1), (500, 2, 2)])
def test_no_escape_and_no_false_alarm_thresholds_equal_brute_force(n, decimals, seed):
    scores, labels = scores_with_ties(n, decimals, seed)
    scores = scores.astype(np.float32)
    ours = image_operating_points(torch.tensor(scores), torch.tensor(labels))
    expected = brute_force_points(scores, labels)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-7), key


def test_operating_points_when_a_good_image_scores_highest():
    scores = torch.tensor([0.9, 0.5, 0.7, 0.2])
    labels = torch.tensor([False, True, True, False])
    points = image_operating_points(scores, labels)
    assert points["threshold_no_escape"] == pytest.approx(0.35) and points["false_alarm_rate"] == 0.5
    assert points["threshold_no_false_alarm"] == pytest.approx(1.0) and points["escape_rate"] == 1.0
    assert points["threshold"] == pytest.approx(0.35)  # max F1 flags 0.5 and above
    assert points["f1"] == pytest.approx(2 * 2 / (3 + 2))  # TP 2, FP 1


@pytest.mark.parametrize("seed", range(3))
def test_no_image_at_an_old_threshold_flips_under_a_one_in_a_million_perturbation(seed):
    """The old thresholds were scores: the image on one flipped its verdict when its score moved by one ulp."""
    rng = np.random.default_rng(seed)
    scores = np.round(rng.random(200), 4).astype(np.float32)  # distinct values at least 1e-4 apart
    labels = rng.random(200) < 0.3
    points = image_operating_points(torch.tensor(scores), torch.tensor(labels))
    for key in ("threshold", "threshold_no_escape", "threshold_no_false_alarm"):
        t = np.float32(points[key])
        verdicts = scores >= t
        for shift in (-1e-6, 1e-6):
            assert np.array_equal((scores + np.float32(shift)) >= t, verdicts), key
        assert np.abs(scores - t).min() > 1e-5, key  # half a gap of at least 1e-4 away


def test_one_distinct_score_gets_thresholds_one_float_either_side():
    points = image_operating_points(torch.tensor([0.5, 0.5, 0.5]), torch.tensor([True, False, True]))
    assert points["threshold"] < 0.5 < points["threshold_no_false_alarm"]
    assert points["threshold"] == np.nextafter(np.float32(0.5), np.float32(0))


def test_defect_regions_match_connected_components_of_a_hand_made_map():
    amap = np.full((40, 60), 0.1, np.float32)
    amap[5:10, 5:15] = 0.8  # region A: 5 x 10
    amap[10:12, 15:17] = 0.6  # touches A only at a corner: 8-connected, the same region
    amap[30:35, 40:42] = np.linspace(0.5, 0.9, 10, dtype=np.float32).reshape(5, 2)  # region B
    amap[20, 50] = 0.55  # region C: one pixel
    mask, regions = defect_regions(amap, 0.5)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
    assert np.array_equal(mask > 0, amap >= 0.5)
    count, labels, stats, _ = cv2.connectedComponentsWithStats((amap >= 0.5).astype(np.uint8), connectivity=8)
    assert len(regions) == count - 1 == 3
    expected = []
    for i in range(1, count):
        inside = amap[labels == i]
        x, y, w, h, area = stats[i]
        expected.append({"x": x, "y": y, "width": w, "height": h, "area": area,
                         "max_score": pytest.approx(float(inside.max())), "mean_score": pytest.approx(float(inside.mean()))})
    assert regions == sorted(expected, key=lambda r: r["area"], reverse=True)
    assert regions[0] == {"x": 5, "y": 5, "width": 12, "height": 7, "area": 54, "max_score": pytest.approx(0.8),
                          "mean_score": pytest.approx((50 * 0.8 + 4 * 0.6) / 54)}
    assert defect_regions(amap, 0.95)[1] == []


def test_panel_keeps_the_input_at_its_resolution_under_a_header_with_a_colour_bar():
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
    picture = panel(original, torch.rand(3, 32, 32), torch.rand(32, 32), caption="score 0.5 | OK")
    header = picture.shape[0] - 90
    assert header > 10
    assert np.array_equal(picture[header:, :130], original)  # the input tile, untouched, at its own size
    assert picture[:header].std() > 5  # titles and caption are drawn on the header
    bar = picture[header:, 3 * 130 + 2]  # a column of the colour bar: red (1) at the top, blue (0) at the bottom
    assert bar[0, 2] > 100 and bar[0, 0] < 50 and bar[-1, 0] > 100 and bar[-1, 2] < 50


def test_plotted_curves_equal_scikit_learn_and_thin_out_evenly():
    from sklearn.metrics import roc_curve
    from scoring.metrics import curve_points, rank, roc_pr_counts
    scores, labels = scores_with_ties(300, 2, 5)
    counts = roc_pr_counts(rank(torch.tensor(scores)), torch.tensor(labels))
    curves = curve_points(*counts)
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(curves["fpr"], fpr, atol=1e-12)
    np.testing.assert_allclose(curves["tpr"], tpr, atol=1e-12)
    for recall, precision, t in zip(curves["recall"], curves["precision"], thresholds[1:]):
        flagged = scores >= t
        assert precision == pytest.approx(labels[flagged].mean()) and recall == pytest.approx(labels[flagged].sum() / labels.sum())
    thin = curve_points(*counts, max_points=10)
    assert len(thin["fpr"]) == 11 and thin["fpr"][-1] == 1.0 and thin["tpr"][-1] == 1.0  # ends kept
