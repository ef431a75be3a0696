"""Reading datasets in the MVTec AD layout and anomaly-source folders into in-memory uint8 tensors.

Layout: <data_path>/<category>/train/good/*, <data_path>/<category>/test/<good|defect>/*,
<data_path>/<category>/ground_truth/<defect>/<stem>_mask.png, optionally <category>/validation/good/* (good
images to calibrate thresholds on) and <category>/train/<defect>/* (real defects to learn from, masks in
ground_truth/<defect>/ too); or <data_path>/<category>.json naming folders anywhere (Layout). Every image file is decoded once per run
(in parallel threads: OpenCV releases the GIL), resized and kept as a (N, 3, H, W) uint8 BGR tensor,
the channel order of the official code and its checkpoints.
"""
import argparse
import hashlib
import json
import os
import sys
from functools import partial
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor

# The official --obj_id order (0..14).
CATEGORIES = ["capsule", "bottle", "carpet", "leather", "pill", "transistor", "tile", "cable", "zipper",
              "toothbrush", "metal_nut", "hazelnut", "screw", "grid", "wood"]
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
CHANNEL_ORDER = "BGR"
# Bits per sample a camera may store in a 16-bit file (12-bit data: values 0..4095); 16 is full range.
BIT_DEPTHS = (8, 10, 12, 14, 16)
FULL_RANGE = 16  # what 16-bit files are read as when no depth is known (official weights, anomaly sources)

class DataError(ValueError):
    """A dataset problem the scripts report as one line (no traceback)."""


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in Path(folder).glob(pattern) if is_image(p))


