"""Scoring for people, end to end: thresholds in checkpoints, --threshold auto, streaming inference with
masks and regions, per-defect-type rows, seed summaries and report.html (parsed, and rendered in Chromium)."""
import csv
import shutil
import statistics
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import cv2
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from helpers import TINY, call_script, read_json, tiny_dataset
from scoring.metrics import METRICS


def train(work: Path, data: Path, *extra) -> Path:
    call_script("train_draem.py", "--obj_id", "weave", "--data_path", data, "--anomaly_source_path", data / "sources",
               "--epochs", "2", *TINY, *extra, cwd=work)
    return max((work / "checkpoints").rglob("*.pt"), key=lambda p: p.stat().st_mtime)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """Two runs that differ only in --seed, side by side in one folder under their own names, scored together."""
    work = tmp_path_factory.mktemp("report")
    data = tiny_dataset(work / "data")
    runs = [train(work, data, "--seed", "0"), train(work, data, "--seed", "1")]
    assert runs[0] != runs[1] and "seed0" in runs[0].name and "seed1" in runs[1].name
    call_script("test_draem.py", "--checkpoint", work / "checkpoints", "--data_path", data, "--out", work / "res",
               "--device", "cpu", cwd=work)
    return work, data, runs


def test_training_stores_the_operating_points_that_scoring_reports(scored):
    work, _, runs = scored
    stored = torch.load(runs[0], weights_only=True)["metrics"]["operating_points"]
    reported = read_json(work / "res" / "results.json")["runs"][runs[0].stem]["operating_points"]
    for kind in ("image", "pixel"):
        assert stored[kind]["threshold"] == pytest.approx(reported[kind]["threshold"], abs=1e-7)
    image = reported["image"]
    assert {"precision", "recall", "f1", "threshold_no_escape", "false_alarm_rate", "threshold_no_false_alarm",
            "escape_rate"} <= set(image)
    # Max F1 never sits below the no-escape threshold, and meets it exactly when it misses nothing; it is at
    # or above the no-false-alarm threshold exactly when it raises no false alarm.
    assert image["threshold"] >= image["threshold_no_escape"]
    assert (image["recall"] == 1) == (image["threshold"] == image["threshold_no_escape"])
    assert (image["precision"] == 1) == (image["threshold"] >= image["threshold_no_false_alarm"])


def test_per_defect_type_image_auroc_equals_scikit_learn(scored):
    work, _, runs = scored
    run = read_json(work / "res" / "results.json")["runs"][runs[1].stem]
    rows = list(csv.DictReader(open(work / "res" / f"scores_{runs[1].stem}.csv")))
    for defect, result in run["per_defect_type"].items():
        subset = [r for r in rows if r["defect_type"] in (defect, "good")]
        labels = [r["defect_type"] == defect for r in subset]
        expected = roc_auc_score(labels, [float(r["score"]) for r in subset])
        assert result["image_auroc"] == pytest.approx(expected, abs=1e-12), defect  # the CSV holds every digit of the float32 scores
        assert result["images"] == sum(labels) and 0 <= result["pixel_ap"] <= 1
    assert {r["verdict"] for r in rows} <= {"OK", "ANOMALY"}


def test_seed_summary_is_mean_and_sample_std(scored):
    work, _, runs = scored
    results = read_json(work / "res" / "results.json")
    [row] = results["seeds"]
    assert row["category"] == "weave" and sorted(row["seeds"]) == [0, 1]
    for m in METRICS:
        values = [results["runs"][run][m] for run in (runs[0].stem, runs[1].stem)]
        assert row[m]["mean"] == pytest.approx(statistics.fmean(values))
        assert row[m]["std"] == pytest.approx(statistics.stdev(values))
    markdown = (work / "res" / "results.md").read_text()
    assert "±" in markdown and "Per defect type" in markdown and "no-escape threshold" in markdown


class ReportParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources, self.cases = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.sources.append(attrs["src"])
        if tag == "figure":
            self.cases.append(attrs)


