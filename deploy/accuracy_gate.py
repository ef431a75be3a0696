"""The accuracy gate: an exported model against its own PyTorch checkpoint, judged on what the line sees.

Two sets of checks, each run only where it can be computed, and listed by name:

- labelled (the category's test set holds defect images): image AUROC and pixel AP may drop by at most
  IMAGE_AUROC_DROP and PIXEL_AP_DROP;
- good images (test/good, or the checkpoint's held-out calibration images, or a folder of good images) plus
  one simulated anomaly made from each (perlin.py, the checkpoint's recipe): the image AUROC of simulated
  anomalies against good images may drop by at most IMAGE_AUROC_DROP, and at the file's calibrated image
  threshold the export may flag no more good images than the false-alarm budget allows (or than PyTorch
  flags, when PyTorch already exceeds it);
- on every image scored: at the stored image threshold at most VERDICT_CHANGES of the verdicts may change,
  and at the stored pixel threshold the defect masks must agree with PyTorch's at an IoU of at least
  MASK_IOU; fp32 exports must also keep all but MAP_QUANTILE of the map values within MAP_TOLERANCE["fp32"]
  (rounding only). The map-difference percentiles are shown for every precision.

docs/deploy.md shows each tolerance beside the fp32 variation it is measured against. A check that cannot be
computed (no defect images, no stored threshold) is "not run", never passed; the verdict names the checks
that ran.
"""
import math
from pathlib import Path

import numpy as np
import torch

from data_loader import DataError, category_layout, list_images, load_images, load_test_set, one_category
from deploy.export import anomaly_sources, checkpoint_config
from deploy.int8 import simulated_anomalies
from model_unet import image_scores
from scoring.calibration import allowed_false_alarms, upper_bound
from scoring.evaluate import evaluate, predict
from scoring.metrics import auroc
from scoring.model_files import load_model
from training.checkpoint import model_from_checkpoint

IMAGE_AUROC_DROP = 0.005  # 0.5 points
PIXEL_AP_DROP = 0.01  # 1 point
VERDICT_CHANGES = 0.01  # share of the images whose verdict may change
MASK_IOU = 0.9  # least agreement of the defect masks with PyTorch's
MAP_TOLERANCE = {"fp32": 1e-4, "bf16": 0.05, "int8": 0.05}
MAP_QUANTILE = 0.999
GATE_SEED = 1  # the simulated anomalies the gate scores (calibration uses seed 0)
SHOWN = ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")


def check(name: str, value: str, passed: bool | None, limit: str = "") -> dict:
    """One line of the gate: what was measured (value, in words), passed (None: not run), and the tolerance or
    why the check did not run (limit)."""
    return {"name": name, "value": value, "passed": passed, "limit": limit}


