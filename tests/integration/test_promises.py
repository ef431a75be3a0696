"""What the README promises, end to end through the scripts, each checked against an independent
computation: every metric against scikit-learn (and AUPRO against its definition) from the written scores
and the checkpoint's maps, the thresholds --images uses by default, nested folders, a single file, a
stopped streamed run, --obj_id overriding the checkpoint's category, and --demo."""
import csv
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from data_loader import load_test_set
from scoring.evaluate import predict
from training.checkpoint import model_from_checkpoint
from helpers import ROOT, call_script, read_json
from scoring.detector import resize_map
from scoring.metrics import METRICS
from test_metrics import brute_force_aupro


def f1_max(labels, scores) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    return max(2 * p * r / (p + r) for p, r in zip(precision, recall) if p + r > 0)


def test_every_metric_equals_scikit_learn_on_the_written_scores_and_the_maps(tiny_run):
    work, data, ckpt = tiny_run
    run = read_json(work / "res" / "results.json")["runs"][ckpt.stem]
    rows = list(csv.DictReader(open(work / "res" / f"scores_{ckpt.stem}.csv")))
    labels, scores = np.array([int(r["label"]) for r in rows]), np.array([float(r["score"]) for r in rows])
    types = np.array([r["defect_type"] for r in rows])
    model, _ = model_from_checkpoint(ckpt)
    test_set = load_test_set(data, "weave", 32)
    assert [str(p) for p in test_set.paths] == [r["path"] for r in rows]
    maps = predict(model, test_set.images, torch.device("cpu"))[0].numpy().astype(np.float64)
    masks = test_set.masks[:, 0].numpy() >= 128
    expected = {"image_auroc": roc_auc_score(labels, scores), "image_ap": average_precision_score(labels, scores),
                "image_f1_max": f1_max(labels, scores), "pixel_auroc": roc_auc_score(masks.ravel(), maps.ravel()),
                "pixel_ap": average_precision_score(masks.ravel(), maps.ravel()),
                "pixel_f1_max": f1_max(masks.ravel(), maps.ravel()), "aupro": brute_force_aupro(maps, masks, 0.3)}
    assert set(expected) == set(METRICS)
    for metric, value in expected.items():
        assert run[metric] == pytest.approx(value, abs=1e-6), metric
    for defect, row in run["per_defect_type"].items():
        keep = (types == defect) | (types == "good")
        assert row["image_auroc"] == pytest.approx(roc_auc_score(labels[keep], scores[keep]), abs=1e-9), defect
        assert row["pixel_ap"] == pytest.approx(
            average_precision_score(masks[keep].ravel(), maps[keep].ravel()), abs=1e-6), defect


def make_folder(root: Path, data: Path, names: list[str]) -> None:
    source = cv2.imread(str(data / "weave" / "test" / "hole" / "000.png"))
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / name), cv2.resize(source, (40 + 8 * i, 48)))


def test_images_default_to_the_stored_thresholds_and_keep_nested_folders(tiny_run, tmp_path):
    work, data, ckpt = tiny_run
    names = ["a.png", "line1/b.png", "line2/cam/c.png"]
    make_folder(tmp_path / "mine", data, names)
    proc = call_script("test_draem.py", "--checkpoint", ckpt, "--images", tmp_path / "mine", "--out", tmp_path / "out",
                       "--device", "cpu", cwd=work)  # no --threshold, no --pixel_threshold: auto
    points = torch.load(ckpt, weights_only=True)["metrics"]["operating_points"]
    image_threshold, pixel_threshold = points["image"]["threshold"], points["pixel"]["threshold"]
    assert f"image threshold: {image_threshold}" in proc.stdout and f"pixel threshold: {pixel_threshold}" in proc.stdout
    rows = {Path(r["path"]).relative_to(tmp_path / "mine").as_posix(): r
            for r in csv.DictReader(open(tmp_path / "out" / "scores.csv"))}
    assert sorted(rows) == sorted(names)
    model, info = model_from_checkpoint(ckpt)
    for name in names:
        row, stem = rows[name], tmp_path / "out" / name[:-4]
        assert row["verdict"] == ("ANOMALY" if np.float32(row["score"]) >= np.float32(image_threshold) else "OK")
        assert Path(row["panel"]) == stem.with_name(stem.name + ".png") and Path(row["panel"]).is_file()
        # the mask is the map, resized to the image, at the stored pixel threshold
        image = cv2.imread(str(tmp_path / "mine" / name))
        tensor = torch.from_numpy(cv2.resize(image, (32, 32))).permute(2, 0, 1)[None]
        amap = predict(model, tensor, torch.device("cpu"))[0][0].numpy()
        expected = resize_map(amap, *image.shape[:2]) >= pixel_threshold
        mask = cv2.imread(row["mask"], cv2.IMREAD_GRAYSCALE)
        assert Path(row["mask"]) == stem.with_name(stem.name + "_mask.png")
        assert np.array_equal(mask > 0, expected), name
    # a single file: outputs under its own name
    call_script("test_draem.py", "--checkpoint", ckpt, "--images", tmp_path / "mine" / "line1" / "b.png", "--out",
                tmp_path / "one", "--device", "cpu", cwd=work)
    assert (tmp_path / "one" / "b.png").is_file() and (tmp_path / "one" / "b_mask.png").is_file()
    assert len(list(csv.DictReader(open(tmp_path / "one" / "scores.csv")))) == 1


