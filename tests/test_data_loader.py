import argparse
import json

import cv2
import numpy as np
import pytest
import torch

from data_loader import (CATEGORIES, DataError, category_layout, decode, detect_bit_depth, file_bit_depth,
                         load_anomaly_sources, load_images, load_test_set, parse_bit_depth, resolve_categories,
                         train_image_paths)


def write_mixed_folder(folder):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    cv2.imwrite(str(folder / "a.png"), rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    cv2.imwrite(str(folder / "b.JPG"), rng.integers(0, 256, (90, 40, 3), dtype=np.uint8))
    cv2.imwrite(str(folder / "c_gray.jpeg"), rng.integers(0, 256, (33, 33), dtype=np.uint8))
    cv2.imwrite(str(folder / "d_rgba.png"), rng.integers(0, 256, (40, 40, 4), dtype=np.uint8))
    cv2.imwrite(str(folder / "e_16bit.png"), rng.integers(0, 65536, (40, 60), dtype=np.uint16))
    cv2.imwrite(str(folder / "f.bmp"), rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
    cv2.imwrite(str(folder / "g.tiff"), rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    (folder / "notes.txt").write_text("not an image")


def test_mixed_formats_load_as_uint8_bgr(tmp_path):
    write_mixed_folder(tmp_path / "cat" / "train" / "good")
    images = load_images(train_image_paths(tmp_path, "cat"), 64)
    assert images.shape == (7, 3, 64, 64) and images.dtype == torch.uint8
    gray = images[2]  # c_gray: replicated into three equal channels
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_sixteen_bit_keeps_its_top_byte(tmp_path):
    (tmp_path / "s").mkdir()
    img = np.full((32, 32), 0xAB12, dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "s" / "x.png"), img)
    out = load_anomaly_sources(tmp_path / "s", 32)
    assert (out == 0xAB).all()


def test_test_set_masks_labels_and_types(tmp_path):
    root = tmp_path / "part"
    write_mixed_folder(root / "train" / "good")
    (root / "test" / "good").mkdir(parents=True)
    (root / "test" / "scratch").mkdir(parents=True)
    (root / "ground_truth" / "scratch").mkdir(parents=True)
    cv2.imwrite(str(root / "test" / "good" / "0.png"), np.zeros((40, 40, 3), np.uint8))
    cv2.imwrite(str(root / "test" / "scratch" / "0.jpg"), np.zeros((80, 80), np.uint8))
    mask = np.zeros((80, 80), np.uint8)
    mask[:40] = 255
    cv2.imwrite(str(root / "ground_truth" / "scratch" / "0_mask.png"), mask)
    test = load_test_set(tmp_path, "part", 32)
    assert test.labels.tolist() == [0, 1] and test.defect_types == ["good", "scratch"]
    assert test.masks[0].sum() == 0
    assert (test.masks[1, 0, :15] == 255).all() and (test.masks[1, 0, 17:] == 0).all()


def test_unreadable_files_are_all_listed(tmp_path):
    folder = tmp_path / "c" / "train" / "good"
    write_mixed_folder(folder)
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.jpg").write_text("hello")
    with pytest.raises(DataError) as err:
        load_images(train_image_paths(tmp_path, "c"), 32)
    assert "2 unreadable" in str(err.value) and "zero.png" in str(err.value) and "text.jpg" in str(err.value)


def test_recursive_anomaly_sources(tmp_path):
    write_mixed_folder(tmp_path / "dtd" / "images" / "banded")
    write_mixed_folder(tmp_path / "dtd" / "images" / "bumpy")
    assert load_anomaly_sources(tmp_path / "dtd", 32).shape == (14, 3, 32, 32)


def test_category_resolution(tmp_path):
    assert resolve_categories("1", tmp_path) == ["bottle"]
    assert resolve_categories("my_part", tmp_path) == ["my_part"]
    for name in ("zipper", "mine"):
        (tmp_path / name / "train" / "good").mkdir(parents=True)
    assert resolve_categories("-1", tmp_path) == ["zipper", "mine"]
    with pytest.raises(DataError, match="--obj_id 15"):
        resolve_categories("15", tmp_path)
    assert len(CATEGORIES) == 15


def test_real_mtd_dataset(shared_data, tmp_path):
    train = load_images(train_image_paths(shared_data, "mtd"), 64)
    assert train.shape == (779, 3, 64, 64)
    test = load_test_set(shared_data, "mtd", 64)
    assert len(test.paths) == 565 and test.labels.sum() == 392
    assert test.masks[test.labels == 0].sum() == 0
    assert (test.masks[test.labels == 1].flatten(1).amax(1) > 127).float().mean() > 0.95
    sources = load_anomaly_sources(shared_data / "dtd" / "images", 32)
    assert sources.shape == (1200, 3, 32, 32)
    # The same real folders named by a JSON description (the data is read-only: the description lives elsewhere)
    mtd = shared_data / "mtd"
    defects = sorted(d for d in (mtd / "test").iterdir() if d.name != "good")
    describe(tmp_path, "tiles", train=str(mtd / "train" / "good"), test_good=str(mtd / "test" / "good"),
             test_defect=[str(d) for d in defects], masks=[str(mtd / "ground_truth" / d.name) for d in defects])
    described = load_test_set(tmp_path, "tiles", 64)
    assert described.paths == test.paths and described.defect_types == test.defect_types
    assert torch.equal(described.images, test.images) and torch.equal(described.masks, test.masks)


def test_masks_of_another_size_or_not_binary_are_fixed_with_a_warning(tmp_path, capsys):
    root = tmp_path / "part"
    (root / "test" / "dent").mkdir(parents=True)
    (root / "ground_truth" / "dent").mkdir(parents=True)
    cv2.imwrite(str(root / "test" / "dent" / "a.png"), np.zeros((64, 64, 3), np.uint8))
    cv2.imwrite(str(root / "test" / "dent" / "b.png"), np.zeros((64, 64, 3), np.uint8))
    small = np.zeros((32, 32), np.uint8)
    small[:16] = 255
    cv2.imwrite(str(root / "ground_truth" / "dent" / "a_mask.png"), small)
    soft = np.zeros((64, 64), np.uint8)
    soft[:, :32] = 200
    cv2.imwrite(str(root / "ground_truth" / "dent" / "b_mask.png"), soft)
    test = load_test_set(tmp_path, "part", 64)
    err = capsys.readouterr().err
    assert "a_mask.png is 32x32, its image 64x64: resized" in err
    assert "b_mask.png is not binary" in err
    assert (test.masks[0, 0, :30] == 255).all() and (test.masks[0, 0, 34:] == 0).all()
    assert (test.masks[1, 0, :, :30] == 200).all()


def test_a_pure_red_file_lands_in_channel_2_everywhere(tmp_path):
    """BGR, as the official code reads images and its checkpoints expect: red is the last channel in the
    training images, the test set and the images scored with --images (a loader returning RGB fails here)."""
    from data_loader import decode, to_tensor
    red = np.zeros((40, 40, 3), np.uint8)
    red[..., 2] = 255  # OpenCV writes BGR: this file is pure red
    for folder in ("part/train/good", "part/test/good"):
        (tmp_path / folder).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / folder / "red.png"), red)
    expected = torch.tensor([0, 0, 255], dtype=torch.uint8)
    train = load_images(train_image_paths(tmp_path, "part"), 32)
    test = load_test_set(tmp_path, "part", 32).images
    scored = to_tensor([decode(tmp_path / "part" / "test" / "good" / "red.png")])
    for images in (train, test, scored):
        assert torch.equal(images[0, :, 5, 5], expected)
        assert (images[0, 2] == 255).all() and (images[0, :2] == 0).all()


