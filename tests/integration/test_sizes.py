"""Sizes that are not squares, end to end: non-square and crop runs, old integer configs, bad sizes."""
import csv

import cv2
import numpy as np
import pytest
import torch

from helpers import TINY, call_script, read_json, tiny_dataset
from scoring.metrics import METRICS

SMALL = [a for a in TINY if a not in ("--image_size", "32")]  # TINY without its size


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("shapes") / "data")


def train(work, data, *extra):
    call_script("train_draem.py", "--obj_id", "weave", "--data_path", data, "--anomaly_source_path", data / "sources",
               "--epochs", "2", *SMALL, *extra, cwd=work)
    return next((work / "checkpoints").glob("*.pt"))


def test_non_square_run_end_to_end(data, tmp_path):
    ckpt = train(tmp_path, data, "--image_size", "32x64")
    state = torch.load(ckpt, weights_only=True)
    assert state["config"]["image_size"] == [32, 64] and state["config"]["train_crop"] is None
    call_script("test_draem.py", "--checkpoint", ckpt, "--data_path", data, "--out", tmp_path / "res", "--device", "cpu",
               cwd=tmp_path)
    scored = read_json(tmp_path / "res" / "results.json")["runs"][ckpt.stem]
    assert all(scored[m] == pytest.approx(state["metrics"][m], abs=1e-9) for m in METRICS)  # same size both times
    folder = tmp_path / "mine"
    folder.mkdir()
    cv2.imwrite(str(folder / "wide.png"), cv2.resize(cv2.imread(str(data / "weave" / "test" / "hole" / "000.png")),
                                                     (150, 70)))
    call_script("test_draem.py", "--checkpoint", ckpt, "--images", folder, "--out", tmp_path / "out", "--device", "cpu",
               cwd=tmp_path)
    row = next(csv.DictReader(open(tmp_path / "out" / "scores.csv")))
    assert cv2.imread(row["mask"], cv2.IMREAD_GRAYSCALE).shape == (70, 150)  # the original size, not 32x64
    picture = cv2.imread(row["panel"])
    assert np.array_equal(picture[-70:, :150], cv2.imread(str(folder / "wide.png")))  # input tile at 150x70
    # An old checkpoint recorded one integer side; it still loads and scores the same.
    state["config"]["image_size"] = 32
    del state["config"]["train_crop"]
    torch.save(state, tmp_path / "old.pt")
    call_script("test_draem.py", "--checkpoint", tmp_path / "old.pt", "--data_path", data, "--out", tmp_path / "old",
               "--image_size", "32x64", "--device", "cpu", cwd=tmp_path)
    old = read_json(tmp_path / "old" / "results.json")["runs"]["old"]
    assert all(old[m] == pytest.approx(scored[m], abs=1e-9) for m in METRICS)


def test_crop_run_end_to_end(data, tmp_path):
    ckpt = train(tmp_path, data, "--image_size", "64x96", "--train_crop", "32")
    state = torch.load(ckpt, weights_only=True)
    assert state["config"]["image_size"] == [64, 96] and state["config"]["train_crop"] == [32, 32]
    assert state["step"] == 6
    # The end-of-training evaluation ran on whole 64x96 images: scoring at that size gives the same numbers.
    call_script("test_draem.py", "--checkpoint", ckpt, "--data_path", data, "--out", tmp_path / "res", "--device", "cpu",
               cwd=tmp_path)
    scored = read_json(tmp_path / "res" / "results.json")["runs"][ckpt.stem]
    assert all(scored[m] == pytest.approx(state["metrics"][m], abs=1e-9) for m in METRICS)
    panel = cv2.imread(str(next((tmp_path / "res" / "images").rglob("*.png"))))
    assert panel.shape[1] > 3 * 160  # panels at the test images' own 160 px, not the training size


@pytest.mark.parametrize("args,flag", [(["--image_size", "100x128"], "--image_size"), (["--image_size", "0"], "--image_size"),
                                       (["--image_size", "abc"], "--image_size"), (["--image_size", "256x"], "--image_size"),
                                       (["--image_size", "64", "--train_crop", "96x32"], "--train_crop")])
def test_bad_sizes_exit_with_one_line(data, tmp_path, args, flag):
    proc = call_script("train_draem.py", "--obj_id", "weave", "--data_path", data, *args, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and flag in proc.stderr.splitlines()[-1] and "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_a_bad_size_for_scoring_exits_with_one_line(data, tmp_path):
    proc = call_script("test_draem.py", "--checkpoint", tmp_path, "--images", data, "--image_size", "100x128",
                       cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "--image_size" in proc.stderr.splitlines()[-1] and "Traceback" not in proc.stderr