def test_a_stopped_streamed_run_keeps_the_rows_it_wrote(tiny_run, tmp_path):
    work, data, ckpt = tiny_run
    make_folder(tmp_path / "many", data, [f"{i:03d}.png" for i in range(100)])
    proc = subprocess.Popen([sys.executable, str(ROOT / "test_draem.py"), "--checkpoint", str(ckpt), "--images",
                             str(tmp_path / "many"), "--out", str(tmp_path / "out"), "--batch_size", "2",
                             "--device", "cpu"], cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    scores = tmp_path / "out" / "scores.csv"
    first_seen, deadline = None, time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if scores.is_file() and scores.read_text().count("\n") >= 2:  # the header and a first row
            first_seen = scores.read_text().count("\n") - 1
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it was stopped"
    # Rows reach the disk chunk by chunk (2 images), not when an 8 KiB buffer happens to fill (about 35 rows).
    assert first_seen is not None and first_seen <= 16, f"the first rows appeared only after {first_seen} images"
    text = scores.read_text()
    rows = list(csv.DictReader(open(scores)))
    assert text.endswith("\n") and 2 <= len(rows) < 100 and len(rows) % 2 == 0  # whole chunks, as written
    assert all(r["score"] and r["verdict"] in ("OK", "ANOMALY") and Path(r["panel"]).is_file() for r in rows)


def test_obj_id_overrides_the_checkpoint_category(tiny_run, tmp_path):
    work, data, ckpt = tiny_run
    shutil.copytree(data / "weave", tmp_path / "d" / "other")
    call_script("test_draem.py", "--checkpoint", ckpt, "--data_path", tmp_path / "d", "--obj_id", "other", "--out",
                tmp_path / "res", "--device", "cpu", "--no-save_images", cwd=work)
    run = read_json(tmp_path / "res" / "results.json")["runs"][ckpt.stem]
    assert run["category"] == "other"
    rows = list(csv.DictReader(open(tmp_path / "res" / f"scores_{ckpt.stem}.csv")))
    assert rows and all(f"{tmp_path / 'd' / 'other'}" in r["path"] for r in rows)
    own = read_json(work / "res" / "results.json")["runs"][ckpt.stem]
    assert {m: run[m] for m in METRICS} == pytest.approx({m: own[m] for m in METRICS}, abs=1e-9)  # same images


def test_demo_end_to_end(tmp_path):
    proc = call_script("train_draem.py", "--demo", "--epochs", "1", "--image_size", "32", "--base_width", "4",
                       "--seg_base_width", "4", "--device", "cpu", cwd=tmp_path)
    assert (tmp_path / "datasets" / "demo" / ".complete").is_file()
    [ckpt] = (tmp_path / "checkpoints").glob("*.pt")
    results = read_json(tmp_path / "results" / "demo" / "results.json")
    assert list(results["runs"]) == [ckpt.stem] and results["runs"][ckpt.stem]["category"] == "weave"
    assert results["runs"][ckpt.stem]["images"] == 40  # 16 good + 3 defect types x 8
    assert (tmp_path / "results" / "demo" / "report.html").is_file()
    assert len(list((tmp_path / "results" / "demo" / "images").rglob("*.png"))) == 40
    assert "demo done" in proc.stdout


def test_a_folder_of_checkpoints_skips_what_it_cannot_score_and_keeps_what_it_scored(tiny_run, tmp_path, capsys,
                                                                                      monkeypatch):
    """The demo's weave checkpoint beside MVTec ones: a category without a test set under --data_path, and a
    damaged file, are skipped with one line each; the others' results are written; the exit status is 1."""
    import test_draem
    from scoring import results as results_module
    from training.checkpoint import save_training
    work, data, ckpt = tiny_run
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "a_damaged.pt").write_bytes(ckpt.read_bytes()[:1000])
    model, info = model_from_checkpoint(ckpt)
    save_training(folder / "b_zebra.pt", model, info.config | {"category": "zebra"})
    shutil.copy(ckpt, folder / "c_weave.pt")
    shutil.copy(ckpt, folder / "d_weave.pt")
    args = ["--checkpoint", str(folder), "--data_path", str(data), "--device", "cpu", "--no-save_images"]
    with pytest.raises(SystemExit) as stopped:
        test_draem.main(test_draem.parse_args(args + ["--out", str(tmp_path / "res")]))
    err = capsys.readouterr().err
    assert stopped.value.code == 1
    skipped_lines = [line for line in err.splitlines() if line.startswith("skipped ")]
    assert len(skipped_lines) == 2 and "a_damaged.pt" in skipped_lines[0] and "truncated" in skipped_lines[0]
    assert "b_zebra.pt" in skipped_lines[1] and "zebra does not exist" in skipped_lines[1] and "Traceback" not in err
    written = read_json(tmp_path / "res" / "results.json")
    assert list(written["runs"]) == ["c_weave", "d_weave"] and len(written["skipped"]) == 2
    assert (tmp_path / "res" / "report.html").is_file() and "c_weave" in (tmp_path / "res" / "results.md").read_text()
    # stopped half-way (Ctrl-C while the second weave run is evaluated): the first run's results are written
    real_measure, calls = results_module.measure, []

    def interrupted_on_the_second_call(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_measure(*a, **k)
    monkeypatch.setattr(results_module, "measure", interrupted_on_the_second_call)
    with pytest.raises(KeyboardInterrupt):
        test_draem.main(test_draem.parse_args(args + ["--out", str(tmp_path / "stopped")]))
    assert len(calls) == 2 and list(read_json(tmp_path / "stopped" / "results.json")["runs"]) == ["c_weave"]
