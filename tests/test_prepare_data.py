"""scripts/prepare_data.py: a miniature of each data set's published archive into the MVTec AD layout, with that
data set's split, its masks binarised (non-zero: defect), every image the same bytes; one-line errors that leave
nothing half-written. MPDD, published in the MVTec layout, loads as it is."""
import subprocess
import sys

import cv2
import numpy as np
import pytest

import archives
from data_loader import category_layout, has_defect_images, list_images, load_test_set, resolve_categories, train_image_paths
from helpers import ROOT

SCRIPT = ROOT / "scripts" / "prepare_data.py"


def prepare(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def same_bytes(converted, published):
    assert sorted(names(converted)) == sorted(p.name for p in published)
    for path in published:
        assert (converted / path.name).read_bytes() == path.read_bytes(), path


def assert_mask(path, *published):
    """The written mask is 255 exactly where any published mask is non-zero, 0 elsewhere."""
    written = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    expected = np.logical_or.reduce([cv2.imread(str(p), cv2.IMREAD_UNCHANGED) != 0 for p in published])
    assert written.dtype == np.uint8 and set(np.unique(written)) == {0, 255}
    np.testing.assert_array_equal(written == 255, expected)


@pytest.fixture
def out(tmp_path):
    return tmp_path / "datasets"


def test_visa_follows_its_split_csv(tmp_path, out):
    source = archives.visa(tmp_path)
    proc = prepare("visa", source, "--out", out)
    assert proc.returncode == 0, proc.stderr
    for category, normal in (("candle", 5), ("pcb1", 4)):
        images = source / category / "Data" / "Images"
        root = out / "visa" / category
        same_bytes(root / "train" / "good", [images / "Normal" / f"{i:04d}.JPG" for i in range(1, normal)])
        same_bytes(root / "test" / "good", [images / "Normal" / "0000.JPG"])
        same_bytes(root / "test" / "anomaly", sorted((images / "Anomaly").iterdir()))
        for i in range(2):  # 000.png is a 0/1 mask, 001.png 0/255
            assert_mask(root / "ground_truth" / "anomaly" / f"{i:03d}_mask.png",
                        source / category / "Data" / "Masks" / "Anomaly" / f"{i:03d}.png")
    assert f"{out / 'visa' / 'candle'}: ground_truth/anomaly 2, test/anomaly 2, test/good 1, train/good 4" in proc.stdout


def test_mvtec_ad2_keeps_validation_for_calibration_and_the_private_sets_for_the_server(tmp_path, out):
    source = archives.mvtec_ad2(tmp_path)
    assert prepare("mvtec_ad2", source, "--out", out).returncode == 0
    obj, root = source / "can", out / "mvtec_ad2" / "can"
    same_bytes(root / "train" / "good", list_images(obj / "train" / "good"))
    same_bytes(root / "validation" / "good", list_images(obj / "validation" / "good"))
    same_bytes(root / "test" / "good", list_images(obj / "test_public" / "good"))
    same_bytes(root / "test" / "bad", list_images(obj / "test_public" / "bad"))
    assert_mask(root / "ground_truth" / "bad" / "001_regular_mask.png",
                obj / "test_public" / "ground_truth" / "bad" / "001_regular_mask.png")
    # the private sets carry no masks: kept as they are, outside test/, for test_draem.py --submission
    same_bytes(root / "test_private", list_images(obj / "test_private"))
    same_bytes(root / "test_private_mixed", list_images(obj / "test_private_mixed"))
    assert names(root) == ["ground_truth", "test", "test_private", "test_private_mixed", "train", "validation"]
    assert load_test_set(out / "mvtec_ad2", "can", 32).defect_types == ["bad", "bad", "good", "good"]


def test_loco_ors_the_mask_channels_for_the_standard_metrics_and_keeps_them_for_spro(tmp_path, out):
    source = archives.loco(tmp_path)
    proc = prepare("loco", source, "--out", out)
    assert proc.returncode == 0, proc.stderr
    cat, root = source / "breakfast_box", out / "loco" / "breakfast_box"
    for folder in ("train/good", "validation/good", "test/good", "test/logical_anomalies", "test/structural_anomalies"):
        same_bytes(root / folder, list_images(cat / folder))
    two = sorted((cat / "ground_truth" / "logical_anomalies" / "000").iterdir())
    assert len(two) == 2
    assert_mask(root / "ground_truth" / "logical_anomalies" / "000_mask.png", *two)
    written = cv2.imread(str(root / "ground_truth" / "logical_anomalies" / "000_mask.png"), cv2.IMREAD_GRAYSCALE)
    assert written[2, 2] == 255 and written[15, 30] == 255  # a pixel of each defect
    assert_mask(root / "ground_truth" / "structural_anomalies" / "000_mask.png",
                cat / "ground_truth" / "structural_anomalies" / "000" / "000.png")
    for kind, stem in (("logical_anomalies", "000"), ("logical_anomalies", "001"), ("structural_anomalies", "000")):
        same_bytes(root / "ground_truth" / kind / stem, list_images(cat / "ground_truth" / kind / stem))  # pixel values kept
    assert (root / "defects_config.json").read_bytes() == (cat / "defects_config.json").read_bytes()
    assert "ground_truth/logical_anomalies/* 4" in proc.stdout  # the channels, counted per type, not per image
    assert load_test_set(out / "loco", "breakfast_box", 32).has_mask.all()


def test_a_missing_mask_stops_every_preparation_with_one_line_naming_it(tmp_path):
    """A defect image without its mask is refused (no silent loss of pixel labels), without OpenCV's own
    warning on the console."""
    removed = {"visa": "candle/Data/Masks/Anomaly/001.png", "mvtec_ad2": "can/test_public/ground_truth/bad/001_regular_mask.png",
               "loco": "breakfast_box/ground_truth/structural_anomalies/000", "btad": "03/ground_truth/ko/0001.bmp",
               "ksdd2": "test/20003_GT.png"}
    for data_set, relative in removed.items():
        source = getattr(archives, data_set)(tmp_path / data_set)
        path = source / relative
        for file in [path] if path.is_file() else sorted(path.iterdir()):
            file.unlink()
        proc = prepare(data_set, source, "--out", tmp_path / f"out_{data_set}")
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, (data_set, proc.stderr)
        assert proc.stderr.startswith("error: ") and str(path.with_suffix("")) in proc.stderr, (data_set, proc.stderr)
        assert "missing" in proc.stderr and "WARN" not in proc.stderr, (data_set, proc.stderr)
        assert not (tmp_path / f"out_{data_set}" / data_set).exists()


def test_a_visa_split_table_saved_with_a_byte_order_mark_reads(tmp_path, out):
    source = archives.visa(tmp_path)
    table = source / "split_csv" / "1cls.csv"
    table.write_bytes(b"\xef\xbb\xbf" + table.read_bytes())  # how spreadsheet programs save UTF-8
    proc = prepare("visa", source, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert len(list_images(out / "visa" / "candle" / "train" / "good")) == 4


def test_btad_reads_ok_and_ko_with_png_and_bmp_masks(tmp_path, out):
    source = archives.btad(tmp_path)
    assert prepare("btad", source, "--out", out).returncode == 0
    for product, suffix in (("01", ".png"), ("03", ".bmp")):
        published, root = source / product, out / "btad" / product
        same_bytes(root / "train" / "good", list_images(published / "train" / "ok"))
        same_bytes(root / "test" / "good", list_images(published / "test" / "ok"))
        same_bytes(root / "test" / "ko", list_images(published / "test" / "ko"))
        assert_mask(root / "ground_truth" / "ko" / "0001_mask.png", published / "ground_truth" / "ko" / f"0001{suffix}")
    assert resolve_categories("01", out / "btad") == ["01"]  # the folder's name, not MVTec's index 1 (bottle)
    assert resolve_categories("1", out / "btad") == ["bottle"]


def test_ksdd2_is_good_where_the_mask_is_empty(tmp_path, out):
    source = archives.ksdd2(tmp_path)
    proc = prepare("ksdd2", source, "--out", out)
    assert proc.returncode == 0, proc.stderr
    root = out / "ksdd2" / "ksdd2"
    same_bytes(root / "train" / "good", [source / "train" / f"{10000 + i}.png" for i in range(4)])  # 10004: defective
    same_bytes(root / "test" / "good", [source / "test" / "20000.png", source / "test" / "20001.png"])
    same_bytes(root / "test" / "defect", [source / "test" / "20002.png", source / "test" / "20003.png"])
    assert_mask(root / "ground_truth" / "defect" / "20003_mask.png", source / "test" / "20003_GT.png")
    # the defective training image is kept as a real defect to learn from (train/defect), with its mask
    same_bytes(root / "train" / "defect", [source / "train" / "10004.png"])
    assert_mask(root / "ground_truth" / "defect" / "10004_mask.png", source / "train" / "10004_GT.png")
    assert names(root / "ground_truth" / "defect") == ["10004_mask.png", "20002_mask.png", "20003_mask.png"]


def test_link_gives_the_same_files_without_copying(tmp_path, out):
    source = archives.btad(tmp_path)
    assert prepare("btad", source, "--out", out, "--link").returncode == 0
    published, converted = source / "01" / "train" / "ok" / "0000.bmp", out / "btad" / "01" / "train" / "good" / "0000.bmp"
    assert converted.stat().st_ino == published.stat().st_ino


def test_bad_input_is_one_line_and_leaves_nothing_half_written(tmp_path, out):
    source = archives.loco(tmp_path)
    assert prepare("loco", source, "--out", out).returncode == 0
    before = {p: p.read_bytes() for p in (out / "loco").rglob("*") if p.is_file()}
    proc = prepare("loco", source, "--out", out)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "exists: remove it first" in proc.stderr
    assert {p: p.read_bytes() for p in (out / "loco").rglob("*") if p.is_file()} == before
    (source / "breakfast_box" / "ground_truth" / "structural_anomalies" / "000" / "000.png").write_bytes(b"broken")
    proc = prepare("loco", source, "--out", tmp_path / "other")  # fails on the last image
    assert proc.returncode == 2 and "000.png: unreadable mask" in proc.stderr, proc.stderr
    assert not (tmp_path / "other").exists() or list((tmp_path / "other").iterdir()) == []
    for data_set in ("visa", "mvtec_ad2", "btad", "ksdd2"):  # an archive of another data set
        proc = prepare(data_set, source, "--out", tmp_path / "third")
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    proc = prepare("visa", tmp_path / "nowhere", "--out", tmp_path / "third")
    assert proc.returncode == 2 and "nowhere is not a folder" in proc.stderr


def test_mpdd_loads_as_published(tmp_path):
    """MPDD is published in the MVTec AD layout: every category trains and scores without conversion."""
    source = archives.mpdd(tmp_path)
    assert resolve_categories("-1", source) == ["bracket_black"]
    assert len(train_image_paths(source, "bracket_black")) == 4 and has_defect_images(category_layout(source, "bracket_black"))
    test = load_test_set(source, "bracket_black", 32)
    assert test.defect_types == ["good", "hole", "hole"] and test.has_mask.all()
    assert test.masks[1].max() == 255 and test.masks[0].max() == 0


def test_an_archive_extracted_with_or_without_its_top_level_folder_prepares_alike(tmp_path):
    """mkdir NAME && tar -xf ARCHIVE -C NAME works whether or not the archive has a folder of its own."""
    for data_set, build in archives.BUILDERS.items():
        flat = build(tmp_path / "flat" / data_set)
        nested = build(tmp_path / "nested" / data_set / "extracted" / "one_more")
        for source, out in ((flat, tmp_path / "a" / data_set), (nested.parent.parent, tmp_path / "b" / data_set)):
            proc = prepare(data_set, source, "--out", out)
            assert proc.returncode == 0, (data_set, proc.stderr)
        files = [sorted(p.relative_to(root / data_set) for p in (root / data_set / data_set).rglob("*"))
                 for root in (tmp_path / "a", tmp_path / "b")]
        assert files[0] == files[1] and files[0], data_set
