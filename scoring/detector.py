"""A trained model in Python: load any model file, predict on images, read scores, maps, verdicts and masks.

    from scoring.detector import load
    detector = load("checkpoints/DRAEM_my_part_....pt")   # or an .onnx / .xml export
    result = detector.predict("photo.png")                 # a path or an image array; a list gives a list
    print(result.score, result.verdict)                    # verdict at the stored image threshold
    cv2.imwrite("mask.png", result.defect_mask)            # 0/255 at the stored pixel threshold, image-sized

Images are prepared as test_draem.py prepares files (it scores --images through this class): 16-bit data at
the model's bit depth, grayscale and BGRA as 3-channel BGR, resized bilinearly to the model's size (or tiled).
Arrays are taken in OpenCV's BGR order.
"""
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from data_loader import decode, list_images, load_images, resize, to_bgr8, to_tensor, warn
from model_unet import image_scores
from scoring import thresholds
from scoring.evaluate import predict
from scoring.metrics import verdict
from scoring.model_files import load_model
from scoring.tiling import TiledModel
from training.checkpoint import CheckpointError, ModelInfo


@dataclass(frozen=True)
class Scoring:
    """How test_draem.py scores, whatever it scores: how images become model input (size, bit depth, tiles,
    batch, precision), and what is judged and written (thresholds as the flags take them, masks, panels)."""
    image_size: tuple[int, int] | None = None  # None: the model's size; with a tile, each image's own size
    bit_depth: int | None = None  # None: the depth the checkpoint records
    tile: tuple[int, int] | None = None
    tile_overlap: float = 0  # pixels, or a fraction of the tile below 1
    batch_size: int = 16  # images per forward pass; tiles per pass when tiled
    workers: int | None = None
    amp: str = "off"  # bf16: PyTorch networks under autocast (exported files run at their own precision)
    threshold: str | float | None = None  # --threshold (thresholds.choose)
    pixel_threshold: str | float | None = None
    mask_protocol: str = "standard"  # how test-set masks are binarised (evaluate.MASK_PROTOCOLS)
    save_images: bool = True  # a panel per image
    protocol: str = "auto"  # the benchmark's own columns (protocols.PROTOCOLS); auto: the data set's
    tiff_maps: Path | None = None  # also write each test image's map as a float TIFF here (map_files)

    def size_for(self, info: ModelInfo) -> tuple[int, int] | None:
        """The size images are resized to (None: kept at their own size, for tiling)."""
        return self.image_size or (None if self.tile else info.image_size)

    def depth_for(self, info: ModelInfo) -> int:
        return self.bit_depth or info.bit_depth


def scoring_model(path: Path, device: torch.device, scoring: Scoring) -> tuple[object, ModelInfo]:
    """The model as scoring calls it: tiled when asked (an .onnx file then runs at its exported size only)."""
    if scoring.tile is None:
        return load_model(path, device, scoring.image_size)
    model, info = load_model(path, device)
    if info.source in ("onnx", "openvino") and tuple(scoring.tile) != info.image_size:
        h, w = info.image_size
        raise CheckpointError(f"--tile {scoring.tile[0]}x{scoring.tile[1]}: {path} was exported for {h}x{w} tiles; "
                              f"use --tile {h}x{w}, or export again with --image_size at the tile size")
    return TiledModel(model, scoring.tile, scoring.tile_overlap, scoring.batch_size), info


def validation_maps(model, info: ModelInfo, folder: Path | None, device: torch.device, scoring: Scoring
                    ) -> torch.Tensor | None:
    """The anomaly maps (N, h, w) of a folder of good validation images at the scoring size (MVTec AD 2's
    segmentation threshold is set on them), or None with a warning when there is no such folder."""
    paths = list_images(folder) if folder else []
    if not paths:
        warn(f"{folder or 'no validation/good folder'}: no validation images: SegF1 and the submission threshold "
             f"(set on them) are not available")
        return None
    images = load_images(paths, scoring.size_for(info), scoring.workers, scoring.depth_for(info))
    return predict(model, images, device, info.channel_order, images_per_pass(scoring), amp=scoring.amp)[0]


def images_per_pass(scoring: Scoring) -> int:
    return 1 if scoring.tile else scoring.batch_size  # tiled: one image at a time, its tiles in batches


@dataclass
class Prediction:
    """One image's result, at the image's own resolution."""
    score: float  # the paper's image score: max of the 21x21 mean-filtered anomaly map
    verdict: str  # "ANOMALY" or "OK" at the image threshold; "" without one
    anomaly_map: np.ndarray  # (H, W) float32 in [0, 1]
    defect_mask: np.ndarray | None  # (H, W) uint8, 255 where the map reaches the pixel threshold; None without one
    regions: list[dict]  # the mask's 8-connected regions, largest first (defect_regions)


