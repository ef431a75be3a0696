"""The public data sets and any folders, end to end: a prepared miniature of each data set trains one epoch with
the README's command (--obj_id -1 over the data set) and one test_draem.py call scores them all, each on the data set
it was trained on, into results.md grouped by data set; a JSON description of folders trains and scores exactly as
the same images in the MVTec layout."""
import csv
import json
import math

import cv2
import numpy as np
import pytest
import tifffile
import torch
from sklearn.metrics import auc, precision_recall_curve

import archives
import test_draem
import test_protocols
import train_draem
from data_loader import load_test_set
from helpers import TINY, call_script, read_json, run_script, tiny_dataset
from scoring import map_files
from scoring.detector import Scoring
from scoring.protocols import PROTOCOLS, au_spro, loco_defects, loco_metrics, protocol_for
from training.checkpoint import load_checkpoint

CATEGORIES = {"visa": {"candle", "pcb1"}, "mvtec_ad2": {"can"}, "loco": {"breakfast_box"}, "btad": {"01", "03"},
              "ksdd2": {"ksdd2"}, "mpdd": {"bracket_black"}}


def prepared_data_sets_train_and_score(tmp_path) -> None:
    """Each miniature, prepared, trains with the README's command and scores on its own data set."""
    datasets = tmp_path / "datasets"
    for name, build in archives.BUILDERS.items():
        run_script("scripts/prepare_data.py", name, build(tmp_path / "archives"), "--out", datasets, cwd=tmp_path)
    archives.mpdd(tmp_path).rename(datasets / "mpdd")  # published in the MVTec layout: used as it is
    for name in CATEGORIES:  # in this process: a subprocess each would spend seconds importing torch
        proc = call_script("train_draem.py", "--obj_id", "-1", "--data_path", f"datasets/{name}", "--epochs", "1",
                           *TINY, cwd=tmp_path)
        assert f"trained {len(CATEGORIES[name])} categor" in proc.stdout, f"{name}:\n{proc.stdout[-2000:]}"
    # Validation images ship with MVTec AD 2 and LOCO: the thresholds are calibrated on them, nothing held out.
    for name, category in (("mvtec_ad2", "can"), ("loco", "breakfast_box")):
        [path] = (tmp_path / "checkpoints").glob(f"DRAEM_{category}_*.pt")
        info = load_checkpoint(path)[1]
        assert info.config["calibration_split"] == 0 and "held_out" not in info.calibration
        assert info.calibration["images"] == 2
        assert info.calibration["source"] == f"the 2 validation images in datasets/{name}/{category}/validation/good"
    [btad] = (tmp_path / "checkpoints").glob("DRAEM_01_*.pt")
    assert load_checkpoint(btad)[1].calibration == {}  # a labelled test set and no validation images: none

    call_script("test_draem.py", "--checkpoint", "checkpoints", "--out", "res", "--no-save_images", "--device", "cpu",
                cwd=tmp_path)  # no --data_path: each checkpoint's own
    results = read_json(tmp_path / "res" / "results.json")
    scored = {}
    for run in results["runs"].values():
        scored.setdefault(run["data_set"], set()).add(run["category"])
    assert scored == CATEGORIES
    markdown = (tmp_path / "res" / "results.md").read_text()
    sections = {part.split("\n", 1)[0]: part for part in markdown.split("## DRAEM on ")[1:]}
    assert set(sections) == set(CATEGORIES)
    for name, part in sections.items():
        rows = [line.split(" | ")[1] for line in part.split("Mean per configuration")[0].splitlines()
                if line.startswith("| DRAEM_")]
        assert set(rows) == CATEGORIES[name]  # each data set's table holds its categories alone
    assert {row["data_set"]: len(row["runs"]) for row in results["means"]} == {k: len(v) for k, v in CATEGORIES.items()}


