"""Each benchmark scored the way its authors score it, beside the MVTec AD metrics every run reports
(docs/evaluation.md#benchmark-protocols). The protocol follows the data set's name (its folder: datasets/loco is
"loco") unless test_draem.py --protocol names one.

- mvtec_ad2: AU-PRO up to FPR 0.05 (the paper's headline) and 0.3; SegF1, the F1 of the maps binarised at the
  mean + 3 standard deviations of the pixel scores of validation/good, pixels of all test images pooled.
- loco: AU-sPRO up to FPR 0.05 and image AUROC (image score: the map's maximum), on the structural and the
  logical anomalies apart (each with all good images), and the mean of the two.
- ksdd2: AP_det, the area under the precision-recall curve by the trapezoid rule (the data set authors'
  auc(recall, precision)), and AP_loc, pixel AP (DSR's).
- visa: image and pixel AU-PR by the trapezoid rule, the pixels of the normal images included.
"""
import json
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor

from data_loader import DataError, TestSet, list_images
from model_unet import image_scores
from scoring.metrics import area_up_to, aupro, auroc, cumulative, rank, roc_pr_counts

# The columns each protocol adds, named as its authors name them.
PROTOCOLS: dict[str, dict[str, str]] = {
    "mvtec_ad": {},
    "mvtec_ad2": {"au_pro_0.05": "AU-PRO0.05", "au_pro_0.3": "AU-PRO0.3", "seg_f1": "SegF1"},
    "loco": {"image_auroc_structural": "AUROC structural", "image_auroc_logical": "AUROC logical",
             "image_auroc_mean": "AUROC mean", "au_spro_structural": "AU-sPRO0.05 structural",
             "au_spro_logical": "AU-sPRO0.05 logical", "au_spro_mean": "AU-sPRO0.05 mean"},
    "ksdd2": {"ap_det": "AP_det", "ap_loc": "AP_loc"},
    "visa": {"image_au_pr": "image AU-PR", "pixel_au_pr": "pixel AU-PR"},
}
BENCHMARK_NAMES = {"mvtec_ad": "MVTec AD", "mvtec_ad2": "MVTec AD 2", "loco": "MVTec LOCO AD", "ksdd2": "KolektorSDD2",
                   "visa": "VisA"}
LOCO_KINDS = ("structural", "logical")
SPRO_MAX_FPR = 0.05


def protocol_for(data_set: str, chosen: str = "auto") -> str:
    """The protocol a run is scored by: the one chosen, else the data set's own, else MVTec AD's."""
    return chosen if chosen != "auto" else (data_set if data_set in PROTOCOLS else "mvtec_ad")


def trapezoidal_ap(scores: Tensor, labels: Tensor) -> float:
    """The area under the precision-recall curve by the trapezoid rule, from (recall 0, precision 1) to the first
    threshold of full recall: scikit-learn's auc(recall, precision) on precision_recall_curve. Unlike average
    precision (a step sum) it interpolates linearly between the points."""
    tps, fps = roc_pr_counts(rank(scores), labels)
    positives = tps[-1]
    if positives == 0:
        return float("nan")
    full = (tps == positives).nonzero()[0, 0]
    one = torch.ones(1, dtype=tps.dtype, device=tps.device)
    recall = torch.cat([0 * one, tps[:full + 1] / positives])
    precision = torch.cat([one, tps[:full + 1] / (tps[:full + 1] + fps[:full + 1])])
    return torch.trapezoid(precision, recall).item()


def segmentation_threshold(validation_maps: Tensor) -> float:
    """MVTec AD 2's threshold: mean + 3 standard deviations (population) of the good validation images' pixels."""
    pixels = validation_maps.double().flatten()
    return (pixels.mean() + 3 * pixels.std(correction=0)).item()


def seg_f1(maps: Tensor, masks: Tensor, threshold: float) -> float:
    """F1 of maps >= threshold against the masks, every pixel of every image pooled."""
    predicted, truth = maps >= threshold, masks.bool()
    tp = (predicted & truth).sum().item()
    wrong = (predicted ^ truth).sum().item()  # false positives + false negatives
    return 2 * tp / (2 * tp + wrong) if tp + wrong else float("nan")


# ---- sPRO (MVTec LOCO AD) ------------------------------------------------------------------------------------

# One ground-truth defect (one mask channel of LOCO): the index of the image it is in, its pixels ((H, W) bool),
# and how many of them must be flagged for it to count as fully found (its saturation, in pixels; > 0).
Defect = tuple[int, Tensor, float]


def saturation_area(area: int, threshold: float, relative: bool) -> int:
    """LOCO's rule: int(threshold x area) when relative, else min(threshold, area); at least one pixel."""
    return max(1, int(threshold * area) if relative else min(int(threshold), area))


def spro_weights(maps: Tensor, defects: list[Defect]) -> Tensor:
    """Per pixel, what it adds to sPRO when the threshold passes it: each defect's highest-scoring pixels carry
    1 / (saturation x defects) each until its saturation is reached, its other pixels nothing; a pixel in
    several defects adds for each. Ties inside a defect share the weight in any order: the curve is read only
    at the end of each run of equal scores, where the sum is the same."""
    weights = torch.zeros(maps.numel(), dtype=torch.float64, device=maps.device)
    plane = maps[0].numel()
    for image, region, saturation in defects:
        where = region.to(maps.device).flatten().nonzero()[:, 0] + image * plane
        order = torch.sort(maps.flatten()[where], descending=True, stable=True).indices
        passed = torch.arange(where.numel() + 1, dtype=torch.float64, device=maps.device)
        found = (passed / saturation).clamp(max=1.0)
        weights.index_add_(0, where[order], found.diff() / len(defects))
    return weights


