"""The public data sets and any folders, end to end: a prepared miniature of each data set trains one epoch with
the README's command (--obj_id -1 over the data set) and one test_draem.py call scores them all, each on the data set
it was trained on, into results.md grouped by data set; a JSON description of folders trains and scores exactly as
the same images in the MVTec layout."""
import json
import os
import subprocess
import sys

import torch

import archives
import test_draem
import train_draem
from helpers import ROOT, TINY, read_json, run_script, tiny_dataset
from training.checkpoint import load_checkpoint

CATEGORIES = {"visa": {"candle", "pcb1"}, "mvtec_ad2": {"can"}, "loco": {"breakfast_box"}, "btad": {"01", "03"},
              "ksdd2": {"ksdd2"}, "mpdd": {"bracket_black"}}


def test_each_prepared_data_set_trains_and_scores_with_the_readme_commands(tmp_path):
    datasets = tmp_path / "datasets"
    for name, build in archives.BUILDERS.items():
        run_script("scripts/prepare_data.py", name, build(tmp_path / "archives"), "--out", datasets, cwd=tmp_path)
    archives.mpdd(tmp_path).rename(datasets / "mpdd")  # published in the MVTec layout: used as it is
    # One training process per data set, all at once on one thread each: the cores are shared, not oversubscribed.
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    runs = {name: subprocess.Popen([sys.executable, str(ROOT / "train_draem.py"), "--obj_id", "-1", "--data_path",
                                    f"datasets/{name}", "--epochs", "1", *TINY], cwd=tmp_path, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name in CATEGORIES}
    for name, proc in runs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "Traceback" not in err, f"{name}:\n{out[-2000:]}\n{err[-2000:]}"
        assert f"trained {len(CATEGORIES[name])} categor" in out
    # Validation images ship with MVTec AD 2 and LOCO: the thresholds are calibrated on them, nothing held out.
    for name, category in (("mvtec_ad2", "can"), ("loco", "breakfast_box")):
        [path] = (tmp_path / "checkpoints").glob(f"DRAEM_{category}_*.pt")
        info = load_checkpoint(path).info
        assert info.config["calibration_split"] == 0 and "held_out" not in info.calibration
        assert info.calibration["images"] == 2
        assert info.calibration["source"] == f"the 2 validation images in datasets/{name}/{category}/validation/good"
    [btad] = (tmp_path / "checkpoints").glob("DRAEM_01_*.pt")
    assert load_checkpoint(btad).info.calibration == {}  # a labelled test set and no validation images: none

    proc = run_script("test_draem.py", "--checkpoint", "checkpoints", "--out", "res", "--no-save_images", "--device",
                      "cpu", cwd=tmp_path)  # no --data_path: each checkpoint's own
    assert "Traceback" not in proc.stderr
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
        train_draem.main(["--data_path", str(data_path), "--obj_id", category, "--epochs", "2", "--checkpoint_path",
                          str(tmp_path / "ck"), "--log_path", str(tmp_path / "logs"), *TINY])
        [checkpoints[category]] = (tmp_path / "ck").glob(f"DRAEM_{category}_*.pt")
    described, published = (load_checkpoint(checkpoints[c]) for c in ("line3", "weave"))
    assert "image_auroc" in described.info.metrics and described.info.metrics == published.info.metrics
    for net in ("reconstructive", "discriminative"):  # the same images in the same order: the same weights
        ours, theirs = getattr(described, net), getattr(published, net)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    test_draem.main(["--checkpoint", str(checkpoints["line3"]), "--out", str(tmp_path / "res_json"),
                     "--no-save_images", "--device", "cpu"])  # the recorded description
    test_draem.main(["--checkpoint", str(checkpoints["weave"]), "--data_path", str(data), "--out",
                     str(tmp_path / "res_mvtec"), "--no-save_images", "--device", "cpu"])
    [by_json], [by_mvtec] = (read_json(tmp_path / r / "results.json")["runs"].values() for r in ("res_json", "res_mvtec"))
    metrics = [m for m in by_mvtec if m in ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro")]
    assert len(metrics) == 5 and {m: by_json[m] for m in metrics} == {m: by_mvtec[m] for m in metrics}
    assert by_json["per_defect_type"] == by_mvtec["per_defect_type"] and by_json["data_set"] == "parts"
