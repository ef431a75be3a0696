"""Thresholds from good images alone: a false-alarm budget turned into an order statistic of their scores,
reported with what the number of images can show about the true false-alarm rate.

With n good images and a budget r, at most floor(r * n) of them may be flagged (score >= threshold). The
threshold is set halfway between the highest score that must stay unflagged and the next higher distinct
score (half the top gap above the highest score when none may be flagged), in float32 like the scores, so
that exactly the allowed images, or fewer when scores tie, are flagged, and no score sits on the threshold. The image threshold uses the image scores; the
pixel threshold uses each image's largest anomaly-map value (an image gets a defect region exactly when
that value reaches the pixel threshold). What n images show about the true rate is the one-sided 95 %
Clopper-Pearson upper bound of the observed count.
"""
import math

import numpy as np
import torch

from model_unet import image_scores
from scoring.metrics import percent, separating_thresholds

CONFIDENCE = 0.95


def allowed_false_alarms(n: int, rate: float) -> int:
    return math.floor(rate * n + 1e-9)  # 1e-9: 0.29 * 100 is 28.999999999999996 in binary floating point


def budget_threshold(scores, rate: float) -> float:
    """The threshold that flags as many of these good scores as the budget allows, and no more, halfway
    between two neighbouring distinct scores (metrics.separating_thresholds)."""
    distinct = np.unique(np.asarray(scores, np.float32))[::-1].copy()
    values = np.sort(np.asarray(scores, np.float32).ravel())[::-1]
    keep = values[allowed_false_alarms(len(values), rate)]  # the highest score that must not be flagged
    flagged_groups = int((distinct > keep).sum())
    return separating_thresholds(torch.from_numpy(distinct))[flagged_groups].item()


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if p <= 0:
        return 1.0
    if p >= 1:
        return 1.0 if k >= n else 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    return min(1.0, sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                                 + i * log_p + (n - i) * log_q) for i in range(k + 1)))


def upper_bound(flagged: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper-Pearson upper bound of a rate seen as flagged / n: the largest p with P(X <= flagged) >=
    1 - confidence, found by bisection (the CDF falls as p grows)."""
    if flagged >= n:
        return 1.0
    low, high = flagged / n, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if binomial_cdf(flagged, n, middle) > 1 - confidence else (low, middle)
    return high


def images_needed(rate: float, confidence: float = CONFIDENCE) -> int:
    """The fewest good images that, none of them flagged, bound the false-alarm rate by rate."""
    return math.ceil(math.log(1 - confidence) / math.log1p(-rate) - 1e-9)


def operating_point(scores, rate: float) -> dict:
    """A threshold for this budget and what it does on these good images."""
    values = np.asarray(scores, np.float32).ravel()
    threshold = budget_threshold(values, rate)
    flagged = int((values >= np.float32(threshold)).sum())
    return {"threshold": threshold, "flagged": flagged, "observed_rate": flagged / len(values),
            "upper_bound": upper_bound(flagged, len(values))}


def map_statistics(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the two thresholds are set on, per anomaly map (N, H, W) of a good image: its image score and its
    largest value, on the CPU."""
    return image_scores(maps).cpu(), maps.flatten(1).amax(1).cpu()


def calibrate(scores, map_maxima, rate: float, source: str) -> dict:
    """Image and pixel thresholds from the image scores and map maxima of good images; what model files store."""
    return {"false_alarm_rate": rate, "images": len(scores), "confidence": CONFIDENCE, "source": source,
            "images_needed": images_needed(rate), "image": operating_point(scores, rate),
            "pixel": operating_point(map_maxima, rate)}


def describe(calibration: dict) -> list[str]:
    """What a calibration says, in plain lines for the console."""
    n, rate, needed = calibration["images"], calibration["false_alarm_rate"], calibration["images_needed"]
    lines = [f"calibrated on {n} good images ({calibration['source']}) for a false-alarm rate of at most "
             f"{percent(rate, '.3g')} %:"]
    for kind, what in (("image", "flags"), ("pixel", "gives a defect region to")):
        point = calibration[kind]
        lines.append(f"  {kind} threshold {point['threshold']:.6g}: {what} {point['flagged']} of {n} good images "
                     f"({percent(point['observed_rate'], '.3g')} %); true rate at most "
                     f"{percent(point['upper_bound'], '.3g')} % "
                     f"({percent(calibration['confidence'], '.3g')} % confidence)")
    if max(calibration[k]["upper_bound"] for k in ("image", "pixel")) > rate:
        if n < needed:
            lines.append(f"  {n} images cannot show a false-alarm rate of at most {percent(rate, '.3g')} %: that takes "
                         f"at least {needed} good images with none flagged")
        else:
            lines.append(f"  flagged images keep the bound above {percent(rate, '.3g')} %: {n} images show it only "
                         f"when none of them is flagged (a stricter --false_alarm_rate)")
    return lines