def test_report_links_exist_and_lists_each_test_image_once_errors_first_by_score(scored):
    work, data, _ = scored
    parser = ReportParser()
    parser.feed((work / "res" / "report.html").read_text())
    assert parser.sources and not [s for s in parser.sources if "://" in s or s.startswith("/")]  # relative only
    for source in parser.sources:
        assert (work / "res" / unquote(source)).is_file(), source
    test_images = sorted(str(p) for p in (data / "weave" / "test").rglob("*.png"))
    for run in range(2):  # each run's gallery: every test image once
        cases = parser.cases[run * len(test_images):(run + 1) * len(test_images)]
        assert sorted(c["data-path"] for c in cases) == test_images
        keys = [({"missed defect": 0, "false alarm": 1, "": 2}[c["data-error"]], -float(c["data-score"])) for c in cases]
        assert keys == sorted(keys)
    assert len(parser.cases) == 2 * len(test_images)


def test_report_renders_in_headless_chromium(scored, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed")
    work, _, _ = scored
    shot = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2600", f"--screenshot={shot}",
                    (work / "res" / "report.html").as_uri()], capture_output=True, timeout=120, check=True)
    picture = cv2.imread(str(shot))
    assert picture is not None and picture.shape[:2] == (2600, 1200)
    assert picture.std() > 20  # text, plots and panels, not a blank page
    assert (picture.reshape(-1, 3).std(axis=1) > 40).mean() > 0.01  # and colour: the plots and heatmaps drew


def make_images(folder: Path, data: Path, sizes: list[tuple[int, int]]) -> None:
    folder.mkdir(parents=True)
    source = cv2.imread(str(data / "weave" / "test" / "hole" / "000.png"))
    for i, (h, w) in enumerate(sizes):
        cv2.imwrite(str(folder / f"img{i}.png"), cv2.resize(source, (w, h)))


def test_streaming_inference_with_a_corrupt_file_writes_masks_and_regions(scored, tmp_path):
    work, data, runs = scored
    sizes = [(50, 70), (97, 33), (128, 128), (64, 96), (40, 40)]
    make_images(tmp_path / "mine", data, sizes)
    (tmp_path / "mine" / "broken.png").write_bytes(b"not an image")
    proc = call_script("test_draem.py", "--checkpoint", runs[0], "--images", tmp_path / "mine", "--out",
                      tmp_path / "out", "--batch_size", "2", "--threshold", "auto", "--pixel_threshold", "0.3",
                      "--device", "cpu", cwd=work)
    assert "broken.png" in proc.stderr and "Traceback" not in proc.stderr
    rows = {Path(r["path"]).name: r for r in csv.DictReader(open(tmp_path / "out" / "scores.csv"))}
    assert len(rows) == 6 and "cannot decode" in rows["broken.png"]["error"] and not rows["broken.png"]["score"]
    stored = torch.load(runs[0], weights_only=True)["metrics"]["operating_points"]["image"]["threshold"]
    regions = list(csv.DictReader(open(tmp_path / "out" / "regions.csv")))
    for i, (h, w) in enumerate(sizes):
        row = rows[f"img{i}.png"]
        # scores are float32, written with the 9 digits that give back the same float32
        assert row["verdict"] == ("ANOMALY" if np.float32(row["score"]) >= np.float32(stored) else "OK")
        mask = cv2.imread(row["mask"], cv2.IMREAD_GRAYSCALE)
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}  # at the original resolution
        count = cv2.connectedComponents((mask > 0).astype(np.uint8), connectivity=8)[0] - 1
        mine = [r for r in regions if Path(r["path"]).name == f"img{i}.png"]
        assert int(row["regions"]) == count == len(mine)
        assert sum(int(r["area"]) for r in mine) == int((mask > 0).sum())
        assert cv2.imread(row["panel"]).shape[0] > h  # a labelled panel at the original height, plus its header