def test_bit_depth_of_a_file_is_the_smallest_depth_holding_its_largest_value(tmp_path):
    rng = np.random.default_rng(0)
    cases = {"eight.png": rng.integers(0, 256, (20, 20), dtype=np.uint8), "eight.jpg": np.full((8, 8), 200, np.uint8),
             "small16.png": np.full((8, 8), 200, np.uint16), "ten.png": np.full((8, 8), 1023, np.uint16),
             "twelve.png": np.full((8, 8), 4095, np.uint16), "twelve.tiff": np.full((8, 8), 4000, np.uint16),
             "fourteen.png": np.full((8, 8), 4096, np.uint16), "sixteen.png": np.full((8, 8), 65535, np.uint16)}
    for name, image in cases.items():
        cv2.imwrite(str(tmp_path / name), image)
    depths = {name: file_bit_depth(tmp_path / name) for name in cases}
    assert depths == {"eight.png": 8, "eight.jpg": 8, "small16.png": 8, "ten.png": 10, "twelve.png": 12,
                      "twelve.tiff": 12, "fourteen.png": 14, "sixteen.png": 16}
    assert detect_bit_depth([tmp_path / n for n in ("eight.png", "twelve.png", "ten.png")]) == 12


def test_twelve_bit_data_in_a_sixteen_bit_file_reads_as_its_eight_bit_original(tmp_path):
    rng = np.random.default_rng(1)
    eight = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    below = rng.integers(0, 16, eight.shape, dtype=np.uint16)  # the 4 bits under the kept 8
    cv2.imwrite(str(tmp_path / "twelve.png"), (eight.astype(np.uint16) << 4) | below)
    cv2.imwrite(str(tmp_path / "full.png"), (eight.astype(np.uint16) << 8) | (below << 4))
    assert np.array_equal(decode(tmp_path / "twelve.png", 12), eight)
    assert np.array_equal(decode(tmp_path / "full.png", 16), eight)  # full range: the top byte, as before
    assert np.array_equal(decode(tmp_path / "full.png"), eight)  # the default when no depth is known
    assert decode(tmp_path / "twelve.png", 16).max() <= 15  # why 12-bit data needs its depth: nearly black


