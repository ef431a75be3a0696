"""Convert a public anomaly-detection data set, as its authors publish it, into the MVTec AD layout that
train_draem.py and test_draem.py read, with that data set's own split and mask rules.

    python scripts/prepare_data.py visa      VisA_20220922/        --out datasets   # -> datasets/visa/<object>/
    python scripts/prepare_data.py mvtec_ad2 mvtec_ad_2/           --out datasets   # -> datasets/mvtec_ad2/<object>/
    python scripts/prepare_data.py loco      mvtec_loco_anomaly_detection/ --out datasets   # -> datasets/loco/...
    python scripts/prepare_data.py btad      BTech_Dataset_transformed/    --out datasets   # -> datasets/btad/01 ...
    python scripts/prepare_data.py ksdd2     KolektorSDD2/         --out datasets   # -> datasets/ksdd2/ksdd2/

Each category becomes <category>/train/good, test/good, test/<defect type>, ground_truth/<defect type>/<stem>_mask.png
and, where the data set ships good images for calibration (MVTec AD 2, MVTec LOCO), validation/good; training
calibrates its thresholds on those. Images are copied byte for byte (or hard-linked with --link), never
re-encoded; masks are written as PNGs, 255 where the published mask is non-zero. The data set is built in
<out>/.<name>.partial and renamed to <out>/<name> when complete: an error leaves nothing half-written.
MPDD needs no conversion: it is published in the MVTec AD layout (docs/data.md). Needs only numpy and OpenCV.
"""
import argparse
import csv
import os
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


class PrepareError(Exception):
    pass


class Target:
    """The partial folder being built: images placed byte for byte, masks binarised, every file counted."""

    def __init__(self, root: Path, link: bool):
        self.root, self.link, self.counts = root, link, Counter()

    def place(self, image: Path, folder: str, name: str | None = None) -> None:
        """A file (an image, a mask channel, a config) into <category>/<folder>/ under its own name (or name), the
        same bytes."""
        if not image.is_file():
            raise PrepareError(f"{image}: missing image")
        path = self.new_file(folder, name or image.name)
        if self.link:
            try:
                os.link(image, path)
            except OSError as exc:
                raise PrepareError(f"--link: cannot hard-link {image} into {self.root.parent} ({exc.strerror}): "
                                   f"drop --link to copy")
        else:
            shutil.copyfile(image, path)

    def mask(self, defect: np.ndarray, folder: str, stem: str) -> None:
        """A boolean defect map as <folder>/<stem>_mask.png, 0 or 255."""
        cv2.imwrite(str(self.new_file(folder, f"{stem}_mask.png")), np.where(defect, 255, 0).astype(np.uint8))

    def new_file(self, folder: str, name: str) -> Path:
        path = self.root / folder / name
        if path.exists():
            raise PrepareError(f"two files would both be {Path(folder) / name}: the archive is not as published")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.counts[folder] += 1
        return path


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS) \
        if folder.is_dir() else []


def nonzero(path: Path) -> np.ndarray:
    """A published mask as a boolean defect map: defective wherever it is non-zero (0/255 and 0/1 masks alike)."""
    if not path.is_file():
        raise PrepareError(f"{path}: missing mask")
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise PrepareError(f"{path}: unreadable mask")
    return (mask != 0).any(axis=2) if mask.ndim == 3 else mask != 0


def categories(source: Path, marker: str, hint: str) -> list[Path]:
    """The category folders of source: those holding marker (such as train/good)."""
    found = sorted(d for d in source.iterdir() if (d / marker).is_dir()) if source.is_dir() else []
    if not found:
        raise PrepareError(f"{source}: no category folder holding {marker}/: pass {hint}")
    return found


def copy_folder(target: Target, source: Path, folder: str, required: bool = True) -> list[Path]:
    images = images_in(source)
    if required and not images:
        raise PrepareError(f"{source}: no images")
    for image in images:
        target.place(image, folder)
    return images


# ---- the data sets ----------------------------------------------------------------------------------

