"""Simulated training samples per second: this project's batched, on-device perlin.py against a
straightforward per-sample NumPy/OpenCV pipeline written the way the official loader works (for each
sample: decode and resize the normal image and a random anomaly source from disk, rotate, augment
with 3 of the 10 augmenters, draw Perlin noise, threshold, blend).

    python benchmarks/bench_synthesis.py                       # ../shared/data if present, else the demo data
    python benchmarks/bench_synthesis.py --data_path D --category C --anomaly_source_path S --device cuda
"""
import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_loader import list_images, load_anomaly_sources, load_images, train_image_paths  # noqa: E402
from perlin import simulate_anomalies  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


# ---- the per-sample reference pipeline (NumPy / OpenCV, one sample at a time) ---------------------------

def np_perlin(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    delta = (res[0] / shape[0], res[1] / shape[1])
    cells = (shape[0] // res[0], shape[1] // res[1])
    grid = np.mgrid[0:res[0]:delta[0], 0:res[1]:delta[1]].transpose(1, 2, 0) % 1
    angles = 2 * np.pi * rng.random((res[0] + 1, res[1] + 1))
    gradients = np.dstack((np.cos(angles), np.sin(angles)))
    tile = lambda y0, y1, x0, x1: np.repeat(np.repeat(gradients[y0:y1, x0:x1], cells[0], 0), cells[1], 1)
    dot = lambda g, sy, sx: (np.dstack((grid[..., 0] + sy, grid[..., 1] + sx)) * g).sum(2)
    n00 = dot(tile(0, -1, 0, -1), 0, 0)
    n10 = dot(tile(1, None, 0, -1), -1, 0)
    n01 = dot(tile(0, -1, 1, None), 0, -1)
    n11 = dot(tile(1, None, 1, None), -1, -1)
    t = 6 * grid ** 5 - 15 * grid ** 4 + 10 * grid ** 3
    top = n00 + t[..., 0] * (n10 - n00)
    bottom = n01 + t[..., 0] * (n11 - n01)
    return math.sqrt(2) * (top + t[..., 1] * (bottom - top))


def np_rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    return cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)


def np_augmenters(rng: np.random.Generator):
    lut = lambda f: (lambda x: cv2.LUT(x, np.clip(f(np.arange(256, dtype=np.float32)), 0, 255).astype(np.uint8)))

    def hue_saturation(x):
        hsv = cv2.cvtColor(x, cv2.COLOR_BGR2HSV).astype(np.int16)
        hsv[..., 0] = (hsv[..., 0] + int(rng.uniform(-50, 50) * 180 / 255)) % 180
        hsv[..., 1] = np.clip(hsv[..., 1] + int(rng.uniform(-50, 50)), 0, 255)
        return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)

    def autocontrast(x):
        cut = rng.uniform(0, 20)
        lo, hi = np.percentile(x, [cut, 100 - cut], axis=(0, 1))
        return np.clip((x - lo) * 255 / np.maximum(hi - lo, 1), 0, 255).astype(np.uint8)

    def brightness(x):
        ycc = cv2.cvtColor(x, cv2.COLOR_BGR2YCrCb).astype(np.float32)
        ycc[..., 0] = ycc[..., 0] * rng.uniform(0.8, 1.2) + rng.uniform(-30, 30)
        return cv2.cvtColor(np.clip(ycc, 0, 255).astype(np.uint8), cv2.COLOR_YCrCb2BGR)

    def sharpness(x):
        blurred = cv2.filter2D(x, -1, np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13)
        f = rng.uniform(0, 2)
        return np.clip(blurred + f * (x.astype(np.float32) - blurred), 0, 255).astype(np.uint8)

    return [
        lambda x: np.stack([lut(lambda v: 255 * (v / 255) ** rng.uniform(0.5, 2))(x[..., c]) for c in range(3)], 2),
        brightness, sharpness, hue_saturation,
        lambda x: np.where((x >= rng.uniform(32, 128)) & (rng.random() < 0.5), 255 - x, x).astype(np.uint8),
        lambda x: x & np.uint8((255 << (8 - int(rng.integers(1, 9)))) & 255),
        lambda x: 255 - x,
        autocontrast,
        lambda x: np.stack([cv2.equalizeHist(x[..., c]) for c in range(3)], 2),
        lambda x: np_rotate(x, rng.uniform(-45, 45)),
    ]


def np_sample(normal_paths, source_paths, size: int, rng: np.random.Generator):
    image = cv2.resize(cv2.imread(str(normal_paths[rng.integers(len(normal_paths))])), (size, size))
    if rng.random() < 0.3:
        image = np_rotate(image, rng.uniform(-90, 90))
    image = image.astype(np.float32) / 255
    source = cv2.resize(cv2.imread(str(source_paths[rng.integers(len(source_paths))])), (size, size))
    augmenters = np_augmenters(rng)
    for index in rng.permutation(len(augmenters))[:3]:
        source = augmenters[index](source)
    noise = np_perlin((size, size), (2 ** int(rng.integers(0, 6)), 2 ** int(rng.integers(0, 6))), rng)
    mask = (np_rotate(noise.astype(np.float32), rng.uniform(-90, 90)) > 0.5).astype(np.float32)[..., None]
    beta = rng.uniform(0, 0.8)
    source = source.astype(np.float32) / 255
    augmented = image * (1 - mask) + (1 - beta) * source * mask + beta * image * mask
    if rng.random() < 0.5:  # like the official loader, the anomaly-free coin is tossed after all the work
        return image, np.zeros((size, size, 1), np.float32), 0.0
    return augmented, mask, float(mask.any())


# ---- timing ----------------------------------------------------------------------------------------------

def median_rate(fn, samples_per_call: int, repeats: int, sync=lambda: None) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return samples_per_call / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", type=Path)
    p.add_argument("--category", default="mtd")
    p.add_argument("--anomaly_source_path", type=Path)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--bs", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if args.data_path is None:
        if (SHARED / "mtd").is_dir():
            args.data_path, args.anomaly_source_path = SHARED, SHARED / "dtd" / "images"
        else:
            from training.demo import DEMO_CATEGORY, make_demo_dataset
            args.data_path, args.category = make_demo_dataset(), DEMO_CATEGORY
            args.anomaly_source_path = args.data_path / "sources"
    normal_paths = list_images(args.data_path / args.category / "train" / "good")
    source_paths = list_images(args.anomaly_source_path, recursive=True)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    rng = np.random.default_rng(0)
    random.seed(0)
    per_sample = median_rate(lambda: [np_sample(normal_paths, source_paths, args.size, rng) for _ in range(args.bs)],
                             args.bs, max(3, args.repeats // 4))
    started = time.perf_counter()
    images = load_images(train_image_paths(args.data_path, args.category), args.size).to(device)
    sources = load_anomaly_sources(args.anomaly_source_path, args.size).to(device)
    cache_seconds = time.perf_counter() - started
    g = torch.Generator(device).manual_seed(0)
    index = lambda: torch.randint(0, len(images), (args.bs,), generator=g, device=device)
    batched = median_rate(lambda: simulate_anomalies(images[index()], sources, "official", g), args.bs, args.repeats, sync)
    result = {"device": str(device), "torch_threads": torch.get_num_threads(), "size": args.size, "bs": args.bs,
              "data": f"{args.data_path / args.category} ({len(normal_paths)} images), {len(source_paths)} sources",
              "per_sample_numpy_samples_per_s": round(per_sample, 1), "batched_samples_per_s": round(batched, 1),
              "speedup": round(batched / per_sample, 1), "one_time_cache_seconds": round(cache_seconds, 1)}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
