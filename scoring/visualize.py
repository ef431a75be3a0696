"""Pictures for people: input | reconstruction | heatmap overlay panels, at the image's own resolution."""
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F


def to_bgr_u8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float [0, 1] BGR tensor -> (H, W, 3) uint8 array."""
    return (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def heat_overlay(image: np.ndarray, anomaly_map: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """JET colour map of a [0, 1] map blended over a uint8 BGR image of the same size."""
    heat = cv2.applyColorMap((np.clip(anomaly_map, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(image, 1 - alpha, heat, alpha, 0)


FONT = cv2.FONT_HERSHEY_SIMPLEX
TILE_TITLES = ("input", "reconstruction", "anomaly map")
HEADER_BG = (40, 40, 40)
GROUND_TRUTH_BGR, PREDICTED_BGR = (0, 255, 0), (255, 255, 255)


def put_text(image: np.ndarray, text: str, x: int, baseline: int, scale: float, max_width: int) -> None:
    """White text, shrunk as needed to fit max_width pixels."""
    width = cv2.getTextSize(text, FONT, scale, 1)[0][0]
    if width > max_width > 0:
        scale *= max_width / width
    cv2.putText(image, text, (x, baseline), FONT, scale, (255, 255, 255), 1, cv2.LINE_AA)


def colour_bar(height: int, scale: float) -> np.ndarray:
    """The JET scale of the heatmap, 1 at the top and 0 at the bottom, with its three tick labels."""
    bar_width, label_width = max(10, round(16 * scale)), round(40 * scale) + 6
    levels = np.linspace(255, 0, height).astype(np.uint8)[:, None].repeat(bar_width, 1)
    bar = np.full((height, bar_width + label_width, 3), HEADER_BG, np.uint8)
    bar[:, :bar_width] = cv2.applyColorMap(levels, cv2.COLORMAP_JET)
    text_height = cv2.getTextSize("0", FONT, scale * 0.8, 1)[0][1]
    for value, baseline in ((1, text_height + 1), (0.5, (height + text_height) // 2), (0, height - 2)):
        put_text(bar, f"{value:g}", bar_width + 3, baseline, scale * 0.8, label_width - 4)
    return bar


def header(tile_width: int, total_width: int, caption: str, scale: float) -> np.ndarray:
    """Two lines above the tiles: each tile's title, then the caption (score, verdict, label)."""
    line = round(26 * scale) + 6
    strip = np.full((2 * line, total_width, 3), HEADER_BG, np.uint8)
    for i, title in enumerate(TILE_TITLES):
        put_text(strip, title, i * tile_width + 4, line - 6, scale, tile_width - 8)
    put_text(strip, caption, 4, 2 * line - 6, scale, total_width - 8)
    return strip


def outline(tile: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> None:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(tile, contours, -1, colour, max(1, round(min(tile.shape[:2]) / 200)))


def panel(original: np.ndarray, reconstruction: torch.Tensor, anomaly_map: torch.Tensor | np.ndarray,
          mask: torch.Tensor | None = None, caption: str = "", defect_mask: np.ndarray | None = None) -> np.ndarray:
    """Input | reconstruction | heatmap over the input, each at the original's size, under a header of
    titles and the caption, with the heatmap's colour bar on the right.

    original: (H, W, 3) uint8 BGR as read from disk; reconstruction (3, h, w) at the model's size;
    anomaly_map (h, w) at the model's size, or (H, W) already resized; mask (h, w) ground truth in {0, 1},
    outlined in green on every tile; defect_mask (H, W), the predicted defects, outlined in white on the heatmap.
    """
    height, width = original.shape[:2]
    rec = cv2.resize(to_bgr_u8(reconstruction), (width, height), interpolation=cv2.INTER_LINEAR)
    amap = anomaly_map if isinstance(anomaly_map, np.ndarray) else anomaly_map.detach().float().cpu().numpy()
    amap = cv2.resize(amap.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    tiles = [original.copy(), rec, heat_overlay(original, amap)]
    if mask is not None:
        big = cv2.resize(mask.float().cpu().numpy(), (width, height), interpolation=cv2.INTER_LINEAR) > 0.5
        for tile in tiles:
            outline(tile, big, GROUND_TRUTH_BGR)
    if defect_mask is not None:
        outline(tiles[2], defect_mask > 0, PREDICTED_BGR)
    scale = float(np.clip(width / 320, 0.35, 1.0))
    body = np.concatenate([*tiles, colour_bar(height, scale)], axis=1)
    return np.concatenate([header(width, body.shape[1], caption, scale), body], axis=0)


def write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"cannot write {path}")


def sample_grid(normal: torch.Tensor, augmented: torch.Tensor, masks: torch.Tensor, title: str,
                per_row: int = 2, real: list[str] | None = None) -> np.ndarray:
    """Training samples as labelled triples (normal | simulated anomaly | its mask; where real says "pasted": the
    good image | a real defect pasted on it | its mask; where it says "own": the real defect twice, as it is and as
    the network sees it, and its mask), per_row triples to a row, under a
    title line: (B, 3, H, W) BGR in [0, 1] images and (B, 1, H, W) masks. Small images are enlarged (nearest
    neighbour) to at least 192 pixels wide so that the labels stay readable."""
    zoom = -(-192 // normal.shape[-1])
    if zoom > 1:
        normal, augmented, masks = (F.interpolate(t.float(), scale_factor=zoom, mode="nearest")
                                    for t in (normal, augmented, masks))
    height, width = normal.shape[-2:]
    scale = float(np.clip(width / 320, 0.35, 1.0))
    line = round(26 * scale) + 6
    cells = []
    for i in range(len(normal)):
        mask = masks[i].expand(3, -1, -1)
        share = masks[i].float().mean().item()
        tiles = [to_bgr_u8(t) for t in (normal[i], augmented[i], mask)]
        kind = real[i] if real else ""
        if kind == "own":
            labels = (f"#{i + 1} real defect", "augmented", f"its mask ({share:.1%})" if share else "image label only")
        elif kind == "pasted":
            labels = (f"#{i + 1} normal", "real defect pasted", f"its mask ({share:.1%})")
        else:
            labels = (f"#{i + 1} normal", "simulated anomaly" if share else "no anomaly drawn", f"mask ({share:.1%})")
        strip = np.full((line, 3 * width, 3), HEADER_BG, np.uint8)
        for j, label in enumerate(labels):
            put_text(strip, label, j * width + 4, line - 8, scale, width - 8)
        cell = np.concatenate([strip, np.concatenate(tiles, axis=1)], axis=0)
        cells.append(cv2.copyMakeBorder(cell, 0, 4, 0, 4, cv2.BORDER_CONSTANT, value=(255, 255, 255)))
    cells += [np.full_like(cells[0], 255)] * (-len(cells) % per_row)
    rows = [np.concatenate(cells[i:i + per_row], axis=1) for i in range(0, len(cells), per_row)]
    body = np.concatenate(rows, axis=0)
    top = np.full((line, body.shape[1], 3), HEADER_BG, np.uint8)
    put_text(top, title, 4, line - 8, scale, body.shape[1] - 8)
    return np.concatenate([top, body], axis=0)