def visa(source: Path, target: Target) -> None:
    """VisA: split_csv/1cls.csv decides the split (columns object, split, label, image, mask; paths relative to
    the archive); label normal is good, anything else the defect type "anomaly"; masks non-zero where defective."""
    table = source / "split_csv" / "1cls.csv"
    if not table.is_file():
        raise PrepareError(f"{table} does not exist: pass the extracted archive's folder (holding split_csv/ and "
                           f"candle/, capsules/, ...)")
    with open(table, newline="", encoding="utf-8-sig") as f:  # a byte-order mark, as spreadsheet programs save
        rows = list(csv.DictReader(f))
    missing = {"object", "split", "label", "image", "mask"} - set(rows[0] if rows else {})
    if missing:
        raise PrepareError(f"{table}: no column(s) {', '.join(sorted(missing))}: is this VisA's 1cls.csv?")
    for line, row in enumerate(rows, start=2):
        split, good = row["split"].strip(), row["label"].strip() == "normal"
        if split not in ("train", "test") or (split == "train" and not good):
            raise PrepareError(f"{table} line {line}: split {split!r}, label {row['label']!r}: expected train "
                               f"(normal images only) or test")
        category, image = row["object"].strip(), source / row["image"].strip()
        kind = "good" if good else "anomaly"
        target.place(image, f"{category}/{split}/{kind}")
        if not good and row["mask"].strip():
            target.mask(nonzero(source / row["mask"].strip()), f"{category}/ground_truth/{kind}", image.stem)


def mvtec_ad2(source: Path, target: Target) -> None:
    """MVTec AD 2: train/good, validation/good (calibration), test_public/{good,bad} with
    test_public/ground_truth/bad/<stem>_mask.png, and the private test sets as they are (test_private,
    test_private_mixed: no masks; test_draem.py --submission scores them for MVTec's server)."""
    for folder in categories(source, "train/good", "the folder holding can/, fabric/, ... (mvtec_ad_2)"):
        name, public = folder.name, folder / "test_public"
        copy_folder(target, folder / "train" / "good", f"{name}/train/good")
        copy_folder(target, folder / "validation" / "good", f"{name}/validation/good")
        copy_folder(target, public / "good", f"{name}/test/good")
        for image in copy_folder(target, public / "bad", f"{name}/test/bad"):
            target.mask(nonzero(public / "ground_truth" / "bad" / f"{image.stem}_mask.png"), f"{name}/ground_truth/bad",
                        image.stem)
        for split in ("test_private", "test_private_mixed"):
            copy_folder(target, folder / split, f"{name}/{split}", required=False)


def loco(source: Path, target: Target) -> None:
    """MVTec LOCO AD: the MVTec layout with validation/good, except that each defect image has a folder of masks,
    ground_truth/<type>/<stem>/000.png, 001.png ... (one per defect, its pixel value naming the defect in
    defects_config.json). They are OR-ed into <stem>_mask.png for the standard metrics and also kept as they are,
    with defects_config.json, for LOCO's sPRO."""
    for folder in categories(source, "train/good", "the folder holding breakfast_box/, juice_bottle/, ..."):
        name = folder.name
        config = folder / "defects_config.json"
        if not config.is_file():
            raise PrepareError(f"{config}: missing (it names each defect's saturation, which LOCO's sPRO needs)")
        target.place(config, name)
        copy_folder(target, folder / "train" / "good", f"{name}/train/good")
        copy_folder(target, folder / "validation" / "good", f"{name}/validation/good")
        tests = sorted(d for d in (folder / "test").iterdir() if d.is_dir()) if (folder / "test").is_dir() else []
        if not tests:
            raise PrepareError(f"{folder / 'test'}: no test folders (good/, logical_anomalies/, ...)")
        for test in tests:
            for image in copy_folder(target, test, f"{name}/test/{test.name}"):
                if test.name != "good":
                    loco_masks(target, folder / "ground_truth" / test.name / image.stem, f"{name}/ground_truth/{test.name}")


def loco_masks(target: Target, channels: Path, folder: str) -> None:
    masks = images_in(channels)
    if not masks:
        raise PrepareError(f"{channels}: missing masks (000.png ...) for the image {channels.name}")
    maps = [nonzero(m) for m in masks]
    if len({m.shape for m in maps}) > 1:
        raise PrepareError(f"{channels}: masks of different sizes")
    target.mask(np.logical_or.reduce(maps), folder, channels.name)
    for mask in masks:
        target.place(mask, f"{folder}/{channels.name}")


