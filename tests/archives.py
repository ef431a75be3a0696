"""Miniature copies of public data sets as their authors lay them out: a few tiny images per folder, file names in
the published patterns, masks of every kind found there (0/255, 0/1, several per image, .bmp). Each builder
returns the archive's folder."""
import json
from pathlib import Path

import cv2
import numpy as np

SIZE = (24, 40)  # height, width: small, not square, not a multiple of 32


def image(path: Path, seed: int, gray: bool = False) -> Path:
    """A random image (its bytes differ from every other's) in the format its suffix names."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, SIZE if gray else (*SIZE, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), pixels)
    return path


def images(folder: Path, count: int, seed: int, name: str = "{:03d}.png") -> None:
    """count images named name.format(0), name.format(1) ... in folder."""
    for i in range(count):
        image(folder / name.format(i), seed + i)


def mask(path: Path, box: tuple[int, int, int, int], value: int = 255) -> Path:
    """A mask that is value inside box (y0, y1, x0, x1) and 0 elsewhere."""
    pixels = np.zeros(SIZE, np.uint8)
    y0, y1, x0, x1 = box
    pixels[y0:y1, x0:x1] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), pixels)
    return path


def visa(root: Path) -> Path:
    """VisA_20220922/: <object>/Data/Images/{Normal,Anomaly}/*.JPG, <object>/Data/Masks/Anomaly/*.png (0/1 and 0/255
    masks), split_csv/1cls.csv."""
    source = root / "VisA_20220922"
    rows = ["object,split,label,image,mask"]
    for k, (category, normal, anomalies) in enumerate((("candle", 5, 2), ("pcb1", 4, 2))):
        for i in range(normal):
            name = f"{category}/Data/Images/Normal/{i:04d}.JPG"
            image(source / name, 100 * k + i)
            rows.append(f"{category},{'test' if i == 0 else 'train'},normal,{name},")
        for i in range(anomalies):
            name, mask_name = f"{category}/Data/Images/Anomaly/{i:03d}.JPG", f"{category}/Data/Masks/Anomaly/{i:03d}.png"
            image(source / name, 100 * k + 50 + i)
            mask(source / mask_name, (2, 9, 3 + i, 12), value=1 if i == 0 else 255)
            rows.append(f"{category},test,anomaly,{name},{mask_name}")
    (source / "split_csv").mkdir(parents=True)
    (source / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return source


def mvtec_ad2(root: Path) -> Path:
    """mvtec_ad_2/<object>/{train/good, validation/good, test_public/{good,bad,ground_truth/bad}, test_private,
    test_private_mixed}; one private image of another size (the upload keeps each image's own size)."""
    source = root / "mvtec_ad_2"
    obj = source / "can"
    for seed, (folder, count) in enumerate((("train/good", 4), ("validation/good", 2), ("test_public/good", 2),
                                            ("test_public/bad", 2), ("test_private", 2), ("test_private_mixed", 1))):
        images(obj / folder, count, 300 + 10 * seed, "{:03d}_regular.png")
    wide = np.random.default_rng(399).integers(0, 256, (20, 52, 3), dtype=np.uint8)
    assert cv2.imwrite(str(obj / "test_private_mixed" / "001_overexposed.png"), wide)
    for i in range(2):
        mask(obj / "test_public" / "ground_truth" / "bad" / f"{i:03d}_regular_mask.png", (4, 12, 5, 20))
    return source


def loco(root: Path) -> Path:
    """mvtec_loco_anomaly_detection/<category>/{train,validation}/good, test/{good,logical_anomalies,
    structural_anomalies}, ground_truth/<type>/<stem>/000.png, 001.png ... (several masks per image)."""
    source = root / "mvtec_loco_anomaly_detection"
    cat = source / "breakfast_box"
    for seed, (folder, count) in enumerate((("train/good", 4), ("validation/good", 2), ("test/good", 2),
                                            ("test/logical_anomalies", 2), ("test/structural_anomalies", 1))):
        images(cat / folder, count, 400 + 10 * seed)
    # Each mask channel is one defect, its pixel value naming it in defects_config.json; channels may overlap.
    mask(cat / "ground_truth" / "logical_anomalies" / "000" / "000.png", (1, 5, 1, 6), value=243)
    mask(cat / "ground_truth" / "logical_anomalies" / "000" / "001.png", (10, 20, 25, 35), value=255)
    mask(cat / "ground_truth" / "logical_anomalies" / "001" / "000.png", (3, 8, 3, 8), value=243)
    mask(cat / "ground_truth" / "logical_anomalies" / "001" / "001.png", (5, 12, 5, 12), value=255)
    mask(cat / "ground_truth" / "structural_anomalies" / "000" / "000.png", (5, 15, 5, 15), value=254)
    (cat / "defects_config.json").write_text(json.dumps(LOCO_DEFECTS))
    return source


# A defects_config.json in LOCO's format: relative and absolute saturation.
LOCO_DEFECTS = [
    {"defect_name": "missing_almonds", "pixel_value": 255, "saturation_threshold": 1.0, "relative_saturation": True},
    {"defect_name": "too_many_oranges", "pixel_value": 243, "saturation_threshold": 10, "relative_saturation": False},
    {"defect_name": "box_damaged", "pixel_value": 254, "saturation_threshold": 0.5, "relative_saturation": True}]


def btad(root: Path) -> Path:
    """BTech_Dataset_transformed/{01,03}/{train/ok, test/ok, test/ko, ground_truth/ko}: product 01 as .bmp images
    with .png masks, product 03 as .bmp images with .bmp masks."""
    source = root / "BTech_Dataset_transformed"
    for k, (product, mask_suffix) in enumerate((("01", ".png"), ("03", ".bmp"))):
        for i in range(4):
            image(source / product / "train" / "ok" / f"{i:04d}.bmp", 500 + 10 * k + i)
        image(source / product / "test" / "ok" / "0000.bmp", 505 + 10 * k)
        for i in range(2):
            image(source / product / "test" / "ko" / f"{i:04d}.bmp", 507 + 10 * k + i)
            mask(source / product / "ground_truth" / "ko" / f"{i:04d}{mask_suffix}", (6, 18, 10, 30))
    return source


def ksdd2(root: Path) -> Path:
    """KolektorSDD2/{train,test}/<id>.png with <id>_GT.png (empty for a good image)."""
    source = root / "KolektorSDD2"
    for split, first, good, defective in (("train", 10000, 4, 1), ("test", 20000, 2, 2)):
        for i in range(good + defective):
            image(source / split / f"{first + i}.png", first + i, gray=True)
            mask(source / split / f"{first + i}_GT.png", (5, 12, 5, 12), value=255 if i >= good else 0)
    return source


def mpdd(root: Path) -> Path:
    """MPDD/<category>/{train/good, test/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png}: already the
    MVTec AD layout, as published."""
    source = root / "MPDD"
    cat = source / "bracket_black"
    for seed, (folder, count) in enumerate((("train/good", 4), ("test/good", 1), ("test/hole", 2))):
        images(cat / folder, count, 600 + 10 * seed)
    for i in range(2):
        mask(cat / "ground_truth" / "hole" / f"{i:03d}_mask.png", (2, 10, 2, 10))
    return source


BUILDERS = {"visa": visa, "mvtec_ad2": mvtec_ad2, "loco": loco, "btad": btad, "ksdd2": ksdd2}
