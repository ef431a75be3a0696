"""Finding anomalies in your own, unlabelled images: streamed scoring with verdicts, defect masks and regions.

Images are decoded, scored and written chunk by chunk (--batch_size), so scores.csv and regions.csv grow
as the run goes and memory does not grow with the number of images; an unreadable file gets a row with
the reason instead of stopping the run. Panels and masks are at each image's own resolution.
"""
import csv
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data_loader import DataError, decode, default_workers, file_digest, list_images, read_each, warn
from model_unet import image_scores
from scoring import thresholds
from scoring.calibration import calibrate, describe, map_statistics
from scoring.detector import Detector, Prediction, Scoring, load
from scoring.model_files import checkpoint_files
from scoring.visualize import panel, write_png
from training.checkpoint import CheckpointError


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


Chunk = tuple[list[tuple[Path, np.ndarray]], torch.Tensor, torch.Tensor | None, list[tuple[Path, str]]]


def scored_chunks(detector: Detector, paths: list[Path], keep_reconstructions: bool = False) -> Iterator[Chunk]:
    """Decode, prepare and score the images chunk by chunk (--batch_size), so memory does not grow with them.
    Each chunk: the readable images at their own resolution (path, image), their anomaly maps (N, h, w) at the
    scoring size, their reconstructions (when kept), and the files skipped, with the reason."""
    scoring, info = detector.scoring, detector.info
    depth, workers = scoring.depth_for(info), scoring.workers or default_workers()
    for start in range(0, len(paths), scoring.batch_size):
        chunk = paths[start:start + scoring.batch_size]
        decoded = read_each(lambda p, _: decode(p, depth), chunk, 0, workers)
        skipped = [(p, d) for p, d in zip(chunk, decoded) if isinstance(d, str)]
        readable = [(p, d) for p, d in zip(chunk, decoded) if not isinstance(d, str)]
        if scoring.tile and scoring.size_for(info) is None:  # each image tiled at its own size
            small = [(p, d) for p, d in readable if d.shape[0] < scoring.tile[0] or d.shape[1] < scoring.tile[1]]
            skipped += [(p, f"{p} ({d.shape[0]}x{d.shape[1]}) is smaller than --tile "
                            f"{scoring.tile[0]}x{scoring.tile[1]}") for p, d in small]
            readable = [pair for pair in readable if pair not in small]
        if skipped:
            yield [], torch.empty(0), None, skipped
        for group in detector.groups(readable):
            maps, recs = detector.score([image for _, image in group], keep_reconstructions)
            yield group, maps, recs, []


def one_model(checkpoint: Path, flag: str) -> Path:
    files = checkpoint_files([checkpoint])
    if len(files) != 1:
        raise CheckpointError(f"{flag} takes exactly one checkpoint; {checkpoint} holds {len(files)}")
    return files[0]


def score_images(checkpoint: Path, images: Path, out_dir: Path, device: torch.device, scoring: Scoring = Scoring()
                 ) -> int:
    """Score an image or a folder of them (recursively); returns how many were scored."""
    detector = load(one_model(checkpoint, "--images"), device, scoring.threshold, scoring.pixel_threshold, scoring)
    paths = image_paths(images)
    print(thresholds.describe(detector.image_threshold, detector.info, "image") + "; "
          + thresholds.describe(detector.pixel_threshold, detector.info, "pixel"))
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
        for scored_images, maps, recs, skipped in scored_chunks(detector, paths, scoring.save_images):
            for image_path, error in skipped:
                warn(f"skipped: {error}")
                errors.append(error)
                scores_csv.writerow({"path": str(image_path), "error": error})
            bar.update(len(skipped))
            if not scored_images:
                continue
            recs = recs if scoring.save_images else [None] * len(scored_images)
            for (image_path, image), score, rec, amap in zip(scored_images, image_scores(maps).tolist(), recs, maps):
                result = detector.decide(image, amap, score)
                row, regions = image_outputs(out_dir / stem_of(image_path), image_path, image, rec, result,
                                             detector.image_threshold.value)
                scores_csv.writerow(row)
                regions_csv.writerows(regions)
                if row["verdict"]:
                    tqdm.write(f"{row['verdict']:7} {score:.4f} {image_path}", file=sys.stdout)
            scored += len(scored_images)
            scores_file.flush()
            regions_file.flush()
            bar.update(len(scored_images))
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
    path = one_model(checkpoint, "--calibrate")
    detector = load(path, device, scoring=scoring)
    paths = image_paths(folder, "--calibrate")
    trained = detector.info.trained_digests
    if trained and (defects := [p for p in paths if file_digest(p) in trained]):
        paths = [p for p in paths if p not in defects]
        warn(f"--calibrate {folder}: left out {len(defects)} defect image(s) the model trained on (first: "
             f"{defects[0]}); calibrating on the other {len(paths)}")
        if not paths:
            raise DataError(f"--calibrate {folder}: holds only defect images the model trained on")
    statistics, skipped = [], []
    for scored_images, maps, _, unreadable in scored_chunks(detector, paths):
        skipped += unreadable
        if scored_images:
            statistics.append(map_statistics(maps))
    for _, reason in skipped[:5]:
        warn(f"skipped: {reason}")
    if not statistics:
        raise DataError(f"--calibrate {folder}: none of the {len(paths)} image(s) could be read ({skipped[0][1]})")
    scores, maxima = (torch.cat(column).numpy() for column in zip(*statistics))
    calibration = calibrate(scores, maxima, rate, f"folder {folder}")
    thresholds.store_calibration(path, calibration)
    for line in describe(calibration):
        print(line)
    print(f"stored in {path}: the deployed thresholds from now on (--threshold auto, exports' metadata, the Python "
          f"API); --threshold max_f1 still judges a test set at its own max F1")
    return calibration


def image_outputs(stem: Path, image_path: Path, image: np.ndarray, rec: torch.Tensor | None, result: Prediction,
                  image_threshold: float | None) -> tuple[dict, list[dict]]:
    """Write one image's defect mask (stem_mask.png) and, with a reconstruction, its panel (stem.png); return its
    CSV rows."""
    row = {"path": str(image_path), "score": f"{result.score:.9g}", "verdict": result.verdict, "regions": "",
           "panel": "", "mask": "", "error": ""}
    mask_path, panel_path = stem.with_name(stem.name + "_mask.png"), stem.with_name(stem.name + ".png")
    if result.defect_mask is not None:
        row["mask"], row["regions"] = str(mask_path), len(result.regions)
        write_png(mask_path, result.defect_mask)
    if rec is not None:
        caption = f"score {result.score:.3f}" + (
            f" | {result.verdict} at threshold {image_threshold:.3f}" if result.verdict else "") + (
            f" | {len(result.regions)} region(s)" if result.defect_mask is not None else "")
        row["panel"] = str(panel_path)
        write_png(panel_path, panel(image, rec, result.anomaly_map, caption=caption, defect_mask=result.defect_mask))
    return row, [{"path": str(image_path), "region": i + 1, **{k: f"{v:.6f}" if isinstance(v, float) else v
                                                                for k, v in region.items()}}
                 for i, region in enumerate(result.regions)]
