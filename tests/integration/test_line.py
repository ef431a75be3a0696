"""Ready for the line: thresholds from good images, camera bit depths and tiled scoring, end to end."""
import csv
import json
import shutil

import cv2
import numpy as np
import pytest
import torch

from data_loader import list_images, load_images, load_test_set
from helpers import TINY, call_script, tiny_dataset
from engine import calibration_holdout
from model_unet import image_scores
from scoring.calibration import calibrate
from scoring.evaluate import predict
from scoring.tiling import TiledModel
from training.checkpoint import load_checkpoint, model_from_checkpoint


def run(script: str, *args) -> None:
    """A script's main in this process (a subprocess would spend seconds importing torch)."""
    import importlib
    module = importlib.import_module(script.removesuffix(".py"))
    module.main(module.parse_args([str(a) for a in args]))


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A run on a labelled category that also holds out a quarter of train/good to calibrate on: the checkpoint
    stores the test set's max-F1 thresholds and the calibrated ones."""
    work = tmp_path_factory.mktemp("line")
    data = tiny_dataset(work / "data")
    call_script("train_draem.py", "--obj_id", "weave", "--data_path", data, "--anomaly_source_path", data / "sources",
                "--epochs", "2", "--calibration_split", "0.25", "--false_alarm_rate", "0.4",
                *TINY, cwd=work)
    return work, data, next((work / "checkpoints").glob("*.pt"))


@pytest.fixture(scope="module")
def calibrated_onnx(calibrated):
    """The calibrated checkpoint exported to ONNX once, by export_draem.py (torch.onnx takes ~10 s a graph here)."""
    pytest.importorskip("onnxruntime")
    work, _, ckpt = calibrated
    run("export_draem.py", "--checkpoint", ckpt, "--out", work / "m.onnx")
    return work / "m.onnx"


def scores_and_maxima(checkpoint, images):
    model, info = model_from_checkpoint(checkpoint)
    maps, _ = predict(model, images, torch.device("cpu"))
    return image_scores(maps).numpy(), maps.flatten(1).amax(1).numpy()


def test_calibration_split_holds_out_seeded_images_and_the_run_ends_with_their_thresholds(calibrated):
    work, data, ckpt = calibrated
    info = load_checkpoint(ckpt)[1]
    paths = list_images(data / "weave" / "train" / "good")
    _, held = calibration_holdout(len(paths), 0.25, seed=0)
    assert info.config["calibration_split"] == 0.25 and len(held) == 3
    assert info.calibration["held_out"] == [paths[i].name for i in held]
    assert calibration_holdout(len(paths), 0.25, seed=0)[1] == held != calibration_holdout(len(paths), 0.25, seed=1)[1]
    scores, maxima = scores_and_maxima(ckpt, load_images([paths[i] for i in held], 32))
    expected = calibrate(scores, maxima, 0.4, "")
    for kind in ("image", "pixel"):
        assert info.calibration[kind]["threshold"] == expected[kind]["threshold"]
        assert info.calibration[kind]["flagged"] == expected[kind]["flagged"] <= 1  # floor(0.4 * 3)
    assert info.threshold("image") == expected["image"]["threshold"]


def test_the_calibrated_threshold_is_the_deployed_one_over_the_test_sets_max_f1(calibrated, calibrated_onnx, tmp_path,
                                                                                capsys):
    """The engineer asked for a false-alarm budget: the default, auto, an export's metadata and the Python API
    give its thresholds, not the test set's max F1 (stored too, one flag away)."""
    from scoring.detector import load
    work, data, ckpt = calibrated
    info = load_checkpoint(ckpt)[1]
    calibrated_t = {kind: info.calibration[kind]["threshold"] for kind in ("image", "pixel")}
    tested = {kind: info.operating_points[kind]["threshold"] for kind in ("image", "pixel")}
    assert all(calibrated_t[k] != tested[k] for k in calibrated_t)  # two different answers are stored
    assert {k: info.threshold(k) for k in calibrated_t} == calibrated_t
    detector = load(ckpt)
    assert (detector.image_threshold.value, detector.pixel_threshold.value) == (calibrated_t["image"], calibrated_t["pixel"])
    run("test_draem.py", "--checkpoint", ckpt, "--data_path", data, "--out", tmp_path / "t", "--device", "cpu",
        "--no-save_images")
    assert f"image threshold: {calibrated_t['image']} (calibrated for 40 % false alarms" in capsys.readouterr().out
    run("test_draem.py", "--checkpoint", ckpt, "--data_path", data, "--out", tmp_path / "f", "--device", "cpu",
        "--no-save_images", "--threshold", "max_f1")
    assert "image threshold: " in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "f" / f"scores_{ckpt.stem}.csv")))
    own = json.loads((tmp_path / "f" / "results.json").read_text())["runs"][ckpt.stem]["thresholds"]["image"]
    assert own["source"] == "max F1 on this test set" and own["optimistic"]
    assert all((r["verdict"] == "ANOMALY") == (float(r["score"]) >= own["value"]) for r in rows)
    import onnx
    meta = {p.key: p.value for p in onnx.load(calibrated_onnx).metadata_props}
    assert float(meta["image_threshold"]) == calibrated_t["image"] and float(meta["pixel_threshold"]) == calibrated_t["pixel"]
    assert load(calibrated_onnx).image_threshold.value == calibrated_t["image"]


