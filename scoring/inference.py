"""Finding anomalies in your own, unlabelled images: streamed scoring with verdicts, defect masks and regions.

Images are decoded, scored and written chunk by chunk (--batch_size), so scores.csv and regions.csv grow
as the run goes and memory does not grow with the number of images; an unreadable file gets a row with
the reason instead of stopping the run. Panels and masks are at each image's own resolution.
"""
import csv
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from data_loader import DataError, decode, default_workers, list_images, read_each, resize, to_tensor, warn
from deploy.model_files import checkpoint_files, load_model, store_calibration
from model_unet import image_scores
from scoring.calibration import calibrate, describe
from scoring.evaluate import predict
from scoring.metrics import verdict
from scoring.tiling import TiledModel
from scoring.visualize import panel, write_png
from training.checkpoint import CheckpointError, ModelInfo


@dataclass(frozen=True)
class Scoring:
    """How images become model input, shared by every way of scoring: size, bit depth, tiles, batch."""
    image_size: tuple[int, int] | None = None  # None: the model's size; with a tile, each image's own size
    bit_depth: int | None = None  # None: the depth the checkpoint records
    tile: tuple[int, int] | None = None
    tile_overlap: float = 0  # pixels, or a fraction of the tile below 1
    batch_size: int = 16  # images per forward pass; tiles per pass when tiled
    workers: int | None = None
    amp: str = "off"  # bf16: PyTorch networks under autocast (exported files run at their own precision)

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


def images_per_pass(scoring: Scoring) -> int:
    return 1 if scoring.tile else scoring.batch_size  # tiled: one image at a time, its tiles in batches


def chosen_threshold(value: str | float | None, info: ModelInfo, kind: str, flag: str) -> float | None:
    """A number as given; auto (and the default) from the checkpoint; auto without a stored one is an error."""
    if value is not None and value != "auto":
        return value
    stored = info.threshold(kind)
    if value == "auto" and stored is None:
        raise CheckpointError(f"{flag} auto: {info.run} holds no {kind} threshold: calibrate one on good images "
                              f"(--calibrate GOOD_DIR), score a labelled test set and pass its threshold from "
                              f"results.json, or give a number")
    return stored


def describe_threshold(value: float | None, given: str | float | None, info: ModelInfo, kind: str, flag: str) -> str:
    if value is None:
        return f"{kind} threshold: none ({flag})"
    if given is not None and given != "auto":
        return f"{kind} threshold: {value} ({flag})"
    line = f"{kind} threshold: {value} ({info.threshold_source(kind)})"
    calibrated = info.calibration.get(kind, {}).get("threshold")
    if calibrated is not None and f"{calibrated:.6g}" != f"{value:.6g}":
        line += f"; the calibrated one, {calibrated:.6g}, is also stored: {flag} {calibrated:.9g} uses it"
    return line


def image_paths(images: Path, flag: str = "--images") -> list[Path]:
    if images.is_dir():
        paths = list_images(images, recursive=True)
    elif images.is_file():
        paths = [images]
    else:
        raise DataError(f"{flag} {images} does not exist")
    if not paths:
        raise DataError(f"{flag} {images} holds no images")
    return paths


@dataclass
class ScoredChunk:
    images: list[tuple[Path, np.ndarray]]  # readable images at their own resolution
    maps: torch.Tensor  # (N, h, w) anomaly maps at the scoring size
    reconstructions: torch.Tensor | None
    skipped: list[tuple[Path, str]]  # unreadable or unusable files, with the reason


