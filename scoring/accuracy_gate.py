"""The accuracy gate: an exported model scored against its own PyTorch checkpoint on a labelled test set.

A faster format passes when, on the same test images, it loses at most IMAGE_AUROC_DROP of image AUROC and
PIXEL_AP_DROP of pixel AP against PyTorch fp32, and all but a MAP_QUANTILE share of its anomaly-map values
stay within MAP_TOLERANCE[precision] of PyTorch's (docs/deploy.md says why these numbers). The largest
difference is shown too, but not gated: in reduced precision a few pixels whose two logits are both large
move far while the maps, metrics and verdicts do not.
"""
from pathlib import Path

import numpy as np
import torch

from data_loader import load_test_set, one_category
from deploy.model_files import load_model
from scoring.evaluate import evaluate
from training.checkpoint import model_from_checkpoint

IMAGE_AUROC_DROP = 0.005  # 0.5 points
PIXEL_AP_DROP = 0.01  # 1 point
MAP_TOLERANCE = {"fp32": 1e-4, "bf16": 0.05, "int8": 0.05}
MAP_QUANTILE = 0.999


def quantile_difference(a: torch.Tensor, b: torch.Tensor, q: float = MAP_QUANTILE) -> float:
    """The q-quantile of |a - b| over all values (np.partition: torch.quantile refuses very large inputs)."""
    difference = (a - b).abs().flatten().cpu().numpy()
    k = min(len(difference) - 1, int(np.ceil(q * len(difference))) - 1)
    return float(np.partition(difference, k)[k])
SHOWN = ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")


def compare(checkpoint: Path, exported: Path, data_path: Path, device: torch.device, obj_id: str | None = None,
            batch_size: int = 16, workers: int | None = None) -> dict:
    """Both models' metrics on the checkpoint's test set, their map difference, changed verdicts, failures."""
    reference, info = model_from_checkpoint(checkpoint)
    candidate, exported_info = load_model(exported, device)
    category = one_category(obj_id, data_path) if obj_id else info.category
    test_set = load_test_set(data_path, category, exported_info.image_size, workers, info.bit_depth)
    ours = evaluate(reference, test_set, device, info.channel_order, batch_size)
    theirs = evaluate(candidate, test_set, device, "BGR", batch_size)
    precision = exported_info.config.get("precision", "fp32")
    difference = (ours["maps"] - theirs["maps"]).abs().max().item()
    typical = quantile_difference(ours["maps"], theirs["maps"])
    threshold = info.threshold("image")
    changed = None if threshold is None else int(((ours["scores"] >= threshold) != (theirs["scores"] >= threshold)).sum())
    failures = []
    if ours["metrics"]["image_auroc"] - theirs["metrics"]["image_auroc"] > IMAGE_AUROC_DROP:
        failures.append(f"image AUROC drops by more than {100 * IMAGE_AUROC_DROP:g} points")
    if ours["metrics"]["pixel_ap"] - theirs["metrics"]["pixel_ap"] > PIXEL_AP_DROP:
        failures.append(f"pixel AP drops by more than {100 * PIXEL_AP_DROP:g} points")
    if typical > MAP_TOLERANCE[precision]:
        failures.append(f"more than {100 * (1 - MAP_QUANTILE):g} % of anomaly-map values differ by more than "
                        f"{MAP_TOLERANCE[precision]:g} ({precision}; the {100 * MAP_QUANTILE:g}th percentile "
                        f"difference is {typical:.3g})")
    return {"category": category, "images": len(test_set.paths), "precision": precision, "pytorch": ours["metrics"],
            "exported": theirs["metrics"], "max_map_difference": difference, "p999_map_difference": typical,
            "threshold": threshold,
            "verdicts_changed": changed, "failures": failures}


def gate_lines(result: dict, name: str) -> list[str]:
    """The two rows side by side, then the verdict."""
    header = (f"{'model':<28}" + "".join(f"{m:>13}" for m in SHOWN)
              + f"{'map diff p99.9':>16}{'max map diff':>14}{'verdicts changed':>18}")
    changed = "-" if result["verdicts_changed"] is None else f"{result['verdicts_changed']} of {result['images']}"
    rows = [f"{'PyTorch fp32 (reference)':<28}" + "".join(f"{100 * result['pytorch'][m]:>13.2f}" for m in SHOWN),
            f"{name[:28]:<28}" + "".join(f"{100 * result['exported'][m]:>13.2f}" for m in SHOWN)
            + f"{result['p999_map_difference']:>16.2e}{result['max_map_difference']:>14.2e}{changed:>18}"]
    verdict = ("PASSES the accuracy gate" if not result["failures"] else
               "FAILS the accuracy gate: " + "; ".join(result["failures"]))
    return [f"accuracy gate on {result['category']} ({result['images']} test images, metrics in percent):", header,
            *rows, verdict]
