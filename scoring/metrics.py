"""Anomaly-detection metrics on tensors (any device): AUROC, AP, AUPRO, and the
operating points (thresholds) a user picks from: maximum F1, no escapes, no false alarms.

Exact, tie-aware equivalents of scikit-learn's roc_auc_score and average_precision_score, computed by
one sort on the scores' device: pixel metrics pool every pixel of every test image (tens of millions
of values for an MVTec category), which scikit-learn handles on one CPU core only.
"""
import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# Every metric a run reports, in report order, with the name people read.
METRICS = {"image_auroc": "image AUROC", "image_ap": "image AP", "image_f1_max": "image F1max",
           "pixel_auroc": "pixel AUROC", "pixel_ap": "pixel AP", "pixel_f1_max": "pixel F1max", "aupro": "AUPRO"}


Ranking = tuple[Tensor, Tensor]  # (descending order of the scores, index of the last score of each distinct value)


def percent(share: float | None, spec: str = ".1f") -> str:
    """A share as a percentage number (the % sign is the caller's); n/a where undefined."""
    return "n/a" if share is None or math.isnan(share) else f"{100 * share:{spec}}"


def rank(scores: Tensor) -> Ranking:
    """One sort, shared by every metric computed on the same scores (the costly part for pixel metrics)."""
    sorted_scores, order = torch.sort(scores.flatten().float(), descending=True)
    last_of_group = torch.ones_like(sorted_scores, dtype=torch.bool)
    last_of_group[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    return order, last_of_group.nonzero()[:, 0]


def cumulative(ranking: Ranking, weight: Tensor) -> Tensor:
    """Sum of weight over the scores at or above each distinct threshold, highest threshold first."""
    order, group_end = ranking
    return weight.flatten()[order].cumsum(0)[group_end]


def roc_pr_counts(ranking: Ranking, labels: Tensor) -> tuple[Tensor, Tensor]:
    """True and false positive counts (float64) at each distinct threshold."""
    tps = cumulative(ranking, labels.bool())
    return tps.double(), (ranking[1] + 1 - tps).double()


def between(high: Tensor, low: Tensor) -> Tensor:
    """A float32 threshold t with low < t <= high, elementwise: their midpoint, or high where no float32 lies
    strictly between them. A score on a threshold flips its verdict under any rounding; a midpoint keeps
    every score half a gap away."""
    high, low = high.float(), low.float()
    middle = high / 2 + low / 2
    return torch.where((middle > low) & (middle <= high), middle, high)


def separating_thresholds(distinct: Tensor) -> Tensor:
    """For distinct scores in descending order, the n + 1 thresholds t[k] that flag (score >= t[k]) exactly
    the k highest: each halfway between its two neighbours; beyond either end, half the nearest gap away (one
    float away for a single distinct score)."""
    d = distinct.float()
    if d.numel() > 1:
        top, bottom = d[:1] + (d[0] - d[1]), d[-1:] - (d[-2] - d[-1])
    else:
        up, down = torch.nextafter(d, d + 1), torch.nextafter(d, d - 1)  # two floats out: one float between
        top, bottom = torch.nextafter(up, up + 1), torch.nextafter(down, down - 1)
    padded = torch.cat([top, d, bottom])
    return between(padded[:-1], padded[1:])


def cuts(ranking: Ranking, scores: Tensor) -> Tensor:
    """separating_thresholds of these scores: cut k + 1 is the threshold of row k of roc_pr_counts (it flags
    that row's images and sits on none of them); cut 0 flags nothing."""
    order, group_end = ranking
    return separating_thresholds(scores.flatten().float()[order[group_end]])


def threshold_values(ranking: Ranking, scores: Tensor) -> Tensor:
    """The threshold of each row of roc_pr_counts."""
    return cuts(ranking, scores)[1:]


def best_f1(tps: Tensor, fps: Tensor, thresholds: Tensor) -> dict[str, float]:
    """The threshold of maximum F1 (anomalous when score >= threshold), with its precision, recall and F1.

    On a tie the lowest threshold wins, as in anomalib's adaptive threshold (argmax over thresholds in
    increasing order). F1 = 2 TP / (TP + FP + P): equal ratios give bit-equal floats, so ties are exact.
    """
    if tps[-1] == 0:
        return {"threshold": float("nan"), "precision": float("nan"), "recall": float("nan"), "f1": float("nan")}
    f1 = 2 * tps / (tps + fps + tps[-1])
    best = f1.numel() - 1 - f1.flip(0).argmax()
    return {"threshold": thresholds[best].item(), "precision": (tps[best] / (tps[best] + fps[best])).item(),
            "recall": (tps[best] / tps[-1]).item(), "f1": f1[best].item()}


def image_operating_points(scores: Tensor, labels: Tensor, ranking: Ranking | None = None) -> dict[str, float]:
    """Three image thresholds (anomalous when score >= threshold) and what each costs on this test set.

    f1: maximum F1. no_escape: the highest threshold that flags every defective image (its false-alarm
    rate: the share of good images flagged). no_false_alarm: the lowest threshold that flags no good
    image (its escape rate: the share of defective images missed).
    """
    ranking = ranking or rank(scores)
    tps, fps = roc_pr_counts(ranking, labels)
    every_cut = cuts(ranking, scores)
    thresholds = every_cut[1:]
    best = best_f1(tps, fps, thresholds)
    points = {"threshold": best["threshold"], "precision": best["precision"], "recall": best["recall"],
              "f1": best["f1"]}
    positives, negatives = tps[-1], fps[-1]
    if positives == 0 or negatives == 0:
        nan = float("nan")
        return points | {"threshold_no_escape": nan, "false_alarm_rate": nan, "threshold_no_false_alarm": nan,
                         "escape_rate": nan}
    first_full = (tps == positives).nonzero()[0, 0]
    clean = (fps == 0).nonzero()
    if clean.numel():
        last_clean = clean[-1, 0]
        no_false_alarm, escape = thresholds[last_clean].item(), (1 - tps[last_clean] / positives).item()
    else:  # the highest score is a good image's: only the cut above every score flags no good image
        no_false_alarm, escape = every_cut[0].item(), 1.0
    return points | {"threshold_no_escape": thresholds[first_full].item(),
                     "false_alarm_rate": (fps[first_full] / negatives).item(),
                     "threshold_no_false_alarm": no_false_alarm, "escape_rate": escape}


def curve_points(tps: Tensor, fps: Tensor, max_points: int = 1000) -> dict[str, list[float]]:
    """ROC (fpr, tpr) and PR (recall, precision) curves, at most max_points evenly spaced rows, for plots."""
    keep = torch.linspace(0, tps.numel() - 1, min(max_points, tps.numel()), device=tps.device).round().long().unique()
    tp, fp = tps[keep], fps[keep]
    return {"fpr": [0.0] + (fp / fps[-1].clamp_min(1)).tolist(), "tpr": [0.0] + (tp / tps[-1].clamp_min(1)).tolist(),
            "recall": (tp / tps[-1].clamp_min(1)).tolist(), "precision": (tp / (tp + fp)).tolist()}


def auroc_from_counts(tps: Tensor, fps: Tensor) -> float:
    if tps[-1] == 0 or fps[-1] == 0:
        return float("nan")  # undefined with one class only
    return torch.trapezoid(F.pad(tps / tps[-1], (1, 0)), F.pad(fps / fps[-1], (1, 0))).item()


def average_precision_from_counts(tps: Tensor, fps: Tensor) -> float:
    if tps[-1] == 0:
        return float("nan")
    recall = F.pad(tps / tps[-1], (1, 0))
    return (recall.diff() * tps / (tps + fps)).sum().item()


def auroc(scores: Tensor, labels: Tensor) -> float:
    """Equals sklearn.metrics.roc_auc_score(labels, scores), ties included."""
    return auroc_from_counts(*roc_pr_counts(rank(scores), labels))


def average_precision(scores: Tensor, labels: Tensor) -> float:
    """Equals sklearn.metrics.average_precision_score(labels, scores), ties included."""
    return average_precision_from_counts(*roc_pr_counts(rank(scores), labels))


def connected_regions(masks: Tensor) -> tuple[Tensor, int]:
    """Label the 8-connected anomalous regions of (N, H, W) binary masks with ids unique across images (0 = none)."""
    labelled = np.zeros(masks.shape, dtype=np.int64)
    offset = 0
    for i, mask in enumerate(masks.cpu().numpy().astype(np.uint8)):
        count, labels = cv2.connectedComponents(mask, connectivity=8)
        labelled[i] = np.where(labels > 0, labels + offset, 0)
        offset += count - 1
    return torch.from_numpy(labelled).to(masks.device), offset


def aupro(anomaly_maps: Tensor, masks: Tensor, max_fpr: float = 0.3, ranking: Ranking | None = None,
          false_positives: Tensor | None = None) -> float:
    """Normalised area under the per-region-overlap curve up to max_fpr (Bergmann et al., MVTec AD).

    PRO at a threshold is the mean over all ground-truth regions (8-connected, across all images) of
    the fraction of the region above it; FPR is over all normal pixels. Each anomalous pixel adds
    1 / (region size x region count) to PRO as the threshold passes it, each normal pixel 1 / normal
    pixel count to FPR, so one sort gives the exact curve.
    """
    regions, count = connected_regions(masks.bool())
    regions = regions.flatten()
    if count == 0:
        return float("nan")
    sizes = torch.bincount(regions, minlength=count + 1).double()
    ranking = ranking or rank(anomaly_maps)
    if false_positives is None:
        false_positives = roc_pr_counts(ranking, regions > 0)[1]
    weight_per_region = 1.0 / (sizes * count)
    weight_per_region[0] = 0.0  # normal pixels add nothing to PRO
    pro = cumulative(ranking, weight_per_region[regions])
    fpr = false_positives / false_positives[-1]
    return area_up_to(fpr, pro, max_fpr)


def area_up_to(fpr: Tensor, overlap: Tensor, max_fpr: float) -> float:
    """The normalised area under a curve of overlap against FPR (one point per threshold, highest first), from
    (0, 0) up to exactly max_fpr: the trapezoid rule, the last segment cut by linear interpolation."""
    fpr, overlap = F.pad(fpr, (1, 0)), F.pad(overlap, (1, 0))
    inside = fpr <= max_fpr
    area = torch.trapezoid(overlap[inside], fpr[inside])
    last = inside.nonzero()[-1, 0]
    if last + 1 < fpr.numel():  # interpolate the curve up to exactly max_fpr
        f0, f1, p0, p1 = fpr[last], fpr[last + 1], overlap[last], overlap[last + 1]
        p_end = p0 + (p1 - p0) * (max_fpr - f0) / (f1 - f0)
        area = area + (max_fpr - f0) * (p0 + p_end) / 2
    return (area / max_fpr).item()


def pixel_metrics(anomaly_maps: Tensor, masks: Tensor, max_fpr: float = 0.3, ranking: Ranking | None = None,
                  counts: tuple[Tensor, Tensor] | None = None) -> dict[str, float]:
    """Pixel AUROC, AP and AUPRO over all pixels of all images pooled, from one sort (or the ranking and
    roc_pr_counts given, so a caller that needs them too computes them once)."""
    ranking = ranking or rank(anomaly_maps)
    tps, fps = counts or roc_pr_counts(ranking, masks)
    return {"pixel_auroc": auroc_from_counts(tps, fps), "pixel_ap": average_precision_from_counts(tps, fps),
            "aupro": aupro(anomaly_maps, masks, max_fpr, ranking, fps)}


def verdict(score: float, threshold: float | None) -> str:
    """ANOMALY at or above the threshold, else OK; empty without a threshold."""
    return "" if threshold is None or math.isnan(threshold) else ("ANOMALY" if score >= threshold else "OK")