class Detector:
    """A model file with the thresholds its verdicts and defect masks are judged at."""

    def __init__(self, model, info: ModelInfo, device: torch.device, scoring: Scoring,
                 image_threshold: thresholds.Threshold, pixel_threshold: thresholds.Threshold):
        self.model, self.info, self.device, self.scoring = model, info, device, scoring
        self.image_threshold, self.pixel_threshold = image_threshold, pixel_threshold

    def predict(self, images: str | Path | np.ndarray | list) -> Prediction | list[Prediction]:
        """Score a path or an image array (H, W[, C]; uint8, uint16 or float), or a list of them."""
        single = isinstance(images, (str, Path, np.ndarray))
        decoded = [self.prepare(item) for item in ([images] if single else images)]
        results = []
        for group in self.groups(decoded):
            maps, _ = self.score(group)
            results += [self.decide(image, amap, score)
                        for image, amap, score in zip(group, maps, image_scores(maps).tolist())]
        return results[0] if single else results

    def prepare(self, item: str | Path | np.ndarray) -> np.ndarray:
        depth = self.scoring.depth_for(self.info)
        return to_bgr8(item, depth) if isinstance(item, np.ndarray) else decode(Path(item), depth)

    def groups(self, images: list[np.ndarray]) -> list[list[np.ndarray]]:
        """Batches of --batch_size; one image at a time when each is tiled at its own size."""
        step = 1 if self.scoring.size_for(self.info) is None else self.scoring.batch_size
        return [images[i:i + step] for i in range(0, len(images), step)]

    def score(self, images: list[np.ndarray], keep_reconstructions: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Anomaly maps (N, h, w) at the scoring size, and the reconstructions when asked."""
        size = self.scoring.size_for(self.info)
        batch = to_tensor([resize(image, size) if size else image for image in images])
        return predict(self.model, batch, self.device, self.info.channel_order, images_per_pass(self.scoring),
                       keep_reconstructions, self.scoring.amp)

    def decide(self, image: np.ndarray, anomaly_map: torch.Tensor, score: float) -> Prediction:
        """The verdict at the image threshold, and the defect mask and regions at the pixel threshold, with the
        map resized to the image's own size."""
        big_map = resize_map(anomaly_map.cpu().numpy(), *image.shape[:2])
        mask, regions = (None, []) if self.pixel_threshold.value is None else \
            defect_regions(big_map, self.pixel_threshold.value)
        return Prediction(score, verdict(score, self.image_threshold.value), big_map, mask, regions)


def load(path: str | Path, device: str | torch.device = "cpu", threshold: str | float | None = None,
         pixel_threshold: str | float | None = None, scoring: Scoring = Scoring()) -> Detector:
    """A .pt / .pckl / anomalib checkpoint or an .onnx / .xml export, ready to predict. threshold and
    pixel_threshold as test_draem.py's flags take them (default: the ones the file stores)."""
    device = torch.device(device)
    model, info = scoring_model(Path(path), device, scoring)
    return Detector(model, info, device, scoring, thresholds.choose(threshold, info, "image"),
                    thresholds.choose(pixel_threshold, info, "pixel"))


def resize_map(anomaly_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """The model-size anomaly map, bilinearly resized to the original image's size (float32)."""
    return cv2.resize(anomaly_map.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


def defect_regions(anomaly_map: np.ndarray, threshold: float) -> tuple[np.ndarray, list[dict]]:
    """The defect mask (uint8 0/255: map >= threshold) and its 8-connected regions, largest first.

    Each region: bounding box (x, y, width, height) and area in the map's pixels, and the maximum and
    mean anomaly score inside it.
    """
    mask = (anomaly_map >= threshold).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    ids, values = labels.ravel(), anomaly_map.ravel().astype(np.float64)
    sums = np.bincount(ids, weights=values, minlength=count)
    maxima = np.full(count, -np.inf)
    np.maximum.at(maxima, ids, values)
    regions = [{"x": int(stats[i, cv2.CC_STAT_LEFT]), "y": int(stats[i, cv2.CC_STAT_TOP]),
                "width": int(stats[i, cv2.CC_STAT_WIDTH]), "height": int(stats[i, cv2.CC_STAT_HEIGHT]),
                "area": int(stats[i, cv2.CC_STAT_AREA]), "max_score": float(maxima[i]),
                "mean_score": float(sums[i] / stats[i, cv2.CC_STAT_AREA])} for i in range(1, count)]
    regions.sort(key=lambda r: r["area"], reverse=True)
    return mask * 255, regions
