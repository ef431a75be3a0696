"""Convert the published Magnetic Tile Defects archive into the MVTec AD layout, with the split the README's
magnetic-tile rows used; optionally the 10 DTD classes those rows drew anomaly sources from.

    git clone https://github.com/abin24/Magnetic-tile-defect-datasets. datasets/mtd_source
    python scripts/prepare_mtd.py datasets/mtd_source --out datasets
    python scripts/prepare_mtd.py datasets/mtd_source --out datasets --dtd datasets/dtd/images   # + datasets/dtd10

The archive (published by Huang, Qiu and Yuan with their paper in The Visual Computer, 2020) holds
MT_<Type>/Imgs/<name>.jpg with its pixel mask <name>.png, for Type in Blowhole, Break, Crack, Fray, Uneven
and Free (defect-free). The result, <out>/mtd/:

    train/good/                the MT_Free images not in the test list (779)
    test/good/                 the MT_Free images named in scripts/mtd_test_good.txt (173)
    test/<type>/               every image of each defect type (blowhole 115, break 85, crack 57, fray 32, uneven 103)
    ground_truth/<type>/<name>_mask.png   its mask binarised at 128 to {0, 255}

Images are copied byte for byte (grayscale JPEGs of varying sizes). --dtd writes <out>/dtd10/images/<class>/:
the 10 classes below, each image downsized so its longer side is at most 320 px (re-encoded as JPEG, so not
bit-identical to the copy the rows were measured with). Needs only numpy and OpenCV.
"""
import argparse
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np

DEFECTS = ("Blowhole", "Break", "Crack", "Fray", "Uneven")
TEST_GOOD = Path(__file__).resolve().with_name("mtd_test_good.txt")
DTD_CLASSES = ("banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked",
               "crosshatched", "crystalline")
DTD_LONGER_SIDE = 320


class PrepareError(Exception):
    pass


def images_of(source: Path, kind: str) -> list[Path]:
    folder = source / f"MT_{kind}" / "Imgs"
    if not folder.is_dir():
        raise PrepareError(f"{folder} does not exist: pass the folder that holds MT_Blowhole/, MT_Free/, ...")
    found = sorted(folder.glob("*.jpg"))
    if not found:
        raise PrepareError(f"{folder} holds no .jpg images")
    return found


def binary_mask(path: Path) -> np.ndarray:
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise PrepareError(f"{path}: missing or unreadable mask")
    return np.where(mask >= 128, 255, 0).astype(np.uint8)


def prepare_mtd(source: Path, out: Path) -> dict[str, int]:
    """Write <out>/mtd (built beside it and renamed when complete); return the number of files per folder."""
    final = out / "mtd"
    if final.exists():
        raise PrepareError(f"{final} exists: remove it first (nothing was changed)")
    target = out / ".mtd.partial"
    shutil.rmtree(target, ignore_errors=True)
    try:
        counts = write_mtd(source, target)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    target.rename(final)
    return counts


def write_mtd(source: Path, target: Path) -> dict[str, int]:
    test_good = set(TEST_GOOD.read_text().split())
    free = images_of(source, "Free")
    missing = test_good - {p.name for p in free}
    if missing:
        raise PrepareError(f"{len(missing)} test image(s) of {TEST_GOOD.name} are not in MT_Free, such as "
                           f"{sorted(missing)[0]}: is this the published archive?")
    defects = {kind: images_of(source, kind) for kind in DEFECTS}
    counts = {}
    for image in free:
        split = "test" if image.name in test_good else "train"
        copy(image, target / split / "good")
    for kind, images in defects.items():
        for image in images:
            copy(image, target / "test" / kind.lower())
            mask_path = target / "ground_truth" / kind.lower() / f"{image.stem}_mask.png"
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(mask_path), binary_mask(image.with_suffix(".png")))
    for folder in sorted(p for p in target.glob("*/*") if p.is_dir()):
        counts[str(folder.relative_to(target))] = len(list(folder.iterdir()))
    return counts


def copy(image: Path, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(image, folder / image.name)


def prepare_dtd(dtd_images: Path, out: Path) -> int:
    """The 10 DTD classes, longer side at most DTD_LONGER_SIDE, under <out>/dtd10/images/<class>/."""
    target = out / "dtd10" / "images"
    if target.exists():
        raise PrepareError(f"{target} exists: remove it first")
    written = 0
    for name in DTD_CLASSES:
        files = sorted((dtd_images / name).glob("*.jpg"))
        if not files:
            raise PrepareError(f"{dtd_images / name} holds no .jpg images: pass DTD's images/ folder")
        (target / name).mkdir(parents=True)
        for path in files:
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            scale = DTD_LONGER_SIDE / max(image.shape[:2])
            if scale < 1:
                size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
                image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            cv2.imwrite(str(target / name / path.name), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
            written += 1
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="the published archive's folder (holding MT_Blowhole/ ... MT_Free/)")
    p.add_argument("--out", type=Path, default=Path("datasets"), help="where mtd/ (and dtd10/) go (default ./datasets)")
    p.add_argument("--dtd", type=Path, metavar="DTD_IMAGES", help="also write the 10-class DTD subset from DTD's images/")
    args = p.parse_args(argv)
    try:
        counts = prepare_mtd(args.source, args.out)
        print(f"{args.out / 'mtd'}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        if args.dtd:
            print(f"{args.out / 'dtd10' / 'images'}: {prepare_dtd(args.dtd, args.out)} images of {len(DTD_CLASSES)} classes")
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
