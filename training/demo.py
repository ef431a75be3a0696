"""The embedded demo: a small MVTec-layout dataset of procedural textures with drawn defects.

``python train_draem.py --demo`` builds ./datasets/demo once (nothing to download), trains a small
model on it (about two minutes on 2 CPU cores), then scores it and writes the report (train_draem.py).
"""
from pathlib import Path

import cv2
import numpy as np

DEMO_ROOT = Path("datasets/demo")
DEMO_CATEGORY = "weave"
DEFECTS = ("scratch", "hole", "stain")
SIZE = 160  # px; the demo trains at 128 (train_draem.py DEMO)


def texture(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A woven-looking BGR texture: two crossed gratings, slight jitter in phase, colour and noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    period = 12.0
    phase = rng.uniform(0, 2 * np.pi, 2)
    weave = 0.5 + 0.25 * np.sin(2 * np.pi * x / period + phase[0]) * np.sign(np.sin(2 * np.pi * y / (2 * period)))
    weave += 0.15 * np.sin(2 * np.pi * y / period + phase[1])
    weave += rng.normal(0, 0.03, (size, size))
    tint = np.array([0.55, 0.7, 0.8]) + rng.uniform(-0.03, 0.03, 3)
    return (np.clip(weave[..., None] * tint * 1.3, 0, 1) * 255).astype(np.uint8)


def draw_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Draw one defect into image (in place); return its 0/255 mask, drawn with the same shapes."""
    mask = np.zeros(image.shape[:2], np.uint8)
    size = image.shape[0]
    centre = tuple(int(v) for v in rng.integers(size // 5, size - size // 5, 2))
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(0.25, 0.45) * size
        d = np.array([np.cos(angle), np.sin(angle)]) * length / 2
        p1 = tuple(int(v) for v in np.array(centre) - d)
        p2 = tuple(int(v) for v in np.array(centre) + d)
        thickness = int(rng.integers(2, 4))
        cv2.line(image, p1, p2, (235, 235, 235), thickness)
        cv2.line(mask, p1, p2, 255, thickness)
    elif kind == "hole":
        radius = int(rng.integers(size // 20, size // 10))
        cv2.circle(image, centre, radius, (25, 20, 20), -1)
        cv2.circle(mask, centre, radius, 255, -1)
    else:
        axes = (int(rng.integers(size // 12, size // 6)), int(rng.integers(size // 16, size // 10)))
        angle = float(rng.uniform(0, 180))
        cv2.ellipse(image, centre, axes, angle, 0, 360, (40, 90, 170), -1)
        cv2.ellipse(mask, centre, axes, angle, 0, 360, 255, -1)
    return mask


def source_texture(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """Colourful blotches and stripes: stand-ins for DTD anomaly-source textures."""
    image = np.zeros((size, size, 3), np.uint8)
    image[:] = rng.integers(0, 256, 3)
    for _ in range(12):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            cv2.circle(image, tuple(int(v) for v in rng.integers(0, size, 2)), int(rng.integers(4, size // 4)), colour, -1)
        else:
            cv2.line(image, tuple(int(v) for v in rng.integers(0, size, 2)), tuple(int(v) for v in rng.integers(0, size, 2)),
                     colour, int(rng.integers(2, 10)))
    return cv2.GaussianBlur(image, (3, 3), 0)


def make_demo_dataset(root: Path = DEMO_ROOT, train: int = 64, test_good: int = 16, per_defect: int = 8,
                      sources: int = 40, seed: int = 0) -> Path:
    """Write the dataset under root (skipped when it is already complete); return root."""
    done = root / ".complete"
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    category = root / DEMO_CATEGORY

    def save(path: Path, image: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), image)

    for i in range(train):
        save(category / "train" / "good" / f"{i:03d}.png", texture(rng))
    for i in range(test_good):
        save(category / "test" / "good" / f"{i:03d}.png", texture(rng))
    for kind in DEFECTS:
        for i in range(per_defect):
            image = texture(rng)
            mask = draw_defect(image, kind, rng)
            save(category / "test" / kind / f"{i:03d}.png", image)
            save(category / "ground_truth" / kind / f"{i:03d}_mask.png", mask)
    for i in range(sources):
        save(root / "sources" / f"{i:03d}.png", source_texture(rng))
    done.write_text("ok\n")
    return root
