"""Scoring a model on a labelled test set by the official protocol: anomaly maps, metrics, operating points.

Image score = max of the 21x21 mean-filtered anomaly map; image AUROC / AP over every test image; pixel
AUROC / AP / AUPRO over the pixels of every image whose pixel labels are known (good images, and defect
images with a mask), pooled. One sort for the images and one for the pixels serve every metric.
"""
from contextlib import nullcontext
from typing import NamedTuple

import numpy as np
import torch

from data_loader import DataError, TestSet, warn
from model_unet import DraemModel, image_scores
from scoring.metrics import (METRICS, auroc, auroc_from_counts, average_precision, average_precision_from_counts,
                             best_f1, curve_points, image_operating_points, pixel_metrics, rank, roc_pr_counts,
                             threshold_values)
from training.cli import AMP_DTYPES


MASK_PROTOCOLS = {
    "standard": lambda m: m >= 128,  # bilinearly resized mask > 0.5
    "official": lambda m: m == 255,  # the official code's uint8 cast of mask / 255: only exact 255 counts
}


class MapOutput(NamedTuple):
    """What a scoring model that is not a DraemModel returns (an exported file, a tiled model): what predict reads
    of a DraemOutput."""
    anomaly_map: torch.Tensor  # (N, H, W)
    reconstruction: torch.Tensor  # (N, 3, H, W)


def out_of_memory(exc: BaseException) -> bool:
    """True for an allocation failure of the device (CUDA) or of the host (a CPU RuntimeError)."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "can't allocate memory" in str(exc)


def predict(model: DraemModel, images: torch.Tensor, device: torch.device, channel_order: str = "BGR",
            batch_size: int = 16, keep_reconstructions: bool = False, amp: str = "off"
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Anomaly maps (N, H, W) float32 on device for (N, 3, H, W) uint8 BGR images; optionally reconstructions.
    model: in eval mode on device (as scoring.model_files.load_model gives it), or any callable returning its outputs.
    amp "bf16" (or "fp16" on a GPU) runs the networks under autocast; the maps are returned in float32.

    When a batch does not fit in memory (large images), the batch size is halved until it does, with a
    note; an image that does not fit alone is a one-line error.
    """
    while True:
        try:
            return predict_batches(model, images, device, channel_order, batch_size, keep_reconstructions, amp)
        except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is one
            if not out_of_memory(exc):
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            height, width = images.shape[-2:]
            if batch_size == 1:
                raise DataError(f"one {height}x{width} image does not fit in the memory of {device} even at batch "
                                f"size 1: use a smaller --image_size or another --device")
            batch_size //= 2
            warn(f"{height}x{width} images do not fit in the memory of {device} at this batch size: "
                 f"retrying with --batch_size {batch_size}")


@torch.inference_mode()
def predict_batches(model: DraemModel, images: torch.Tensor, device: torch.device, channel_order: str,
                    batch_size: int, keep_reconstructions: bool, amp: str = "off"
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    # fp32 unless amp is asked for: the metrics must not depend on the training precision
    autocast = torch.autocast(device.type, dtype=AMP_DTYPES[amp]) if amp != "off" else nullcontext()
    maps, recs = [], []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device, non_blocking=True).float() / 255
        x = x.flip(1) if channel_order == "RGB" else x
        with autocast:
            out = model(x.contiguous(memory_format=torch.channels_last))
        maps.append(out.anomaly_map.float())
        if keep_reconstructions:
            rec = out.reconstruction.float()
            recs.append((rec.flip(1) if channel_order == "RGB" else rec).cpu())
    return torch.cat(maps), (torch.cat(recs) if keep_reconstructions else None)


def evaluate(model: DraemModel, test_set: TestSet, device: torch.device, channel_order: str = "BGR",
             batch_size: int = 16) -> dict:
    """The model scored on the test set (fp32): measure() of its anomaly maps."""
    return measure(predict(model, test_set.images, device, channel_order, batch_size)[0], test_set)


def measure(maps: torch.Tensor, test_set: TestSet, mask_protocol: str = "standard") -> dict:
    """Metrics, operating points, per-defect-type rows, curves and how many defect images had a mask, of the
    test set's anomaly maps (N, H, W); with the image scores, maps and masks they were computed on."""
    device = maps.device
    scores = image_scores(maps)
    labels = test_set.labels.to(device)
    masks = MASK_PROTOCOLS[mask_protocol](test_set.masks[:, 0].to(device))
    known = test_set.has_mask.to(device)
    pixel_maps, pixel_masks = (maps, masks) if known.all() else (maps[known], masks[known])
    image_ranking, pixel_ranking = rank(scores), rank(pixel_maps)
    image_counts, pixel_counts = roc_pr_counts(image_ranking, labels), roc_pr_counts(pixel_ranking, pixel_masks)
    image_points = image_operating_points(scores, labels, image_ranking)
    pixel_point = best_f1(*pixel_counts, threshold_values(pixel_ranking, pixel_maps))
    metrics = {"image_auroc": auroc_from_counts(*image_counts), "image_ap": average_precision_from_counts(*image_counts),
               "image_f1_max": image_points["f1"],
               **pixel_metrics(pixel_maps, pixel_masks, ranking=pixel_ranking, counts=pixel_counts),
               "pixel_f1_max": pixel_point["f1"]}
    return {"metrics": {m: metrics[m] for m in METRICS},
            "operating_points": {"image": image_points, "pixel": pixel_point},
            "per_defect_type": per_defect_type(scores, maps, labels, masks, known, test_set.defect_types),
            "mask_coverage": test_set.mask_coverage,
            "curves": {"image": curve_points(*image_counts), "pixel": curve_points(*pixel_counts)},
            "scores": scores.cpu(), "maps": maps, "masks": masks}


def per_defect_type(scores: torch.Tensor, maps: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
                    known: torch.Tensor, defect_types: list[str]) -> dict[str, dict]:
    """Each defect type against the good images: its image AUROC over all its images, and its pixel AP over
    its images that have masks and the good images, pixels pooled (NaN when none of them has a mask)."""
    types = np.array(defect_types)
    rows = {}
    for defect in sorted(set(defect_types) - {"good"}):
        keep = torch.from_numpy((types == defect) | (types == "good")).to(scores.device)
        with_mask = keep & known
        rows[defect] = {"images": int((types == defect).sum()),
                        "images_with_mask": int((with_mask & labels.bool()).sum()),
                        "image_auroc": auroc(scores[keep], labels[keep]),
                        "pixel_ap": average_precision(maps[with_mask], masks[with_mask])}
    return rows
