"""scripts/prepare_mtd.py: the published magnetic-tile archive (a fake copy of its layout, and one rebuilt from
the real data where present) into the MVTec layout with the rows' split, binarised masks, one-line errors."""
import runpy
import subprocess
import sys

import cv2
import numpy as np
import pytest

from helpers import ROOT

SCRIPT = ROOT / "scripts" / "prepare_mtd.py"
TEST_GOOD = (ROOT / "scripts" / "mtd_test_good.txt").read_text().split()
DEFECTS = ("Blowhole", "Break", "Crack", "Fray", "Uneven")


def prepare(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def write_jpg(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((12, 20), value, np.uint8))


@pytest.fixture
def archive(tmp_path):
    """The published layout: MT_<Type>/Imgs/<name>.jpg and its <name>.png mask, MT_Free holding the 173 test
    names plus three more; masks with values on both sides of 128."""
    source = tmp_path / "Magnetic-tile-defect-datasets."
    for i, name in enumerate(TEST_GOOD + ["exp9_num_1.jpg", "exp9_num_2.jpg", "exp9_num_3.jpg"]):
        write_jpg(source / "MT_Free" / "Imgs" / name, i % 256)
    for kind in DEFECTS:
        for i in range(2):
            write_jpg(source / f"MT_{kind}" / "Imgs" / f"exp1_num_{i}.jpg", 100)
            mask = np.zeros((12, 20), np.uint8)
            mask[2:5, 3:9], mask[6:8, 10:12], mask[9, 0] = 200, 128, 127
            cv2.imwrite(str(source / f"MT_{kind}" / "Imgs" / f"exp1_num_{i}.png"), mask)
    return source


def test_the_archive_becomes_the_documented_layout_and_split(archive, tmp_path):
    proc = prepare(archive, "--out", tmp_path / "datasets")
    assert proc.returncode == 0, proc.stderr
    mtd = tmp_path / "datasets" / "mtd"
    assert sorted(p.name for p in (mtd / "test" / "good").iterdir()) == sorted(TEST_GOOD)
    assert sorted(p.name for p in (mtd / "train" / "good").iterdir()) == ["exp9_num_1.jpg", "exp9_num_2.jpg",
                                                                          "exp9_num_3.jpg"]
    for kind in DEFECTS:
        images = sorted(p.name for p in (mtd / "test" / kind.lower()).iterdir())
        assert images == ["exp1_num_0.jpg", "exp1_num_1.jpg"]
        source = archive / f"MT_{kind}" / "Imgs"
        assert (mtd / "test" / kind.lower() / images[0]).read_bytes() == (source / images[0]).read_bytes()
        mask = cv2.imread(str(mtd / "ground_truth" / kind.lower() / "exp1_num_0_mask.png"), cv2.IMREAD_GRAYSCALE)
        original = cv2.imread(str(source / "exp1_num_0.png"), cv2.IMREAD_GRAYSCALE)
        np.testing.assert_array_equal(mask, np.where(original >= 128, 255, 0))
        assert set(np.unique(mask)) == {0, 255} and mask[9, 0] == 0 and mask[6, 10] == 255
    assert not (mtd / "ground_truth" / "good").exists() and "test/good 173" in proc.stdout


def test_bad_input_is_one_line_and_changes_nothing(archive, tmp_path):
    out = tmp_path / "datasets"
    assert prepare(archive, "--out", out).returncode == 0
    marker = out / "mtd" / "train" / "good" / "exp9_num_1.jpg"
    before = marker.read_bytes()
    proc = prepare(archive, "--out", out)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "exists: remove it first" in proc.stderr
    assert marker.read_bytes() == before
    (archive / "MT_Crack" / "Imgs" / "exp1_num_1.png").unlink()  # a mask missing half-way through
    proc = prepare(archive, "--out", tmp_path / "other")
    assert proc.returncode == 2 and "exp1_num_1.png: missing or unreadable mask" in proc.stderr
    assert not (tmp_path / "other" / "mtd").exists() and not (tmp_path / "other" / ".mtd.partial").exists()
    proc = prepare(tmp_path, "--out", tmp_path / "third")
    assert proc.returncode == 2 and "MT_Free" in proc.stderr and "Traceback" not in proc.stderr


def test_rebuilding_the_archive_from_the_real_data_gives_it_back(shared_data, tmp_path):
    """The real data arranged as the archive publishes it: the conversion must give back every file."""
    real = shared_data / "mtd"
    source = tmp_path / "archive"
    (source / "MT_Free" / "Imgs").mkdir(parents=True)
    for image in [*(real / "train" / "good").iterdir(), *(real / "test" / "good").iterdir()]:
        (source / "MT_Free" / "Imgs" / image.name).symlink_to(image)
    for kind in DEFECTS:
        (source / f"MT_{kind}" / "Imgs").mkdir(parents=True)
        for image in (real / "test" / kind.lower()).iterdir():
            (source / f"MT_{kind}" / "Imgs" / image.name).symlink_to(image)
            (source / f"MT_{kind}" / "Imgs" / f"{image.stem}.png").symlink_to(
                real / "ground_truth" / kind.lower() / f"{image.stem}_mask.png")
    runpy.run_path(str(SCRIPT), run_name="not_main")["main"]([str(source), "--out", str(tmp_path / "out")])
    made = tmp_path / "out" / "mtd"
    files = sorted(p.relative_to(real) for p in real.rglob("*") if p.is_file())
    assert sorted(p.relative_to(made) for p in made.rglob("*") if p.is_file()) == files
    assert len([f for f in files if f.parts[:2] == ("train", "good")]) == 779
    for relative in files:
        if relative.suffix == ".png":
            np.testing.assert_array_equal(cv2.imread(str(made / relative), cv2.IMREAD_GRAYSCALE),
                                          cv2.imread(str(real / relative), cv2.IMREAD_GRAYSCALE))
        else:
            assert (made / relative).read_bytes() == (real / relative).read_bytes(), relative