def quantile_difference(a: torch.Tensor, b: torch.Tensor, q: float = MAP_QUANTILE) -> float:
    """The q-quantile of |a - b| over all values (np.partition: torch.quantile refuses very large inputs)."""
    difference = (a - b).abs().flatten().cpu().numpy()
    k = min(len(difference) - 1, int(np.ceil(q * len(difference))) - 1)
    return float(np.partition(difference, k)[k])


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Intersection over union of two sets of boolean masks, over all their pixels; 1 when both are empty."""
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def drop_check(name: str, ours: float, theirs: float, allowed: float) -> dict:
    if math.isnan(ours) or math.isnan(theirs):
        return check(name, "undefined", False, f"drop <= {100 * allowed:g} points")
    drop = ours - theirs
    return check(name, f"{100 * ours:.2f} -> {100 * theirs:.2f} ({-100 * drop:+.2f} points)", drop <= allowed,
                 f"drop <= {100 * allowed:g} points")


def line_checks(ours: dict, theirs: dict, info, precision: str) -> list[dict]:
    """Verdicts at the stored image threshold and defect masks at the stored pixel threshold, on every image."""
    checks, n = [], len(ours["scores"])
    threshold = info.threshold("image")
    if threshold is None:
        checks.append(check("verdicts changed", "-", None, "no image threshold stored"))
    else:
        changed = int(((ours["scores"] >= threshold) != (theirs["scores"] >= threshold)).sum())
        checks.append(check("verdicts changed", f"{changed} of {n} at {threshold:.4g}",
                            changed <= math.floor(VERDICT_CHANGES * n), f"<= {100 * VERDICT_CHANGES:g} %"))
    pixel = info.threshold("pixel")
    if pixel is None:
        checks.append(check("defect-mask IoU", "-", None, "no pixel threshold stored"))
    else:
        iou = mask_iou(ours["maps"] >= pixel, theirs["maps"] >= pixel)
        checks.append(check("defect-mask IoU", f"{iou:.4f} at {pixel:.4g}", iou >= MASK_IOU, f">= {MASK_IOU:g}"))
    typical = quantile_difference(ours["maps"], theirs["maps"])
    if precision == "fp32":
        checks.append(check("map difference p99.9", f"{typical:.3g}", typical <= MAP_TOLERANCE["fp32"],
                            f"<= {MAP_TOLERANCE['fp32']:g} (fp32: rounding only)"))
    return checks


def good_images(data_path: Path, category: str, info, size, bit_depth: int) -> tuple[torch.Tensor, str]:
    """The good images the good-only checks use, and where they come from in words."""
    if data_path.is_dir() and list_images(data_path):
        return load_images(list_images(data_path), size, bit_depth=bit_depth), f"{data_path}"
    layout = category_layout(data_path, category)
    for folder in (layout.test.get("good"), layout.validation):
        if folder is not None and list_images(folder):
            return load_images(list_images(folder), size, bit_depth=bit_depth), f"{folder}"
    held_out = [layout.train / name for name in info.calibration.get("held_out", [])]
    if held_out and all(p.is_file() for p in held_out):
        return load_images(held_out, size, bit_depth=bit_depth), "the held-out calibration images"
    raise DataError(f"--check {data_path}: no good images to check on (no good test or validation images in "
                    f"{layout.origin}, no held-out calibration images, and {data_path} holds no images itself)")


def scored(model, images: torch.Tensor, device, channel_order: str, batch_size: int = 16) -> dict:
    maps = predict(model, images, device, channel_order, batch_size)[0]
    return {"maps": maps, "scores": image_scores(maps).cpu()}


def good_only_checks(ours: dict, theirs: dict, good: int, info) -> list[dict]:
    """On good images followed by one simulated anomaly each: AUROC of the two groups and the false alarms."""
    labels = torch.cat((torch.zeros(good), torch.ones(len(ours["scores"]) - good)))
    checks = [drop_check("simulated-anomaly AUROC", auroc(ours["scores"], labels), auroc(theirs["scores"], labels),
                         IMAGE_AUROC_DROP)]
    point = info.calibration.get("image")
    if point is None:
        checks.append(check("false alarms on good images", "-", None, "no calibrated image threshold stored"))
        return checks
    rate, threshold = info.calibration["false_alarm_rate"], point["threshold"]
    flagged = [int((s[:good] >= threshold).sum()) for s in (ours["scores"], theirs["scores"])]
    allowed = max(allowed_false_alarms(good, rate), flagged[0])
    checks.append(check("false alarms on good images",
                        f"{flagged[1]} of {good} (PyTorch {flagged[0]}; true rate at most "
                        f"{100 * upper_bound(flagged[1], good):.3g} %)", flagged[1] <= allowed,
                        f"<= {allowed} (budget {100 * rate:g} %)"))
    return checks


def reference(checkpoint: Path, data_path: Path, device: torch.device, obj_id: str | None = None,
              batch_size: int = 16, sources: Path | None = None, size: tuple[int, int] | None = None) -> dict:
    """What the exports are judged against: PyTorch fp32's scores ("labelled") on the labelled test set (when it
    has defect images; else None and "why_unlabelled" says why) and ("simulated") on "images": "good" good images,
    then one simulated anomaly made from each; with the model's "info", the "category" and where the images come
    from ("good_from", "anomalies_from")."""
    model, info = model_from_checkpoint(checkpoint)
    model.to(device)
    size, order = size or info.image_size, info.channel_order
    category = one_category(obj_id, data_path) if obj_id else info.category
    layout = category_layout(data_path, category) if category and not list_images(data_path) else None
    test_set = (load_test_set(data_path, category, size, None, info.bit_depth, info.trained_digests)
                if layout and layout.test else None)
    why = f"no defect images in {layout.origin}" if test_set is not None else "no labelled test set"
    if test_set is not None and not test_set.labels.any():
        test_set = None
    good, where = good_images(data_path, category, info, size, info.bit_depth)
    recorded = anomaly_sources(checkpoint_config(checkpoint), sources)
    simulated, made_of = simulated_anomalies(good, recorded, info.config["recipe"], GATE_SEED)
    images = torch.cat((good, (simulated * 255).round().to(torch.uint8)))
    return {"info": info, "category": category, "test_set": test_set, "why_unlabelled": why, "images": images,
            "good": len(good), "good_from": where, "anomalies_from": made_of,
            "labelled": evaluate(model, test_set, device, order, batch_size) if test_set is not None else None,
            "simulated": scored(model, images, device, order, batch_size)}


def judge(ref: dict, candidate, precision: str, device: torch.device, batch_size: int = 16,
          channel_order: str = "BGR") -> dict:
    """The candidate's numbers beside the reference's, and the checks; candidate is a model as load_model gives
    it (an export takes BGR) or a network in PyTorch taking channel_order."""
    info = ref["info"]
    result = {"category": ref["category"], "precision": precision, "labelled": None, "checks": []}
    if ref["test_set"] is not None:
        ours, theirs = ref["labelled"], evaluate(candidate, ref["test_set"], device, channel_order, batch_size)
        result["labelled"] = {"images": len(ref["test_set"].paths), "left_out": ref["test_set"].left_out_text(),
                              "pytorch": ours["metrics"],
                              "exported": theirs["metrics"],
                              "p999_map_difference": quantile_difference(ours["maps"], theirs["maps"]),
                              "max_map_difference": (ours["maps"] - theirs["maps"]).abs().max().item()}
        result["checks"] += [drop_check("image AUROC", ours["metrics"]["image_auroc"], theirs["metrics"]["image_auroc"],
                                        IMAGE_AUROC_DROP),
                             drop_check("pixel AP", ours["metrics"]["pixel_ap"], theirs["metrics"]["pixel_ap"],
                                        PIXEL_AP_DROP),
                             *[c | {"name": f"labelled: {c['name']}"}
                               for c in line_checks(ours, theirs, info, precision)]]
    else:
        result["checks"] += [check("image AUROC", "-", None, ref["why_unlabelled"]),
                             check("pixel AP", "-", None, ref["why_unlabelled"])]
    ours, theirs = ref["simulated"], scored(candidate, ref["images"], device, channel_order, batch_size)
    good = ref["good"]
    good_maps = (ours["maps"][:good] - theirs["maps"][:good]).abs().flatten().cpu().numpy()
    result["good_only"] = {"good": good, "simulated": len(ref["images"]) - good, "good_from": ref["good_from"],
                           "anomalies_from": ref["anomalies_from"],
                           "map_difference_percentiles": {q: float(np.quantile(good_maps, q / 100))
                                                          for q in (50, 99, 99.9)}}
    result["checks"] += good_only_checks(ours, theirs, good, info)
    result["checks"] += [c | {"name": f"good + simulated: {c['name']}"}
                         for c in line_checks(ours, theirs, info, precision)]
    result["failures"] = [f"{c['name']}: {c['value']} (limit {c['limit']})" for c in result["checks"]
                          if c["passed"] is False]
    result["ran"] = sum(c["passed"] is not None for c in result["checks"])
    return result


def compare(checkpoint: Path, exported: Path, data_path: Path, device: torch.device, obj_id: str | None = None,
            batch_size: int = 16, sources: Path | None = None) -> dict:
    """The gate in one call: the checkpoint's reference scores, then the export judged against them."""
    model, info = load_model(exported, device)
    return judge(reference(checkpoint, data_path, device, obj_id, batch_size, sources, info.image_size),
                 model, precision_of(info), device, batch_size)


