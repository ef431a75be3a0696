"""From an anomaly map to decisions at the image's own resolution: a binary defect mask and its regions."""
import cv2
import numpy as np


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