def to_bgr8(image: np.ndarray, bit_depth: int = FULL_RANGE) -> np.ndarray:
    """Any decoded image (gray, BGR, BGRA; 8 or 16 bit, or float) as 3-channel uint8 BGR.

    16-bit files hold bit_depth-bit data: its top 8 bits are kept (a right shift by bit_depth - 8, so
    full-range 16-bit data is shifted by 8); values above the depth saturate at 255. 8-bit files are unchanged.
    """
    if image.dtype == np.uint16:
        image = np.minimum(image >> (bit_depth - 8), 255).astype(np.uint8)
    elif image.dtype != np.uint8:
        image = np.clip(image.astype(np.float32) * (255.0 if image.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.shape[2] == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    return image


def read_raw(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise DataError(f"cannot decode image {path}")
    return image


_reported_depths: set[int] = set()


def decode(path: Path, bit_depth: int = FULL_RANGE) -> np.ndarray:
    """(H, W, 3) uint8 BGR at the file's own size; a 16-bit file above bit_depth is reported (once per depth)."""
    image = read_raw(path)
    if image.dtype == np.uint16 and bit_depth < 16 and bit_depth not in _reported_depths:
        if (peak := int(image.max())) >= 1 << bit_depth:
            _reported_depths.add(bit_depth)
            warn(f"{path} holds values up to {peak}, above the {bit_depth}-bit range (0..{(1 << bit_depth) - 1}) "
                 f"the model reads: they saturate (set --bit_depth; further such images are not reported)")
    return to_bgr8(image, bit_depth)


def file_bit_depth(path: Path, size: object = None) -> int:
    """The smallest of BIT_DEPTHS that holds the file's largest value (8 for 8-bit files, without decoding PNGs)."""
    if path.suffix.lower() == ".png":
        with open(path, "rb") as f:
            header = f.read(25)
        if len(header) == 25 and header[24] <= 8:  # IHDR bit depth
            return 8
    elif path.suffix.lower() in {".jpg", ".jpeg", ".bmp"}:
        return 8
    image = read_raw(path)
    if image.dtype != np.uint16:
        return 8
    peak = int(image.max())
    return next(d for d in BIT_DEPTHS if peak < 1 << d)


def detect_bit_depth(paths: list[Path], workers: int | None = None) -> int:
    """--bit_depth auto: the depth of the deepest training image (16-bit data up to 4095 is 12-bit, ...).
    Unreadable files count as 8-bit here: reading the images reports them all."""
    depths = read_each(file_bit_depth, paths, None, workers or default_workers())
    return max([d for d in depths if isinstance(d, int)], default=8)


def parse_bit_depth(text: str) -> int | str:
    """argparse type for --bit_depth: auto or one of BIT_DEPTHS."""
    if text == "auto" or (text.isdigit() and int(text) in BIT_DEPTHS):
        return text if text == "auto" else int(text)
    raise argparse.ArgumentTypeError(f"expected auto or one of {', '.join(map(str, BIT_DEPTHS))} (bits per sample "
                                     f"in 16-bit files), not {text!r}")


Size = int | tuple[int, int] | list[int]  # a side (square) or (height, width)


def height_width(size: Size) -> tuple[int, int]:
    """(height, width) of a size given as one side (square) or as a pair."""
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def parse_size(text: str) -> tuple[int, int]:
    """argparse type for --image_size / --train_crop: N (square) or HxW, each side a positive multiple of 32."""
    parts = text.lower().split("x")
    if len(parts) in (1, 2) and all(p.isdigit() for p in parts):
        height, width = height_width([int(p) for p in parts] * (3 - len(parts)))
        if height >= 32 and width >= 32 and height % 32 == 0 and width % 32 == 0:
            return height, width
    raise argparse.ArgumentTypeError(f"expected N or HxW (height x width), each side a positive multiple of 32 "
                                     f"(the networks pool five times), not {text!r}")


def resize(image: np.ndarray, size: Size) -> np.ndarray:
    """Bilinear resize to size (height, width), as the official code resizes images and masks."""
    height, width = height_width(size)
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


def read_image(path: Path, size: Size, bit_depth: int = FULL_RANGE) -> np.ndarray:
    """(H, W, 3) uint8 BGR at size, resized bilinearly as in the official code."""
    return resize(decode(path, bit_depth), size)


def read_test_pair(pair: tuple[Path, Path | None], size: Size | None, bit_depth: int = FULL_RANGE
                   ) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """A test image and its mask (None for good images), both resized bilinearly to size (None: the image's
    own size), and notes on masks that needed fixing: of another size than their image, or not binary."""
    image_path, mask_path = pair
    image = decode(image_path, bit_depth)
    size = size or image.shape[:2]
    resized = resize(image, size)
    if mask_path is None:
        return resized, None, []
    mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise DataError(f"cannot decode mask {mask_path}")
    notes = []
    if mask.shape != image.shape[:2]:
        notes.append(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]}, its image "
                     f"{image.shape[1]}x{image.shape[0]}: resized")
    if not np.isin(mask, (0, 255)).all():
        notes.append(f"mask {mask_path} is not binary (0/255): thresholded by --mask_protocol")
    # Kept 0..255 after bilinear resizing; the evaluation protocol binarises it.
    return resized, resize(mask, size), notes


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


def read_each(reader, items: list, size: Size, workers: int) -> list:
    """reader(item, size) for every item in parallel threads; an unreadable item gives its error message (str)."""
    def safe(item):
        try:
            return reader(item, size)
        except (DataError, cv2.error) as exc:
            return str(exc).splitlines()[0] if isinstance(exc, DataError) else f"cannot decode {item}"

    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # parallel over files instead: OpenCV's own threads would oversubscribe the cores
    try:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            return list(pool.map(safe, items))
    finally:
        cv2.setNumThreads(threads)


def parallel_read(reader, items: list, size: Size, workers: int) -> list:
    """read_each, reporting every unreadable file in one error, not just the first."""
    results = read_each(reader, items, size, workers)
    bad = [r for r in results if isinstance(r, str)]
    if bad:
        raise DataError(f"{len(bad)} unreadable file(s): " + "; ".join(bad))
    return results


def load_images(paths: list[Path], size: Size, workers: int | None = None, bit_depth: int = FULL_RANGE) -> Tensor:
    """(N, 3, H, W) uint8 BGR tensor at size."""
    return to_tensor(parallel_read(partial(read_image, bit_depth=bit_depth), paths, size, workers or default_workers()))


def to_tensor(images: list[np.ndarray]) -> Tensor:
    """(H, W, 3) uint8 arrays -> one (N, 3, H, W) uint8 tensor."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


# ---- where a category's images are -----------------------------------------------------------------

# The keys of a category described by <data_path>/<category>.json (folders, relative to the file or absolute).
DESCRIPTION_KEYS = {"train": "good training images (required)", "test_good": "good test images",
                    "test_defect": "defect test images: a folder, or a list of folders (each a defect type)",
                    "masks": "masks of the defect images, matched by file stem (<stem>_mask.* or <stem>.*): a "
                             "folder, or a list of folders, one per test_defect folder",
                    "validation": "good images the thresholds are calibrated on",
                    "train_defect": "real defect images to train on: a folder, or a list of folders (each a defect type)",
                    "train_masks": "masks of the train_defect images, as masks for test_defect (images without one "
                                   "are image-level labels)"}


@dataclass(frozen=True)
class Layout:
    """Where one category's images are, in either form a category takes: a folder in the MVTec AD layout
    (<data_path>/<category>/), or a JSON file naming folders anywhere (<data_path>/<category>.json)."""
    category: str
    train: Path
    test: dict[str, Path]  # a folder per test type; "good" holds the defect-free ones
    masks: dict[str, Path]  # per defect type, the folder of its masks
    validation: Path | None  # good images shipped for calibrating thresholds (MVTec AD 2, MVTec LOCO)
    origin: str  # what the paths came from, for messages
    train_defects: dict[str, Path] = field(default_factory=dict)  # real defects to train on, a folder per type
    train_masks: dict[str, Path] = field(default_factory=dict)  # per defect type, the folder of their masks


def mvtec_layout(root: Path) -> Layout:
    test = root / "test"
    types = {d.name: d for d in sorted(test.iterdir()) if d.is_dir()} if test.is_dir() else {}
    validation = root / "validation" / "good"
    train = root / "train"
    defects = {d.name: d for d in sorted(train.iterdir()) if d.is_dir() and d.name != "good"} if train.is_dir() else {}
    return Layout(root.name, train / "good", types, {t: root / "ground_truth" / t for t in types if t != "good"},
                  validation if list_images(validation) else None, str(root),
                  defects, {t: root / "ground_truth" / t for t in defects})


def described_layout(path: Path) -> Layout:
    """A category of folders: {"train": DIR, "test_good": DIR, "test_defect": DIR or [DIR, ...], "masks": DIR or
    [DIR, ...], "validation": DIR}, only "train" required; a defect folder's name is its defect type."""
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable JSON file ({str(exc).splitlines()[0]})")
    if not isinstance(spec, dict) or "train" not in spec:
        raise DataError(f'{path}: expected an object such as {{"train": "good/", "test_good": ..., "test_defect": ..., '
                        f'"masks": ...}} ("train" is required)')
    if unknown := sorted(set(spec) - set(DESCRIPTION_KEYS)):
        raise DataError(f"{path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(DESCRIPTION_KEYS)})")

    def folder(value: object, key: str) -> Path:
        if not isinstance(value, str) or not value:
            raise DataError(f"{path}: {key} must be a folder name (a string), not {value!r}")
        found = Path(os.path.normpath(path.parent / Path(value).expanduser()))  # without ../ in messages
        if not found.is_dir():
            raise DataError(f"{path}: {key} {found} is not a folder")
        return found

    def folders(key: str) -> list[Path]:
        value = spec.get(key, [])
        if not isinstance(value, (str, list)):
            raise DataError(f"{path}: {key} must be a folder name or a list of them, not {value!r}")
        return [folder(v, key) for v in ([value] if isinstance(value, str) else value)]

    def typed(images_key: str, masks_key: str, into: dict[str, Path]) -> dict[str, Path]:
        """Defect folders by type (into: already known folders, such as test_good) and their mask folders."""
        defects, masks = folders(images_key), folders(masks_key)
        if len(masks) not in (0, 1, len(defects)):
            raise DataError(f"{path}: {len(masks)} {masks_key} folders for {len(defects)} {images_key} folders: give "
                            f"one for all, or one per {images_key} folder in its order")
        for found in defects:
            if found.name == "good" or found.name in into:
                raise DataError(f"{path}: {images_key} {found}: a defect folder's name is its defect type, and " +
                                ("'good' means defect-free" if found.name == "good" else
                                 f"another {images_key} folder is named {found.name!r} too"))
            into[found.name] = found
        types = [d.name for d in defects]
        return dict(zip(types, masks * len(types) if len(masks) == 1 else masks))

    test = {"good": folder(spec["test_good"], "test_good")} if "test_good" in spec else {}
    test_masks = typed("test_defect", "masks", test)
    train_defects: dict[str, Path] = {}
    train_masks = typed("train_defect", "train_masks", train_defects)
    return Layout(path.stem, folder(spec["train"], "train"), test, test_masks,
                  folder(spec["validation"], "validation") if "validation" in spec else None, str(path),
                  train_defects, train_masks)


def category_layout(data_path: Path, category: str) -> Layout:
    """The category's folder <data_path>/<category>/ (MVTec AD layout), else its description <category>.json."""
    data_path = Path(data_path)
    if not data_path.is_dir():
        raise DataError(f"--data_path {data_path} is not a folder")
    folder, described = data_path / category, data_path / f"{category}.json"
    if folder.is_dir():
        return mvtec_layout(folder)
    if described.is_file():
        return described_layout(described)
    raise DataError(f"category folder {folder} does not exist (expected <data_path>/<category>/train/good/*, or "
                    f"a file {described.name} naming its folders: docs/data.md)")


def has_defect_images(layout: Layout) -> bool:
    """Whether the category has a labelled test set: defect images besides the good ones."""
    return any(list_images(d, recursive=True) for t, d in layout.test.items() if t != "good")


def train_image_paths(data_path: Path, category: str) -> list[Path]:
    folder = category_layout(data_path, category).train
    paths = list_images(folder) if folder.is_dir() else []
    if not paths:
        raise DataError(f"no training images in {folder} (expected <data_path>/<category>/train/good/*.png|jpg|...)")
    return paths


def load_anomaly_sources(source_path: Path, size: Size, workers: int | None = None) -> Tensor:
    """Every image below source_path, recursively (DTD's images/<class>/*.jpg, or a flat folder)."""
    if not Path(source_path).is_dir():
        raise DataError(f"--anomaly_source_path {source_path} is not a folder")
    paths = list_images(source_path, recursive=True)
    if not paths:
        raise DataError(f"--anomaly_source_path {source_path} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return load_images(paths, size, workers)


@dataclass
class TestSet:
    images: Tensor  # (N, 3, H, W) uint8 BGR
    masks: Tensor  # (N, 1, H, W) uint8 0..255, bilinearly resized; zeros for good images and missing masks
    labels: Tensor  # (N,) 0 good, 1 defective
    defect_types: list[str]
    paths: list[Path]
    has_mask: Tensor  # (N,) bool: the pixel labels are known (good images, and defect images with a mask)
    left_out: list[Path] = field(default_factory=list)  # defect images the scored model trained on: not scored

    @property
    def mask_coverage(self) -> dict[str, int]:
        """How many defect images there are and how many of them have a mask (the pixel metrics' share)."""
        defective = self.labels.bool()
        return {"defect_images": int(defective.sum()), "defect_images_with_mask": int((defective & self.has_mask).sum())}

    def left_out_text(self) -> str:
        """'scored on 42 of 52 defect images; 10 used in training', or '' when none was left out."""
        if not self.left_out:
            return ""
        scored = int(self.labels.sum())
        return (f"scored on {scored} of {scored + len(self.left_out)} defect images; {len(self.left_out)} used in "
                f"training (left out)")


def mask_path_for(gt_dir: Path, image_path: Path) -> Path | None:
    for candidate in sorted(gt_dir.glob(f"{image_path.stem}_mask.*")) + sorted(gt_dir.glob(f"{image_path.stem}.*")):
        if is_image(candidate):
            return candidate
    return None


def defect_files(folders: dict[str, Path], masks: dict[str, Path]) -> list[dict]:
    """Every image of the defect folders (sorted by type, then name): its path, its type (its folder's name) and
    its mask file (None: an image-level label only)."""
    return [{"path": path, "defect_type": kind, "mask": mask_path_for(masks[kind], path) if kind in masks else None}
            for kind, folder in sorted(folders.items()) for path in list_images(folder)]


def file_digest(path: Path) -> str:
    """A digest of the file's bytes: how a checkpoint names the images it trained on, wherever they lie later."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:32]


def load_test_set(data_path: Path, category: str, size: Size | None, workers: int | None = None,
                  bit_depth: int = FULL_RANGE, leave_out: frozenset[str] = frozenset()) -> TestSet:
    """The labelled test set at size (None: the images' own size, which must then be one size), without the
    defect images whose file digest is in leave_out (those the scored model trained on)."""
    layout = category_layout(data_path, category)
    if not layout.test:
        raise DataError(f"no test folder in {layout.origin} (expected <data_path>/<category>/test/<good|defect>/*, "
                        f"or test_good / test_defect in a description)")
    good = {"good": layout.test["good"]} if "good" in layout.test else {}
    defects = defect_files({t: d for t, d in layout.test.items() if t != "good"}, layout.masks)
    left_out = [d["path"] for d in defects if leave_out and file_digest(d["path"]) in leave_out]
    if left_out and len(left_out) == len(defects):
        raise DataError(f"the test set of {layout.origin} holds only the {len(defects)} defect images the model "
                        f"trained on: nothing is left to score it on")
    dropped = set(left_out)
    files = sorted(defect_files(good, {}) + [d for d in defects if d["path"] not in dropped],
                   key=lambda d: (d["defect_type"], d["path"].name))
    if not files:
        raise DataError(f"no test images in the test folders of {layout.origin}")
    missing = [str(d["path"]) for d in files if d["defect_type"] != "good" and d["mask"] is None]
    if missing:  # image metrics still use them; pixel metrics cannot
        where = ", ".join(sorted({str(d) for d in layout.masks.values()})) or "no mask folder"
        warn(f"{len(missing)} defect image(s) without a mask in {where}: pixel metrics cover the "
             f"other {sum(d['defect_type'] != 'good' for d in files) - len(missing)} defect images ({'; '.join(missing[:3])}"
             + (" ..." if len(missing) > 3 else "") + ")")
    read = parallel_read(partial(read_test_pair, bit_depth=bit_depth), [(d["path"], d["mask"]) for d in files], size,
                         workers or default_workers())
    sizes = sorted({image.shape[:2] for image, _, _ in read})
    if len(sizes) > 1:
        raise DataError(f"the test images of {layout.origin} are of {len(sizes)} sizes ({sizes[0][0]}x{sizes[0][1]}, "
                        f"{sizes[-1][0]}x{sizes[-1][1]} ...): give --image_size HxW to score them at one size")
    images = to_tensor([image for image, _, _ in read])
    empty = np.zeros(sizes[0], np.uint8)
    masks = torch.from_numpy(np.stack([empty if mask is None else mask for _, mask, _ in read]))[:, None]
    notes = [note for _, _, found in read for note in found]
    for note in notes[:5]:
        warn(note)
    if len(notes) > 5:
        warn(f"... and {len(notes) - 5} more mask notes")
    types = [d["defect_type"] for d in files]
    labels = torch.tensor([t != "good" for t in types], dtype=torch.long)
    has_mask = torch.tensor([d["defect_type"] == "good" or d["mask"] is not None for d in files])
    return TestSet(images, masks, labels, types, [d["path"] for d in files], has_mask, left_out)


def available_categories(data_path: Path) -> list[str]:
    """Categories under data_path (folders with train/good/, and descriptions <name>.json): MVTec names in the
    official order, then any others sorted."""
    present = {d.name for d in Path(data_path).iterdir() if (d / "train" / "good").is_dir()}
    present |= {f.stem for f in Path(data_path).glob("*.json") if f.is_file()}
    return [c for c in CATEGORIES if c in present] + sorted(present - set(CATEGORIES))


def resolve_categories(obj_id: str, data_path: Path) -> list[str]:
    """--obj_id: an index 0..14 (official order), -1 for every category present, or a category name; a name
    present under data_path wins over an index (BTAD's categories are 01, 02, 03)."""
    named = Path(data_path).is_dir() and obj_id in available_categories(data_path)
    if obj_id.lstrip("-").isdigit() and not named:
        index = int(obj_id)
        if index == -1:
            if not Path(data_path).is_dir():
                raise DataError(f"--data_path {data_path} is not a folder")
            found = available_categories(data_path)
            if not found:
                raise DataError(f"no category (a folder with train/good/, or a <name>.json) under --data_path {data_path}")
            return found
        if not 0 <= index < len(CATEGORIES):
            raise DataError(f"--obj_id {obj_id}: expected -1, 0..{len(CATEGORIES) - 1} or a category name")
        return [CATEGORIES[index]]
    return [obj_id]


def one_category(obj_id: str, data_path: Path) -> str:
    """--obj_id where exactly one category is meant (scoring a test set)."""
    categories = resolve_categories(obj_id, data_path)
    if len(categories) != 1:
        raise DataError(f"--obj_id {obj_id}: name one category (0..14 or a folder name)")
    return categories[0]