def test_the_own_part_commands_on_good_images_alone_end_with_verdicts_and_masks(tmp_path):
    """README's own-part path: train/good only (no test set), train, then --images: verdicts and defect masks,
    from thresholds the run calibrated on a default 10 % held out, said on the console."""
    demo = tiny_dataset(tmp_path / "demo")
    part = tmp_path / "data" / "my_part" / "train" / "good"
    shutil.copytree(demo / "weave" / "train" / "good", part)
    proc = call_script("train_draem.py", "--obj_id", "my_part", "--data_path", tmp_path / "data",
                       "--anomaly_source_path", demo / "sources", "--epochs", "1", *TINY, cwd=tmp_path)
    assert "no labelled test set: holding out 1 of 12 good images (--calibration_split 0.1)" in proc.stdout
    [ckpt] = (tmp_path / "checkpoints").glob("DRAEM_my_part_*.pt")
    info = load_checkpoint(ckpt)[1]
    assert info.config["calibration_split"] == 0.1 and len(info.calibration["held_out"]) == 1
    call_script("test_draem.py", "--checkpoint", ckpt, "--images", demo / "weave" / "test", "--out",
                tmp_path / "heatmaps", "--device", "cpu", cwd=tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "heatmaps" / "scores.csv")))
    assert len(rows) == 10 and all(r["verdict"] in ("OK", "ANOMALY") for r in rows)
    threshold = info.calibration["image"]["threshold"]
    assert all((r["verdict"] == "ANOMALY") == (float(r["score"]) >= threshold) for r in rows)
    assert all(r["mask"] and cv2.imread(r["mask"], cv2.IMREAD_GRAYSCALE) is not None for r in rows)
    # the default applies only without a labelled test set: the demo layout (which has one) holds nothing out
    proc = call_script("train_draem.py", "--obj_id", "weave", "--data_path", demo, "--anomaly_source_path",
                       demo / "sources", "--epochs", "1", "--eval_every", "-1", "--preview", "4", *TINY, cwd=tmp_path)
    assert "holding out" not in proc.stdout


def test_threshold_auto_uses_the_calibrated_thresholds_and_says_so(calibrated, tmp_path, capsys):
    work, data, ckpt = calibrated
    run("test_draem.py", "--checkpoint", ckpt, "--images", data / "weave" / "test", "--out", tmp_path,
        "--threshold", "auto", "--pixel_threshold", "auto", "--device", "cpu")
    threshold = load_checkpoint(ckpt)[1].calibration["image"]["threshold"]
    assert f"image threshold: {threshold} (calibrated for 40 % false alarms on 3 good images" in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "scores.csv")))
    assert rows and all((r["verdict"] == "ANOMALY") == (float(r["score"]) >= threshold) for r in rows)
    assert all(r["mask"] for r in rows)  # the calibrated pixel threshold drew defect masks


def test_calibrate_stores_thresholds_in_the_checkpoint_and_in_an_export(calibrated, tmp_path, capsys):
    work, data, ckpt = calibrated
    copy = tmp_path / ckpt.name
    shutil.copy(ckpt, copy)
    good = data / "weave" / "test" / "good"
    run("test_draem.py", "--checkpoint", copy, "--calibrate", good, "--false_alarm_rate", "0.25", "--device", "cpu")
    out = capsys.readouterr().out
    assert "4 images cannot show a false-alarm rate of at most 25 %: that takes at least 11 good images" in out
    (before, before_info), (after, after_info) = load_checkpoint(ckpt), load_checkpoint(copy)
    scores, maxima = scores_and_maxima(ckpt, load_images(list_images(good), 32))
    expected = calibrate(scores, maxima, 0.25, f"folder {good}")
    assert after_info.calibration == expected  # in place, computed from these good images ...
    assert all(torch.equal(after["reconstructive"][k], v) for k, v in before["reconstructive"].items())  # ... all else kept
    assert after_info.config == before_info.config and after["optimizer"] is not None
    pytest.importorskip("onnxruntime")
    from scoring.model_files import load_onnx
    run("export_draem.py", "--checkpoint", copy, "--out", tmp_path / "m.onnx")
    assert load_onnx(tmp_path / "m.onnx")[1].calibration == expected
    run("test_draem.py", "--checkpoint", tmp_path / "m.onnx", "--calibrate", good, "--false_alarm_rate", "0.5",
        "--device", "cpu")
    stored = load_onnx(tmp_path / "m.onnx")[1]
    assert stored.calibration["false_alarm_rate"] == 0.5 and stored.threshold("image") == stored.calibration["image"]["threshold"]


