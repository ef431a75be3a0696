import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from sklearn.metrics import average_precision_score, roc_auc_score

from model_unet import image_scores
from scoring.metrics import aupro, auroc, average_precision, pixel_metrics


@pytest.mark.parametrize("n,decimals", [(7, 1), (500, 2), (20000, 3)])
def test_auroc_and_ap_equal_scikit_learn_with_ties(n, decimals):
    rng = np.random.default_rng(n)
    scores = np.round(rng.random(n), decimals)
    labels = rng.random(n) < 0.3
    labels[:2] = [True, False]
    assert auroc(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12)


def test_one_class_gives_nan():
    assert np.isnan(auroc(torch.rand(5), torch.zeros(5)))


def test_aupro_hand_checked_case():
    masks = torch.zeros(2, 2, 4, dtype=torch.bool)
    masks[0, 0, :2] = True  # region 1: two pixels
    masks[1, 1, 3] = True  # region 2: one pixel
    maps = torch.full((2, 2, 4), 0.1)
    maps[0, 0, 0], maps[0, 0, 1], maps[0, 0, 2], maps[1, 1, 3] = 0.9, 0.4, 0.8, 0.7
    # Thresholds 0.9: PRO (1/2 + 0)/2 = 0.25, FPR 0; 0.8: FPR 1/13; 0.7: PRO 0.75; 0.4: PRO 1; 0.1: FPR 1.
    # Area to FPR 0.3: 0.25 * 1/13 + 1.0 * (0.3 - 1/13), normalised by 0.3.
    expected = (0.25 / 13 + 0.3 - 1 / 13) / 0.3
    assert aupro(maps, masks) == pytest.approx(expected, abs=1e-12)
    assert aupro(maps, masks, max_fpr=1.0) == pytest.approx(0.25 / 13 + (1 - 1 / 13), abs=1e-12)


def test_perfect_and_inverted_maps():
    masks = torch.zeros(3, 16, 16, dtype=torch.bool)
    masks[0, 2:6, 2:6] = True
    masks[2, 10:12, 3:9] = True
    good = masks.float()
    result = pixel_metrics(good, masks)
    assert result == {"pixel_auroc": 1.0, "pixel_ap": 1.0, "aupro": pytest.approx(1.0)}
    assert pixel_metrics(1 - good, masks)["pixel_auroc"] == 0.0


def test_image_score_is_max_of_zero_padded_21x21_mean():
    maps = torch.rand(3, 24, 30)
    padded = np.pad(maps.numpy(), ((0, 0), (10, 10), (10, 10)))
    ref = sliding_window_view(padded, (21, 21), axis=(1, 2)).mean(axis=(-1, -2)).max(axis=(1, 2))
    np.testing.assert_allclose(image_scores(maps).numpy(), ref, rtol=1e-5)


def test_mask_protocols():
    from scoring.evaluate import MASK_PROTOCOLS
    resized = torch.tensor([0, 127, 128, 254, 255], dtype=torch.uint8)
    assert MASK_PROTOCOLS["standard"](resized).tolist() == [False, False, True, True, True]
    # The official code's uint8 cast of mask / 255 keeps only pixels that are exactly 255.
    assert MASK_PROTOCOLS["official"](resized).tolist() == [False, False, False, False, True]


def brute_force_aupro(maps: np.ndarray, masks: np.ndarray, max_fpr: float) -> float:
    """AUPRO by its definition: at every distinct threshold, the mean overlap of each ground-truth region
    (8-connected, labelled by scikit-image) and the FPR over normal pixels; the curve integrated up to
    max_fpr, its last segment cut by linear interpolation; normalised."""
    from skimage.measure import label
    regions = [(i, label(m, connectivity=2)) for i, m in enumerate(masks)]
    regions = [(i, lab == r) for i, lab in regions for r in range(1, lab.max() + 1)]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        predicted = maps >= t
        fprs.append((predicted & ~masks).sum() / (~masks).sum())
        pros.append(np.mean([predicted[i][region].mean() for i, region in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    inside = fprs <= max_fpr
    f, p = fprs[inside], pros[inside]
    area = np.sum((f[1:] - f[:-1]) * (p[1:] + p[:-1]) / 2)  # the trapezoid rule, written out
    last = np.nonzero(inside)[0][-1]
    if last + 1 < len(fprs):
        f0, f1, p0, p1 = fprs[last], fprs[last + 1], pros[last], pros[last + 1]
        area += (max_fpr - f0) * (p0 + p0 + (p1 - p0) * (max_fpr - f0) / (f1 - f0)) / 2
    return area / max_fpr


@pytest.mark.parametrize("decimals,seed", [(1, 0), (2, 1), (2, 2)])
def test_aupro_equals_its_definition_with_ties_and_a_cut_segment(decimals, seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 12, 12), bool)
    masks[0, 2:5, 2:6] = True
    masks[0, 8:10, 8:9] = True  # two regions in one image
    masks[1, 5:11, 1:3] = True
    maps = np.round(rng.random((3, 12, 12)) * 0.6 + 0.4 * masks, decimals)  # ties when rounded
    for max_fpr in (0.3, 0.05):
        expected = brute_force_aupro(maps, masks, max_fpr)
        fprs = [((maps >= t) & ~masks).sum() / (~masks).sum() for t in np.unique(maps)]
        assert not np.isclose(fprs, max_fpr).any()  # the limit falls inside a segment: interpolation matters
        assert aupro(torch.from_numpy(maps), torch.from_numpy(masks), max_fpr=max_fpr) == pytest.approx(expected, abs=1e-9)
