"""Anomaly maps as files for the benchmarks' own evaluations: single-channel float TIFFs at each image's own size,
laid out as MVTec LOCO AD's evaluation script reads them (--tiff_maps) or as MVTec AD 2's server takes an upload
(--submission). See docs/evaluation.md#benchmark-protocols."""
import struct
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from data_loader import DataError, decode, list_images
from scoring.detector import Detector, Scoring, resize_map, scoring_model, validation_maps
from scoring.model_files import checkpoint_files
from scoring.protocols import segmentation_threshold
from scoring.thresholds import Threshold

MVTEC_AD2_SPLITS = ("test_private", "test_private_mixed")
NO_THRESHOLD = Threshold(None, "none: the maps alone")
# Images per private split and object, as MVTec's upload checker counts them.
MVTEC_AD2_COUNTS = {"can": 321, "fabric": 314, "fruit_jelly": 255, "rice": 277, "sheet_metal": 142, "vial": 276,
                    "wallplugs": 232, "walnuts": 228}


def write_tiff(path: Path, image: np.ndarray) -> None:
    """A single-channel float16 or float32 image as an uncompressed little-endian TIFF (one strip, SampleFormat
    IEEE float): what MVTec's tools read, and OpenCV cannot write in float16."""
    if image.ndim != 2 or image.dtype not in (np.float16, np.float32):
        raise ValueError(f"write_tiff takes a 2-D float16 or float32 array, not {image.dtype} {image.shape}")
    height, width = image.shape
    data = np.ascontiguousarray(image, dtype=image.dtype.newbyteorder("<")).tobytes()
    ifd_offset = 8 + len(data) + len(data) % 2  # the directory starts on a word boundary
    short, long_ = 3, 4
    tags = [(256, long_, width), (257, long_, height), (258, short, image.dtype.itemsize * 8), (259, short, 1),
            (262, short, 1), (273, long_, 8), (277, short, 1), (278, long_, height), (279, long_, len(data)),
            (339, short, 3)]  # width, length, bits, no compression, min-is-black, strip at 8, 1 sample, rows, bytes, float
    directory = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == short else struct.pack("<I", value))
        for tag, kind, value in tags) + struct.pack("<I", 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"II*\x00" + struct.pack("<I", ifd_offset) + data + b"\x00" * (len(data) % 2) + directory)


def image_sized_maps(detector: Detector, paths: list[Path]):
    """(path, anomaly map at the image's own size, float32) for each path, a batch of images decoded at a time."""
    step = detector.scoring.batch_size
    for start in range(0, len(paths), step):
        chunk = paths[start:start + step]
        for path, prediction in zip(chunk, detector.predict(chunk)):
            yield path, prediction.anomaly_map


def write_test_maps(maps: torch.Tensor, paths: list[Path], types: list[str], out: Path, category: str,
                    bit_depth: int) -> int:
    """<out>/<category>/test/<type>/<stem>.tiff for each test image: its map (N, h, w) resized to the image's own
    size, float32; the layout MVTec LOCO AD's evaluation script reads. Returns how many were written."""
    for anomaly_map, path, kind in zip(maps, paths, types):
        height, width = decode(path, bit_depth).shape[:2]
        write_tiff(out / category / "test" / kind / f"{path.stem}.tiff",
                   resize_map(anomaly_map.cpu().numpy(), height, width))
    return len(paths)


def validation_threshold(detector: Detector, category_dir: Path) -> float:
    """MVTec AD 2's segmentation threshold for this model: mean + 3 sigma of validation/good's pixel scores."""
    folder = category_dir / "validation" / "good"
    maps = validation_maps(detector.model, detector.info, folder, detector.device, detector.scoring)
    if maps is None:
        raise DataError(f"{folder}: no images: the submission's threshold is set on MVTec AD 2's validation images")
    return segmentation_threshold(maps)