def scored_chunks(model, info: ModelInfo, paths: list[Path], device: torch.device, scoring: Scoring,
                  keep_reconstructions: bool = False) -> Iterator[ScoredChunk]:
    """Decode, prepare and score the images chunk by chunk (--batch_size), so memory does not grow with them."""
    size, depth, workers = scoring.size_for(info), scoring.depth_for(info), scoring.workers or default_workers()
    for start in range(0, len(paths), scoring.batch_size):
        chunk = paths[start:start + scoring.batch_size]
        decoded = read_each(lambda p, _: decode(p, depth), chunk, 0, workers)
        skipped = [(p, d) for p, d in zip(chunk, decoded) if isinstance(d, str)]
        readable = [(p, d) for p, d in zip(chunk, decoded) if not isinstance(d, str)]
        if scoring.tile and size is None:  # each image tiled at its own size, one at a time
            small = [(p, d) for p, d in readable if d.shape[0] < scoring.tile[0] or d.shape[1] < scoring.tile[1]]
            skipped += [(p, f"{p} ({d.shape[0]}x{d.shape[1]}) is smaller than --tile "
                            f"{scoring.tile[0]}x{scoring.tile[1]}") for p, d in small]
            groups = [[pair] for pair in readable if pair not in small]
        else:
            groups = [readable] if readable else []
        if skipped:
            yield ScoredChunk([], torch.empty(0), None, skipped)
        for group in groups:
            batch = to_tensor([resize(image, size) if size else image for _, image in group])
            maps, recs = predict(model, batch, device, info.channel_order, images_per_pass(scoring),
                                 keep_reconstructions, scoring.amp)
            yield ScoredChunk(group, maps, recs, [])


def score_images(checkpoint: Path, images: Path, out_dir: Path, device: torch.device,
                 threshold: str | float | None = None, pixel_threshold: str | float | None = None,
                 scoring: Scoring = Scoring(), save_images: bool = True) -> int:
    """Score an image or a folder of them (recursively); returns how many were scored."""
    files = checkpoint_files([checkpoint])
    if len(files) != 1:
        raise CheckpointError(f"--images takes exactly one checkpoint; {checkpoint} holds {len(files)}")
    model, info = scoring_model(files[0], device, scoring)
    image_threshold = chosen_threshold(threshold, info, "image", "--threshold")
    pixel_value = chosen_threshold(pixel_threshold, info, "pixel", "--pixel_threshold")
    paths = image_paths(images)
    print(describe_threshold(image_threshold, threshold, info, "image", "--threshold") + "; "
          + describe_threshold(pixel_value, pixel_threshold, info, "pixel", "--pixel_threshold"))
    stem_of = (lambda p: p.relative_to(images).with_suffix("")) if images.is_dir() else (lambda p: Path(p.stem))
    out_dir.mkdir(parents=True, exist_ok=True)
    scored, errors, started = 0, [], time.perf_counter()
    with open(out_dir / "scores.csv", "w", newline="") as scores_file, \
            open(out_dir / "regions.csv", "w", newline="") as regions_file, \
            tqdm(total=len(paths), unit="img", disable=not sys.stderr.isatty()) as bar:
        scores_csv = csv.DictWriter(scores_file, ["path", "score", "verdict", "regions", "panel", "mask", "error"])
        regions_csv = csv.DictWriter(regions_file, ["path", "region", "x", "y", "width", "height", "area",
                                                    "max_score", "mean_score"])
        scores_csv.writeheader()
        regions_csv.writeheader()
        for chunk in scored_chunks(model, info, paths, device, scoring, keep_reconstructions=True):
            for image_path, error in chunk.skipped:
                warn(f"skipped: {error}")
                errors.append(error)
                scores_csv.writerow({"path": str(image_path), "error": error})
            bar.update(len(chunk.skipped))
            if not chunk.images:
                continue
            for (image_path, image), score, rec, amap in zip(chunk.images, image_scores(chunk.maps).tolist(),
                                                             chunk.reconstructions, chunk.maps):
                row, regions = image_outputs(out_dir / stem_of(image_path), image_path, image, rec, amap, score,
                                             image_threshold, pixel_value, save_images)
                scores_csv.writerow(row)
                regions_csv.writerows(regions)
                if row["verdict"]:
                    tqdm.write(f"{row['verdict']:7} {score:.4f} {image_path}", file=sys.stdout)
            scored += len(chunk.images)
            scores_file.flush()
            regions_file.flush()
            bar.update(len(chunk.images))
    if scored == 0:
        raise DataError(f"--images {images}: none of the {len(paths)} image(s) could be read or scored ({errors[0]})")
    seconds = time.perf_counter() - started
    print(f"scored {scored} image(s) in {seconds:.1f} s ({scored / seconds:.1f} images/s)"
          + (f", skipped {len(errors)} unreadable" if errors else "")
          + f": {out_dir / 'scores.csv'}, {out_dir / 'regions.csv'}, panels and masks under {out_dir}")
    return scored