def test_a_json_description_trains_and_scores_like_the_same_images_in_the_mvtec_layout(tmp_path):
    data = tiny_dataset(tmp_path / "mvtec")
    weave = data / "weave"
    defects = sorted(d.name for d in (weave / "test").iterdir() if d.name != "good")
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "line3.json").write_text(json.dumps({  # the MVTec folders themselves, named: nothing copied
        "train": "../mvtec/weave/train/good", "test_good": "../mvtec/weave/test/good",
        "test_defect": [f"../mvtec/weave/test/{d}" for d in defects],
        "masks": [f"../mvtec/weave/ground_truth/{d}" for d in defects]}))
    checkpoints = {}
    for data_path, category in ((parts, "line3"), (data, "weave")):
        train_draem.main(train_draem.parse_args(["--data_path", str(data_path), "--obj_id", category, "--epochs", "2", "--checkpoint_path",
                          str(tmp_path / "ck"), "--log_path", str(tmp_path / "logs"), *TINY]))
        [checkpoints[category]] = (tmp_path / "ck").glob(f"DRAEM_{category}_*.pt")
    (described, described_info), (published, published_info) = (load_checkpoint(checkpoints[c])
                                                                for c in ("line3", "weave"))
    assert "image_auroc" in described_info.metrics and described_info.metrics == published_info.metrics
    for net in ("reconstructive", "discriminative"):  # the same images in the same order: the same weights
        ours, theirs = described[net], published[net]
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    test_draem.main(test_draem.parse_args(["--checkpoint", str(checkpoints["line3"]), "--out", str(tmp_path / "res_json"),
                     "--no-save_images", "--device", "cpu"]))  # the recorded description
    test_draem.main(test_draem.parse_args(["--checkpoint", str(checkpoints["weave"]), "--data_path", str(data), "--out",
                     str(tmp_path / "res_mvtec"), "--no-save_images", "--device", "cpu"]))
    [by_json], [by_mvtec] = (read_json(tmp_path / r / "results.json")["runs"].values() for r in ("res_json", "res_mvtec"))
    metrics = [m for m in by_mvtec if m in ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro")]
    assert len(metrics) == 5 and {m: by_json[m] for m in metrics} == {m: by_mvtec[m] for m in metrics}
    assert by_json["per_defect_type"] == by_mvtec["per_defect_type"] and by_json["data_set"] == "parts"


def benchmark_columns(tmp_path, results: dict) -> None:
    """Each benchmark's own columns, named as its authors name them, in results.json, results.md and the report;
    KolektorSDD2's AP_det is scikit-learn's auc(recall, precision) of the per-image scores written beside it."""
    for run, result in results["runs"].items():
        protocol = protocol_for(result["data_set"])
        assert result["protocol"] == protocol and set(result["protocol_metrics"]) == set(PROTOCOLS[protocol]), run
        assert not any(math.isnan(v) for v in result["protocol_metrics"].values()), (run, result["protocol_metrics"])
    for row in results["means"]:
        assert set(row["protocol_metrics"]) == set(PROTOCOLS[protocol_for(row["data_set"])])
    [(run, ksdd2)] = [(k, r) for k, r in results["runs"].items() if r["data_set"] == "ksdd2"]
    with open(tmp_path / "res" / f"scores_{run}.csv") as f:
        rows = list(csv.DictReader(f))
    precision, recall, _ = precision_recall_curve([int(r["label"]) for r in rows], [float(r["score"]) for r in rows])
    assert ksdd2["protocol_metrics"]["ap_det"] == pytest.approx(auc(recall, precision), abs=1e-6)
    markdown, report = (tmp_path / "res" / "results.md").read_text(), (tmp_path / "res" / "report.html").read_text()
    for protocol in ("mvtec_ad2", "loco", "ksdd2", "visa"):
        head = "| run | category | " + " | ".join(PROTOCOLS[protocol].values()) + " |"
        assert head in markdown and f"--protocol {protocol}" in markdown
        assert f'id="protocol-{protocol}"' in report and all(f"<th>{c}</th>" in report for c in PROTOCOLS[protocol].values())


def mvtec_ad2_upload(tmp_path, monkeypatch) -> None:
    """test_private and test_private_mixed as MVTec's server takes them: float16 single-channel TIFFs at each image's
    own size, 0/255 PNGs at the validation threshold, nothing else (no test_public); the counts checked."""
    [checkpoint] = (tmp_path / "checkpoints").glob("DRAEM_can_*.pt")
    proc = call_script("test_draem.py", "--checkpoint", checkpoint, "--submission", "upload", "--device", "cpu",
                       cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "not ready: can/test_private: 2 images, MVTec's checker expects 321" in proc.stderr
    threshold = float(proc.stdout.split("threshold ")[1].split()[0])
    published = tmp_path / "archives" / "mvtec_ad_2" / "can"
    upload = tmp_path / "upload"
    assert {p.relative_to(upload).as_posix() for p in upload.glob("*/*/*")} == {
        f"{top}/can/{split}" for top in ("anomaly_images", "anomaly_images_thresholded")
        for split in ("test_private", "test_private_mixed")}
    for split in ("test_private", "test_private_mixed"):
        for image in sorted((published / split).iterdir()):
            with tifffile.TiffFile(upload / "anomaly_images" / "can" / split / f"{image.stem}.tiff") as tif:
                assert tif.pages[0].dtype == np.float16 and tif.pages[0].samplesperpixel == 1
                anomaly_map = tif.pages[0].asarray().astype(np.float32)
            thresholded = cv2.imread(str(upload / "anomaly_images_thresholded" / "can" / split / f"{image.stem}.png"),
                                     cv2.IMREAD_UNCHANGED)
            size = cv2.imread(str(image)).shape[:2]
            assert anomaly_map.shape == size and thresholded.shape == size and thresholded.dtype == np.uint8
            assert set(np.unique(thresholded)) <= {0, 255}
            tolerance = 2e-3  # float16 rounding of the map against the float32 threshold
            assert (anomaly_map[thresholded == 255] >= threshold - tolerance).all()
            assert (anomaly_map[thresholded == 0] < threshold + tolerance).all()
    assert (tmp_path / "upload" / "anomaly_images" / "can" / "test_private_mixed" / "001_overexposed.tiff").exists()
    again = call_script("test_draem.py", "--checkpoint", checkpoint, "--submission", "upload", "--device", "cpu",
                        cwd=tmp_path, check=False)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "not empty" in again.stderr
    monkeypatch.setitem(map_files.MVTEC_AD2_COUNTS, "can", 2)  # a miniature's counts: now it matches the checker
    monkeypatch.chdir(tmp_path)
    assert map_files.write_submission([checkpoint], None, tmp_path / "upload2", torch.device("cpu"), Scoring())


def loco_tiff_maps(tmp_path) -> None:
    """Maps for MVTec LOCO AD's own evaluation script, at the data set's image size; our sPRO on them, with the
    archive's mask channels, equals the definition computed here."""
    [checkpoint] = (tmp_path / "checkpoints").glob("DRAEM_breakfast_box_*.pt")
    call_script("test_draem.py", "--checkpoint", checkpoint, "--tiff_maps", "maps", "--out", "res_loco",
                "--no-save_images", "--device", "cpu", cwd=tmp_path)
    published = tmp_path / "archives" / "mvtec_loco_anomaly_detection" / "breakfast_box"
    test_set = load_test_set(tmp_path / "datasets" / "loco", "breakfast_box", (24, 40))
    maps = []
    for path, kind in zip(test_set.paths, test_set.defect_types):
        with tifffile.TiffFile(tmp_path / "maps" / "breakfast_box" / "test" / kind / f"{path.stem}.tiff") as tif:
            assert tif.pages[0].dtype == np.float32
            maps.append(tif.pages[0].asarray())
    maps = np.stack(maps)
    assert maps.shape[1:] == (24, 40) == cv2.imread(str(test_set.paths[0])).shape[:2]
    config = {e["pixel_value"]: e for e in archives.LOCO_DEFECTS}
    structural = [i for i, t in enumerate(test_set.defect_types) if t in ("good", "structural_anomalies")]
    reference = []
    for i in structural:
        if test_set.defect_types[i] == "good":
            continue
        for channel in sorted((published / "ground_truth" / "structural_anomalies" / test_set.paths[i].stem).iterdir()):
            raw = cv2.imread(str(channel), cv2.IMREAD_GRAYSCALE)
            entry, region = config[int(raw.max())], raw != 0
            saturation = (int(entry["saturation_threshold"] * region.sum()) if entry["relative_saturation"]
                          else min(entry["saturation_threshold"], region.sum()))
            reference.append((structural.index(i), region, saturation))
    assert maps.std() > 0  # a map of one value would make any two computations agree
    expected = test_protocols.brute_force_au_spro(maps[structural], reference, 0.05)
    ours = loco_metrics(torch.from_numpy(maps), test_set, loco_defects(test_set))["au_spro_structural"]
    assert ours == pytest.approx(expected, abs=1e-9)
    defects = [(image, torch.from_numpy(region), saturation) for image, region, saturation in reference]
    whole = test_protocols.brute_force_au_spro(maps[structural], reference, 1.0)
    assert whole > 0 and au_spro(torch.from_numpy(maps[structural]), defects, 1.0) == pytest.approx(whole, abs=1e-9)


def test_each_prepared_data_set_trains_scores_and_gets_its_benchmarks_own_metrics_and_files(tmp_path, monkeypatch):
    prepared_data_sets_train_and_score(tmp_path)
    benchmark_columns(tmp_path, read_json(tmp_path / "res" / "results.json"))
    mvtec_ad2_upload(tmp_path, monkeypatch)
    loco_tiff_maps(tmp_path)


def test_the_real_magnetic_tiles_get_a_benchmarks_columns_when_asked(tiny_run, shared_data, tmp_path):
    """A labelled set of real defects in the MVTec layout, scored by KolektorSDD2's protocol (--protocol): its columns
    in results.json, results.md and the report; AP_det is auc(recall, precision) of the scores written beside it."""
    _, _, checkpoint = tiny_run
    call_script("test_draem.py", "--checkpoint", checkpoint, "--data_path", shared_data, "--obj_id", "mtd",
                "--protocol", "ksdd2", "--out", "res", "--no-save_images", "--device", "cpu", cwd=tmp_path)
    [(run, result)] = read_json(tmp_path / "res" / "results.json")["runs"].items()
    assert result["data_set"] == "data" and result["protocol"] == "ksdd2" and result["images"] == 173 + 392
    with open(tmp_path / "res" / f"scores_{run}.csv") as f:
        rows = list(csv.DictReader(f))
    precision, recall, _ = precision_recall_curve([int(r["label"]) for r in rows], [float(r["score"]) for r in rows])
    assert result["protocol_metrics"]["ap_det"] == pytest.approx(auc(recall, precision), abs=1e-6)
    assert 0 < result["protocol_metrics"]["ap_loc"] < 1
    assert "| run | category | AP_det | AP_loc |" in (tmp_path / "res" / "results.md").read_text()
    assert "<th>AP_det</th>" in (tmp_path / "res" / "report.html").read_text()