def write_mvtec_ad2_submission(detector: Detector, category_dir: Path, out: Path) -> dict[str, int]:
    """One object's part of an MVTec AD 2 upload: anomaly_images/<object>/<split>/<stem>.tiff (float16, the image's
    size) and anomaly_images_thresholded/<object>/<split>/<stem>.png (0/255 at the validation threshold) for both
    private test sets. Returns the images found per split (the counts to check the upload against)."""
    obj = category_dir.name
    threshold = validation_threshold(detector, category_dir)
    found = {}
    for split in MVTEC_AD2_SPLITS:
        paths = list_images(category_dir / split)
        if not paths:
            raise DataError(f"{category_dir / split}: no images: prepare MVTec AD 2 again with this version of "
                            f"scripts/prepare_data.py (it keeps the private test sets)")
        for path, anomaly_map in image_sized_maps(detector, paths):
            write_tiff(out / "anomaly_images" / obj / split / f"{path.stem}.tiff", anomaly_map.astype(np.float16))
            png = out / "anomaly_images_thresholded" / obj / split / f"{path.stem}.png"
            png.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(png), np.where(anomaly_map >= threshold, 255, 0).astype(np.uint8))
        found[split] = len(paths)
    print(f"{obj}: {sum(found.values())} maps written ({', '.join(f'{s} {n}' for s, n in found.items())}); "
          f"threshold {threshold:.6g} (validation mean + 3 sigma)")
    return found


def check_submission(out: Path, expected: dict[str, dict[str, int]]) -> list[str]:
    """What is wrong with the upload folder: files per object and split against the images scored (expected) and
    MVTec's published counts, a PNG without its TIFF, or any other folder. Empty when it is ready."""
    allowed = {Path(top) / obj / split for top in ("anomaly_images", "anomaly_images_thresholded")
               for obj in expected for split in MVTEC_AD2_SPLITS}
    problems = [f"{p.relative_to(out)}: not part of an upload" for p in sorted(out.glob("*/*/*"))
                if p.relative_to(out) not in allowed]
    problems += [f"{p.name}: not part of an upload" for p in sorted(out.iterdir())
                 if p.name not in ("anomaly_images", "anomaly_images_thresholded")]
    for obj, splits in sorted(expected.items()):
        for split, count in splits.items():
            tiffs = sorted(p.stem for p in (out / "anomaly_images" / obj / split).glob("*.tiff"))
            pngs = sorted(p.stem for p in (out / "anomaly_images_thresholded" / obj / split).glob("*.png"))
            published = MVTEC_AD2_COUNTS.get(obj)
            if len(tiffs) != count:
                problems.append(f"{obj}/{split}: {len(tiffs)} TIFFs for {count} images")
            if pngs != tiffs:
                problems.append(f"{obj}/{split}: the thresholded PNGs do not match the TIFFs one to one")
            if published is not None and count != published:
                problems.append(f"{obj}/{split}: {count} images, MVTec's checker expects {published}")
    return problems


def write_submission(checkpoints: list[Path], data_path: Path | None, out: Path, device: torch.device,
                     scoring: Scoring) -> bool:
    """An MVTec AD 2 upload folder from a checkpoint per object (each scored on its own object's private test
    sets); True when the checked folder is ready to upload, else the problems are printed."""
    if out.exists() and any(out.iterdir()):
        raise DataError(f"--submission {out}: the folder exists and is not empty: name a new one (nothing was written)")
    expected = {}
    for path in checkpoint_files(checkpoints):
        model, info = scoring_model(path, device, scoring)
        root = data_path or info.config.get("data_path")
        if not root or not info.category:
            raise DataError(f"{path} records no data set or object: pass --data_path")
        detector = Detector(model, info, device, scoring, NO_THRESHOLD, NO_THRESHOLD)
        expected[info.category] = write_mvtec_ad2_submission(detector, Path(root) / info.category, out)
    problems = check_submission(out, expected)
    for problem in problems:
        print(f"not ready: {problem}", file=sys.stderr)
    if not problems:
        print(f"ready to upload: {out} ({len(expected)} object(s): {', '.join(sorted(expected))})")
    return not problems
