"""Pictures for people: input | reconstruction | heatmap overlay panels, at the image's own resolution."""
from pathlib import Path

import cv2
import numpy as np
import torch


def to_bgr_u8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float [0, 1] BGR tensor -> (H, W, 3) uint8 array."""
    return (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def heat_overlay(image: np.ndarray, anomaly_map: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """JET colour map of a [0, 1] map blended over a uint8 BGR image of the same size."""
    heat = cv2.applyColorMap((np.clip(anomaly_map, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(image, 1 - alpha, heat, alpha, 0)


def panel(original: np.ndarray, reconstruction: torch.Tensor, anomaly_map: torch.Tensor,
          mask: torch.Tensor | None = None) -> np.ndarray:
    """Side by side at the original's size: input, reconstruction, heatmap over the input.

    original: (H, W, 3) uint8 BGR as read from disk; reconstruction (3, h, w) and anomaly_map (h, w) at the
    model's size; mask (h, w) in {0, 1}, drawn as a green outline on every third of the panel when given.
    """
    height, width = original.shape[:2]
    rec = cv2.resize(to_bgr_u8(reconstruction), (width, height), interpolation=cv2.INTER_LINEAR)
    amap = cv2.resize(anomaly_map.detach().float().cpu().numpy(), (width, height), interpolation=cv2.INTER_LINEAR)
    tiles = [original.copy(), rec, heat_overlay(original, amap)]
    if mask is not None:
        big = cv2.resize(mask.float().cpu().numpy(), (width, height), interpolation=cv2.INTER_LINEAR) > 0.5
        contours, _ = cv2.findContours(big.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        thickness = max(1, round(min(height, width) / 200))
        for tile in tiles:
            cv2.drawContours(tile, contours, -1, (0, 255, 0), thickness)
    return np.concatenate(tiles, axis=1)


def write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"cannot write {path}")
