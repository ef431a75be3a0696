"""What both standalone examples share, with numpy and OpenCV alone: an image prepared as test_draem.py
prepares it, and what an inspection screen shows (verdict, heatmap overlay, defect mask at the image's size).
Copy it beside the example you deploy."""
from pathlib import Path

import cv2
import numpy as np


def prepare(path: str, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """The file as a uint8 BGR image at its own size, and as the graph's input batch (1, 3, H, W) in [0, 1]."""
    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise SystemExit(f"error: cannot read image {path}")
    if image.dtype == np.uint16:  # 16-bit file of bit_depth-bit data: its top 8 bits
        image = np.minimum(image >> (int(meta.get("bit_depth", 16)) - 8), 255).astype(np.uint8)
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)  # grayscale: three equal channels
    elif image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)  # drop alpha; OpenCV keeps BGR order
    height, width = map(int, meta["image_size"].split("x"))
    resized = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    return image, resized.transpose(2, 0, 1)[None].astype(np.float32) / 255


def report(path: str, meta: dict, image: np.ndarray, anomaly_map: np.ndarray, score: float,
           out_dir: str | None) -> None:
    """Print the score and verdict at the file's image threshold; with out_dir, write <stem>_overlay.png (the
    heatmap over the image, defect outlines in white) and <stem>_mask.png (255 where the map, resized to the
    image, reaches the file's pixel threshold)."""
    threshold = float(meta.get("image_threshold", "nan"))
    verdict = "no threshold" if np.isnan(threshold) else "ANOMALY" if score >= threshold else "OK"
    print(f"score {score:.9g} {verdict} (threshold {threshold:g}); map max {anomaly_map.max():.4f}")
    if out_dir is None:
        return
    big = cv2.resize(anomaly_map.astype(np.float32), image.shape[1::-1], interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap((np.clip(big, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    overlay = cv2.addWeighted(image, 0.5, heat, 0.5, 0)
    stem = Path(out_dir) / Path(path).stem
    stem.parent.mkdir(parents=True, exist_ok=True)
    pixel_threshold = float(meta.get("pixel_threshold", "nan"))
    if not np.isnan(pixel_threshold):
        mask = (big >= pixel_threshold).astype(np.uint8) * 255
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(overlay, contours, -1, (255, 255, 255), 1)
        cv2.imwrite(f"{stem}_mask.png", mask)
    cv2.imwrite(f"{stem}_overlay.png", overlay)