def precision_of(info) -> str:
    return info.config.get("precision", "fp32")


def passes(result: dict) -> bool:
    return not result["failures"] and result["ran"] > 0


def gate_lines(result: dict, name: str) -> list[str]:
    """The metrics side by side (labelled test set), each check with its limit, then the verdict."""
    lines = []
    labelled = result["labelled"]
    if labelled:
        left_out = f"; {labelled['left_out']}" if labelled.get("left_out") else ""
        lines += [f"labelled test set of {result['category']} ({labelled['images']} images{left_out}, metrics in "
                  f"percent):",
                  f"  {'model':<28}" + "".join(f"{m:>13}" for m in SHOWN) + f"{'map diff p99.9':>16}{'max':>10}",
                  f"  {'PyTorch fp32 (reference)':<28}"
                  + "".join(f"{100 * labelled['pytorch'][m]:>13.2f}" for m in SHOWN),
                  f"  {name[:28]:<28}" + "".join(f"{100 * labelled['exported'][m]:>13.2f}" for m in SHOWN)
                  + f"{labelled['p999_map_difference']:>16.2e}{labelled['max_map_difference']:>10.2e}"]
    g = result["good_only"]
    p = g["map_difference_percentiles"]
    lines.append(f"good images ({g['good']}, {g['good_from']}) + {g['simulated']} simulated anomalies "
                 f"({g['anomalies_from']}); map difference on good images: p50 {p[50]:.2e}, p99 {p[99]:.2e}, "
                 f"p99.9 {p[99.9]:.2e}")
    for c in result["checks"]:
        status = {True: "pass", False: "FAIL", None: "not run"}[c["passed"]]
        lines.append(f"  {status:<8}{c['name']:<44}{c['value']:<52}{c['limit']}")
    not_run = [c["name"] for c in result["checks"] if c["passed"] is None]
    if result["failures"]:
        lines.append(f"{name} FAILS the accuracy gate: " + "; ".join(result["failures"]))
    elif result["ran"]:
        lines.append(f"{name} PASSES the accuracy gate: the {result['ran']} checks that ran"
                     + (f" (not run: {', '.join(not_run)})" if not_run else ""))
    else:
        lines.append(f"{name}: no check of the accuracy gate could run")
    return lines