def test_values_above_the_depth_saturate_with_one_warning(tmp_path, capsys):
    import data_loader
    data_loader._reported_depths.clear()
    for name in ("a.png", "b.png"):
        cv2.imwrite(str(tmp_path / name), np.full((8, 8), 5000, np.uint16))  # above 4095
    assert (decode(tmp_path / "a.png", 12) == 255).all() and (decode(tmp_path / "b.png", 12) == 255).all()
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "a.png holds values up to 5000, above the 12-bit range" in err


def test_bit_depth_flag_values():
    assert parse_bit_depth("auto") == "auto" and parse_bit_depth("12") == 12
    for bad in ("9", "0", "32", "twelve"):
        with pytest.raises(argparse.ArgumentTypeError, match="auto or one of 8, 10, 12, 14, 16"):
            parse_bit_depth(bad)


def describe(data_path, name, **folders):
    data_path.mkdir(parents=True, exist_ok=True)
    (data_path / f"{name}.json").write_text(json.dumps(folders))


def test_a_json_description_reads_folders_anywhere_as_a_category(tmp_path):
    """Folders named in <data_path>/<name>.json, relative to it: the same images as in the MVTec layout, the
    defect folders' names as defect types, masks by stem from one folder or one per defect folder."""
    import archives
    mpdd = archives.mpdd(tmp_path)  # an MVTec-layout category: train/good, test/good, test/hole, ground_truth/hole
    cat = mpdd / "bracket_black"
    archives.image(tmp_path / "camera" / "scratch" / "000.png", 1)  # a second defect type, without masks
    describe(tmp_path / "parts", "line3", train="../MPDD/bracket_black/train/good", test_good=str(cat / "test" / "good"),
             test_defect=["../MPDD/bracket_black/test/hole", "../camera/scratch"],
             masks=["../MPDD/bracket_black/ground_truth/hole", "../camera"], validation="../MPDD/bracket_black/test/good")
    assert resolve_categories("-1", tmp_path / "parts") == ["line3"]
    assert train_image_paths(tmp_path / "parts", "line3") == train_image_paths(mpdd, "bracket_black")
    layout = category_layout(tmp_path / "parts", "line3")
    assert layout.validation == cat / "test" / "good" and sorted(layout.test) == ["good", "hole", "scratch"]
    described, published = load_test_set(tmp_path / "parts", "line3", 32), load_test_set(mpdd, "bracket_black", 32)
    assert described.defect_types == published.defect_types + ["scratch"]
    n = len(published.paths)
    assert torch.equal(described.images[:n], published.images) and torch.equal(described.masks[:n], published.masks)
    assert described.has_mask.tolist() == [True] * n + [False]  # a defect image without a mask: image metrics only
    assert category_layout(mpdd, "bracket_black").validation is None  # the MVTec layout: validation/good when present


@pytest.mark.parametrize("folders, message", [
    ({"test_good": "."}, '"train" is required'),
    ({"train": ".", "test_defects": "."}, "unknown key(s) test_defects"),
    ({"train": "missing"}, "train"),
    ({"train": ".", "test_defect": 3}, "test_defect must be a folder name or a list"),
    ({"train": ".", "test_defect": ["a", "b/a"]}, "another test_defect folder is named 'a'"),
    ({"train": ".", "test_defect": ["good"]}, "'good' means defect-free"),
    ({"train": ".", "test_defect": ["a", "b/a"], "masks": ["a", "a", "a"]}, "3 masks folders for 2 test_defect"),
])
def test_a_wrong_description_is_one_line_naming_the_file(tmp_path, folders, message):
    for sub in ("a", "b/a", "good"):
        (tmp_path / "parts" / sub).mkdir(parents=True, exist_ok=True)
    describe(tmp_path / "parts", "p", **folders)
    with pytest.raises(DataError) as error:
        category_layout(tmp_path / "parts", "p")
    assert message in str(error.value) and "p.json" in str(error.value) and "\n" not in str(error.value)
    (tmp_path / "parts" / "p.json").write_text("{not json")
    with pytest.raises(DataError, match="p.json: not a readable JSON file"):
        train_image_paths(tmp_path / "parts", "p")