def test_unreadable_folder_and_threshold_auto_without_stored_thresholds(scored, tmp_path):
    work, data, runs = scored
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_text("x")
    proc = call_script("test_draem.py", "--checkpoint", runs[0], "--images", tmp_path / "junk", "--out",
                      tmp_path / "o1", "--device", "cpu", cwd=work, check=False)
    assert proc.returncode == 2 and "none of the 1 image(s) could be read" in proc.stderr
    assert "Traceback" not in proc.stderr
    bare = train(tmp_path, data, "--eval_every", "-1")  # no test-set scoring: no thresholds stored
    make_images(tmp_path / "mine", data, [(64, 64)])
    for flag in ("--threshold", "--pixel_threshold"):
        proc = call_script("test_draem.py", "--checkpoint", bare, "--images", tmp_path / "mine", "--out", tmp_path / "o2",
                          flag, "auto", "--device", "cpu", cwd=tmp_path, check=False)
        assert proc.returncode == 2 and f"{flag} auto" in proc.stderr and "give a number" in proc.stderr
        assert proc.stderr.count("\n") == 1
    call_script("test_draem.py", "--checkpoint", bare, "--images", tmp_path / "mine", "--out", tmp_path / "o3",
               "--threshold", "0.43", "--device", "cpu", cwd=tmp_path)
    row = next(csv.DictReader(open(tmp_path / "o3" / "scores.csv")))
    assert row["verdict"] == ("ANOMALY" if np.float32(row["score"]) >= 0.43 else "OK") and row["mask"] == ""
    proc = call_script("test_draem.py", "--checkpoint", bare, "--images", tmp_path / "mine", "--out", tmp_path / "o4",
                      "--threshold", "abc", "--device", "cpu", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "--threshold" in proc.stderr


def test_a_test_set_is_judged_at_the_threshold_asked_for_and_says_where_it_came_from(scored, tmp_path):
    work, data, runs = scored
    # default: the stored max-F1 threshold, tuned on this very test set: named, and flagged as optimistic
    default = read_json(work / "res" / "results.json")["runs"][runs[0].stem]["thresholds"]["image"]
    stored = torch.load(runs[0], weights_only=True)["metrics"]["operating_points"]["image"]["threshold"]
    assert default == {"value": stored, "source": "max F1 on the labelled test set", "optimistic": True}
    assert "Optimistic:" in (work / "res" / "report.html").read_text()
    goods = len(list((data / "weave" / "test" / "good").glob("*.png")))
    defects = len(list((data / "weave" / "test").rglob("*.png"))) - goods
    for value, expected in (("0", {"false alarm": goods, "missed defect": 0}),
                            ("1.5", {"false alarm": 0, "missed defect": defects})):
        out = tmp_path / value
        call_script("test_draem.py", "--checkpoint", runs[0], "--data_path", data, "--out", out, "--threshold", value,
                   "--pixel_threshold", "0.5", "--device", "cpu", "--no-save_images", cwd=work)
        used = read_json(out / "results.json")["runs"][runs[0].stem]["thresholds"]
        assert used["image"] == {"value": float(value), "source": f"--threshold {float(value):g}", "optimistic": False}
        assert used["pixel"]["value"] == 0.5
        parser = ReportParser()
        parser.feed((out / "report.html").read_text())
        errors = [case["data-error"] for case in parser.cases]
        assert {kind: errors.count(kind) for kind in expected} == expected, value
        assert "Optimistic:" not in (out / "report.html").read_text()
        verdicts = {r["verdict"] for r in csv.DictReader(open(out / f"scores_{runs[0].stem}.csv"))}
        assert verdicts == {"ANOMALY" if value == "0" else "OK"}
    proc = call_script("test_draem.py", "--checkpoint", runs[0], "--data_path", data, "--out", tmp_path / "c",
                      "--threshold", "calibrated", "--device", "cpu", cwd=work, check=False)
    assert proc.returncode == 2 and "holds no calibrated image threshold" in proc.stderr


def test_a_threshold_the_file_cannot_give_fails_before_the_evaluation(scored, tmp_path, monkeypatch):
    import test_draem
    from scoring import results
    work, data, runs = scored
    evaluated, real = [], results.predict
    monkeypatch.setattr(results, "predict", lambda *a, **k: evaluated.append(1) or real(*a, **k))
    with pytest.raises(SystemExit) as stopped:
        test_draem.main(test_draem.parse_args(["--checkpoint", str(runs[0]), "--data_path", str(data), "--out", str(tmp_path / "c"),
                         "--pixel_threshold", "calibrated", "--device", "cpu"]))
    assert stopped.value.code == 2 and evaluated == []
    test_draem.main(test_draem.parse_args(["--checkpoint", str(runs[0]), "--data_path", str(data), "--out", str(tmp_path / "d"),
                     "--device", "cpu", "--no-save_images"]))
    assert evaluated == [1]  # the spy does see an evaluation when one runs