def au_spro(maps: Tensor, defects: list[Defect], max_fpr: float = SPRO_MAX_FPR) -> float:
    """Normalised area under the saturated per-region overlap curve up to max_fpr (Bergmann et al., MVTec LOCO AD):
    sPRO at a threshold is the mean over defects of min(flagged pixels of it / its saturation, 1); the FPR is over
    the pixels outside every defect, all images pooled. One sort gives the exact curve."""
    if not defects:
        return float("nan")
    normal = torch.ones(maps.shape, dtype=torch.bool, device=maps.device)
    for image, region, _ in defects:
        normal[image] &= ~region.to(maps.device)
    ranking = rank(maps)
    spro = cumulative(ranking, spro_weights(maps, defects))
    false_positives = cumulative(ranking, normal).double()
    return area_up_to(false_positives / false_positives[-1], spro, max_fpr)


def loco_config(category: Path) -> dict[int, dict]:
    """defects_config.json of a LOCO category, by pixel value."""
    path = category / "defects_config.json"
    try:
        entries = json.loads(path.read_text())
        return {int(e["pixel_value"]): e for e in entries}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: no readable defects_config.json ({type(exc).__name__}): LOCO's sPRO needs it; "
                        f"prepare the data set with scripts/prepare_data.py loco")


def loco_defects(test_set: TestSet) -> list[Defect]:
    """The defects of a prepared LOCO test set, one per mask channel (ground_truth/<type>/<stem>/000.png ...), at
    the test set's size; each saturation is computed at the image's own size by defects_config.json and scaled by
    the area ratio."""
    height, width = test_set.images.shape[-2:]
    defects, configs = [], {}
    for index, (path, kind) in enumerate(zip(test_set.paths, test_set.defect_types)):
        if kind == "good":
            continue
        category = path.parents[2]
        config = configs.setdefault(category, loco_config(category))
        folder = category / "ground_truth" / kind / path.stem
        channels = list_images(folder)
        if not channels:
            raise DataError(f"{folder}: no mask channels (000.png ...): LOCO's sPRO needs them; prepare the data set "
                            f"again with scripts/prepare_data.py loco")
        for channel in channels:
            defects.append(loco_defect(channel, config, index, (height, width)))
    return defects


def loco_defect(channel: Path, config: dict[int, dict], index: int, size: tuple[int, int]) -> Defect:
    mask = cv2.imread(str(channel), cv2.IMREAD_GRAYSCALE)
    values = np.unique(mask[mask != 0]) if mask is not None else []
    if len(values) != 1 or int(values[0]) not in config:
        raise DataError(f"{channel}: expected one defect whose pixel value is in defects_config.json, found "
                        f"{'no readable mask' if mask is None else f'values {[int(v) for v in values]}'}")
    entry, region = config[int(values[0])], mask != 0
    saturation = saturation_area(int(region.sum()), float(entry["saturation_threshold"]),
                                 bool(entry["relative_saturation"]))
    height, width = size
    resized = cv2.resize(region.astype(np.uint8) * 255, (width, height), interpolation=cv2.INTER_LINEAR) >= 128
    scale = height * width / region.size
    return index, torch.from_numpy(resized), saturation * scale


# ---- one run's columns -----------------------------------------------------------------------------------------

def protocol_metrics(protocol: str, maps: Tensor, masks: Tensor, test_set: TestSet, standard: dict[str, float],
                     validation_maps: Tensor | None = None) -> dict[str, float]:
    """The protocol's columns for one run: maps (N, H, W) of the test set, masks (N, H, W) as the standard metrics
    binarise them, standard those metrics (where a column is one of them: AU-PRO0.3 is AUPRO, AP_loc pixel AP);
    validation_maps are the good validation images' (MVTec AD 2's SegF1; NaN without them)."""
    labels = test_set.labels.to(maps.device)
    known = test_set.has_mask.to(maps.device)
    if protocol == "mvtec_ad2":
        threshold = segmentation_threshold(validation_maps) if validation_maps is not None else float("nan")
        return {"au_pro_0.05": aupro(maps[known], masks[known], 0.05), "au_pro_0.3": standard["aupro"],
                "seg_f1": seg_f1(maps[known], masks[known], threshold)}
    if protocol == "ksdd2":
        return {"ap_det": trapezoidal_ap(image_scores(maps), labels), "ap_loc": standard["pixel_ap"]}
    if protocol == "visa":
        return {"image_au_pr": trapezoidal_ap(image_scores(maps), labels),
                "pixel_au_pr": trapezoidal_ap(maps[known], masks[known])}
    if protocol == "loco":
        return loco_metrics(maps, test_set, loco_defects(test_set))
    return {}


def loco_metrics(maps: Tensor, test_set: TestSet, defects: list[Defect]) -> dict[str, float]:
    """Image AUROC (the map's maximum) and AU-sPRO0.05 on good + structural and on good + logical images apart."""
    types = test_set.defect_types
    out = {}
    for kind in LOCO_KINDS:
        keep = [i for i, t in enumerate(types) if t == "good" or t.startswith(kind)]
        renumber = {old: new for new, old in enumerate(keep)}
        subset = maps[keep]
        labels = torch.tensor([types[i] != "good" for i in keep], device=maps.device)
        out[f"image_auroc_{kind}"] = auroc(subset.flatten(1).amax(1), labels)
        out[f"au_spro_{kind}"] = au_spro(subset, [(renumber[image], region, saturation)
                                                  for image, region, saturation in defects if image in renumber])
    for metric in ("image_auroc", "au_spro"):
        out[f"{metric}_mean"] = (out[f"{metric}_structural"] + out[f"{metric}_logical"]) / 2
    return out