def calibrate_on_folder(checkpoint: Path, folder: Path, rate: float, device: torch.device,
                        scoring: Scoring = Scoring()) -> dict:
    """Score a folder of good images (streamed), set thresholds for the false-alarm budget, store them with
    the model (the .pt or .onnx file, rewritten atomically) and print what they do."""
    files = checkpoint_files([checkpoint])
    if len(files) != 1:
        raise CheckpointError(f"--calibrate takes exactly one checkpoint; {checkpoint} holds {len(files)}")
    model, info = scoring_model(files[0], device, scoring)
    paths = image_paths(folder, "--calibrate")
    scores, maxima, skipped = [], [], []
    for chunk in scored_chunks(model, info, paths, device, scoring):
        skipped += chunk.skipped
        if chunk.images:
            scores.append(image_scores(chunk.maps).cpu())
            maxima.append(chunk.maps.flatten(1).amax(1).cpu())
    for _, reason in skipped[:5]:
        warn(f"skipped: {reason}")
    if not scores:
        raise DataError(f"--calibrate {folder}: none of the {len(paths)} image(s) could be read ({skipped[0][1]})")
    calibration = calibrate(torch.cat(scores).numpy(), torch.cat(maxima).numpy(), rate, f"folder {folder}")
    store_calibration(files[0], calibration)
    for line in describe(calibration):
        print(line)
    print(f"stored in {files[0]}; --threshold auto uses these where no labelled test set's thresholds are stored")
    return calibration
def image_outputs(stem: Path, image_path: Path, image: np.ndarray, rec: torch.Tensor, amap: torch.Tensor,
                  score: float, image_threshold: float | None, pixel_threshold: float | None,
                  save_images: bool) -> tuple[dict, list[dict]]:
    """Write one image's panel (stem.png) and defect mask (stem_mask.png); return its CSV rows."""
    height, width = image.shape[:2]
    big_map = resize_map(amap.cpu().numpy(), height, width)
    decision = verdict(score, image_threshold)
    row = {"path": str(image_path), "score": f"{score:.9g}", "verdict": decision, "regions": "", "panel": "",
           "mask": "", "error": ""}
    mask, regions = (None, [])
    mask_path, panel_path = stem.with_name(stem.name + "_mask.png"), stem.with_name(stem.name + ".png")
    if pixel_threshold is not None:
        mask, regions = defect_regions(big_map, pixel_threshold)
        row["mask"], row["regions"] = str(mask_path), len(regions)
        write_png(mask_path, mask)
    if save_images:
        caption = f"score {score:.3f}" + (f" | {decision} at threshold {image_threshold:.3f}" if decision else "") + (
            f" | {len(regions)} region(s)" if pixel_threshold is not None else "")
        row["panel"] = str(panel_path)
        write_png(panel_path, panel(image, rec, big_map, caption=caption, defect_mask=mask))
    return row, [{"path": str(image_path), "region": i + 1, **{k: f"{v:.6f}" if isinstance(v, float) else v
                                                                for k, v in region.items()}}
                 for i, region in enumerate(regions)]


# ---- from an anomaly map to decisions at the image's own resolution ---------------------------------------

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