def test_tiled_onnx_equals_tiled_pytorch(calibrated, calibrated_onnx):
    from scoring.model_files import load_onnx
    work, data, ckpt = calibrated
    images = load_test_set(data, "weave", None).images[:4]  # 160x160: tiles of 32 overlapping by 8
    model, _ = model_from_checkpoint(ckpt)
    exported, _ = load_onnx(calibrated_onnx)
    cpu = torch.device("cpu")
    reference, _ = predict(TiledModel(model, (32, 32), 8, 16), images, cpu, batch_size=1)
    maps, _ = predict(TiledModel(exported, (32, 32), 8, 16), images, cpu, batch_size=1)
    assert maps.shape == (4, 160, 160)
    torch.testing.assert_close(maps, reference, rtol=0, atol=1e-4)


def test_twelve_bit_camera_images_train_and_score_like_their_eight_bit_originals(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    rng = np.random.default_rng(0)
    for path in list_images(data / "weave" / "train" / "good"):  # the training set as a 12-bit camera stores it
        image = cv2.imread(str(path)).astype(np.uint16)
        cv2.imwrite(str(path.with_suffix(".png")), (image << 4) | rng.integers(0, 16, image.shape, dtype=np.uint16))
    run("train_draem.py", "--obj_id", "weave", "--data_path", data, "--epochs", "1", "--eval_every", "-1", *TINY,
        "--checkpoint_path", tmp_path / "checkpoints", "--log_path", tmp_path / "logs")
    ckpt = next((tmp_path / "checkpoints").glob("*.pt"))
    assert load_checkpoint(ckpt)[1].bit_depth == 12  # auto, from the largest value
    original = cv2.imread(str(data / "weave" / "test" / "stain" / "000.png"))
    folder = tmp_path / "pair"
    folder.mkdir()
    cv2.imwrite(str(folder / "eight.png"), original)
    cv2.imwrite(str(folder / "twelve.png"), (original.astype(np.uint16) << 4) | 9)
    cv2.imwrite(str(folder / "full.png"), (original.astype(np.uint16) << 8) | 200)
    run("test_draem.py", "--checkpoint", ckpt, "--images", folder, "--out", tmp_path / "out", "--device", "cpu")
    run("test_draem.py", "--checkpoint", ckpt, "--images", folder / "full.png", "--bit_depth", "16", "--out",
        tmp_path / "full", "--device", "cpu")
    score = {r["path"].rsplit("/", 1)[-1]: float(r["score"]) for name in ("out", "full")
             for r in csv.DictReader(open(tmp_path / name / "scores.csv"))}
    assert score["twelve.png"] == pytest.approx(score["eight.png"], abs=1e-4)
    assert score["full.png"] == pytest.approx(score["eight.png"], abs=1e-4)  # full range: the top byte, as before


@pytest.mark.parametrize("flags,expect", [
    (["--calibrate", "{good}", "--false_alarm_rate", "0"], "argument --false_alarm_rate: expected a share of good "
                                                            "images in (0, 1)"),
    (["--calibrate", "{good}", "--false_alarm_rate", "1.5"], "argument --false_alarm_rate"),
    (["--calibrate", "{broken}"], "error: --calibrate {broken}: none of the 1 image(s) could be read"),
    (["--calibrate", "{empty}"], "error: --calibrate {empty} holds no images"),
    (["--images", "{good}", "--tile", "100"], "argument --tile: expected N or HxW"),
    (["--images", "{good}", "--tile", "256"], "could be read or scored ({good}/000.png (160x160) is smaller than --tile 256x256"),
    (["--data_path", "{data}", "--tile", "256"], "error: --tile 256x256 is larger than the test images (160x160)"),
    (["--images", "{good}", "--tile", "32", "--tile_overlap", "32"], "error: --tile_overlap 32 is not smaller"),
    (["--images", "{good}", "--bit_depth", "9"], "argument --bit_depth: expected auto or one of 8, 10, 12, 14, 16")])
def test_bad_scoring_input_gets_one_line(calibrated, tmp_path, capsys, flags, expect):
    import test_draem
    work, data, ckpt = calibrated
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_text("not a png")
    (tmp_path / "empty").mkdir()
    places = {"good": data / "weave" / "test" / "good", "broken": tmp_path / "broken", "empty": tmp_path / "empty",
              "data": data}
    with pytest.raises(SystemExit) as stopped:
        test_draem.main(test_draem.parse_args(["--checkpoint", str(ckpt), "--out", str(tmp_path / "o"), "--device", "cpu",
                         *[f.format(**places) for f in flags]]))
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and expect.format(**places) in err and "Traceback" not in err
    assert load_checkpoint(ckpt)[1].calibration["false_alarm_rate"] == 0.4  # nothing stored by a failed run
