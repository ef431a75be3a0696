"""Anomaly-detection metrics on tensors (any device): AUROC, AP, AUPRO and DRAEM's image score.

Exact, tie-aware equivalents of scikit-learn's roc_auc_score and average_precision_score, computed by
one sort on the scores' device: pixel metrics pool every pixel of every test image (tens of millions
of values for an MVTec category), which scikit-learn handles on one CPU core only.
"""
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def image_scores(anomaly_maps: Tensor, kernel: int = 21) -> Tensor:
    """Max of the kernel x kernel mean-filtered anomaly map (stride 1, zero padding counted): (N, H, W) -> (N,)."""
    pooled = F.avg_pool2d(anomaly_maps[:, None].float(), kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    return pooled.flatten(1).amax(1)


Ranking = tuple[Tensor, Tensor]  # (descending order of the scores, index of the last score of each distinct value)


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
    pro, fpr = F.pad(pro, (1, 0)), F.pad(fpr, (1, 0))
    inside = fpr <= max_fpr
    area = torch.trapezoid(pro[inside], fpr[inside])
    last = inside.nonzero()[-1, 0]
    if last + 1 < fpr.numel():  # interpolate the curve up to exactly max_fpr
        f0, f1, p0, p1 = fpr[last], fpr[last + 1], pro[last], pro[last + 1]
        p_end = p0 + (p1 - p0) * (max_fpr - f0) / (f1 - f0)
        area = area + (max_fpr - f0) * (p0 + p_end) / 2
    return (area / max_fpr).item()


def pixel_metrics(anomaly_maps: Tensor, masks: Tensor, max_fpr: float = 0.3) -> dict[str, float]:
    """Pixel AUROC, AP and AUPRO over all pixels of all images pooled, from one sort."""
    ranking = rank(anomaly_maps)
    tps, fps = roc_pr_counts(ranking, masks)
    return {"pixel_auroc": auroc_from_counts(tps, fps), "pixel_ap": average_precision_from_counts(tps, fps),
            "aupro": aupro(anomaly_maps, masks, max_fpr, ranking, fps)}