def btad(source: Path, target: Target) -> None:
    """BTAD: 01|02|03/{train/ok, test/ok, test/ko, ground_truth/ko/<stem>.png|bmp}; ok is good, ko the defect type."""
    for folder in categories(source, "train/ok", "the folder holding 01/, 02/, 03/"):
        name = folder.name
        copy_folder(target, folder / "train" / "ok", f"{name}/train/good")
        copy_folder(target, folder / "test" / "ok", f"{name}/test/good")
        masks = {m.stem: m for m in images_in(folder / "ground_truth" / "ko")}
        for image in copy_folder(target, folder / "test" / "ko", f"{name}/test/ko"):
            if image.stem not in masks:
                raise PrepareError(f"{folder / 'ground_truth' / 'ko' / image.stem}.png: missing mask for {image}")
            target.mask(nonzero(masks[image.stem]), f"{name}/ground_truth/ko", image.stem)


def ksdd2(source: Path, target: Target) -> None:
    """KolektorSDD2: train|test/<id>.png with <id>_GT.png; an image is good when its mask is empty. The defective
    training images go to train/defect (real defects to learn from; --unsupervised trains without them, and
    --pixel_labels split_N.pyb applies the authors' splits); the category is named ksdd2."""
    for split in ("train", "test"):
        images = [p for p in images_in(source / split) if not p.stem.endswith("_GT")]
        if not images:
            raise PrepareError(f"{source / split}: no images: pass the folder holding train/ and test/")
        for image in images:
            defect = nonzero(image.with_name(f"{image.stem}_GT{image.suffix}"))
            if not defect.any():
                target.place(image, f"ksdd2/{split}/good")
            else:
                target.place(image, f"ksdd2/{split}/defect")
                target.mask(defect, "ksdd2/ground_truth/defect", image.stem)


CONVERTERS: dict[str, Callable[[Path, Target], None]] = {
    "visa": visa, "mvtec_ad2": mvtec_ad2, "loco": loco, "btad": btad, "ksdd2": ksdd2}
# What the folder holding each data set contains (a glob).
MARKERS = {"visa": "split_csv/1cls.csv", "mvtec_ad2": "*/train/good", "loco": "*/train/good", "btad": "*/train/ok",
           "ksdd2": "train"}


def archive_root(source: Path, marker: str) -> Path:
    """The folder holding the data set: source, or the one folder inside it, and so on down. Some archives have a
    top-level folder and some do not; extracted into a folder of their own, either way works."""
    while not any(source.glob(marker)):
        inside = [d for d in source.iterdir() if d.is_dir() and not d.name.startswith(".")]
        if len(inside) != 1:
            break
        source = inside[0]
    return source


def prepare(data_set: str, source: Path, out: Path, link: bool = False) -> Counter:
    """Write <out>/<data_set> (built beside it and renamed when complete); return the files per folder."""
    final, partial = out / data_set, out / f".{data_set}.partial"
    if final.exists():
        raise PrepareError(f"{final} exists: remove it first (nothing was changed)")
    if not source.is_dir():
        raise PrepareError(f"{source} is not a folder: pass the extracted archive")
    shutil.rmtree(partial, ignore_errors=True)
    target = Target(partial, link)
    try:
        CONVERTERS[data_set](archive_root(source, MARKERS[data_set]), target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    partial.rename(final)
    return target.counts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_set", choices=sorted(CONVERTERS), help="which data set the archive is")
    p.add_argument("source", type=Path, help="the extracted archive's folder, as its authors publish it")
    p.add_argument("--out", type=Path, default=Path("datasets"), help="where <data_set>/ goes (default ./datasets)")
    p.add_argument("--link", action="store_true", help="hard-link the images instead of copying them (same file "
                                                       "system only; saves the space)")
    args = p.parse_args(argv)
    try:
        counts = prepare(args.data_set, args.source, args.out, args.link)
    except (PrepareError, OSError) as exc:  # OSError: a full disk, a folder without write access
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    by_category: dict[str, Counter] = {}
    for folder, n in sorted(counts.items()):
        category, _, rest = folder.partition("/")
        parts = rest.split("/")  # LOCO's mask channels, ground_truth/<type>/<stem>/, count per type
        by_category.setdefault(category, Counter())["/".join(parts[:2]) + "/*" if len(parts) > 2 else rest or "files"] += n
    for category, parts in by_category.items():
        print(f"{args.out / args.data_set / category}: " + ", ".join(f"{k} {n}" for k, n in parts.items()))
    print(f"train: python train_draem.py --obj_id -1 --data_path {args.out / args.data_set} --anomaly_source_path ...")


if __name__ == "__main__":
    main()
