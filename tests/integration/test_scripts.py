"""End to end through the real scripts on a tiny generated MVTec-layout dataset: the README's commands in
subprocesses; other training settings (recipes, SSPCAB) through the script's main in-process."""
import csv
import math

import cv2
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data_loader import load_test_set
from scoring.evaluate import predict
from training.checkpoint import model_from_checkpoint
from helpers import TINY, call_script, read_json, run_script, tiny_dataset
from scoring.metrics import METRICS


def test_training_writes_a_complete_checkpoint(tiny_run):
    work, data, ckpt = tiny_run
    assert "weave" in ckpt.name
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 2 * 3  # 12 images, batch 4
    assert state["config"]["base_width"] == 4 and state["config"]["image_size"] == [32, 32]  # [H, W]
    assert state["config"]["channel_order"] == "BGR" and state["category"] == "weave"
    assert set(state["metrics"]) >= {"image_auroc", "pixel_auroc", "aupro"}
    assert not list((work / "checkpoints").glob(".*tmp*"))


def test_tensorboard_holds_loss_curves_and_images(tiny_run):
    work, _, ckpt = tiny_run
    events = EventAccumulator(str(work / "logs" / ckpt.stem)).Reload()
    tags = events.Tags()
    assert {"loss/total", "loss/l2", "loss/ssim", "loss/focal", "lr"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("loss/total")] == [2, 4, 6]
    assert all(math.isfinite(e.value) for e in events.Scalars("loss/total"))
    assert tags["images"]


def test_test_script_writes_results_csv_and_panels(tiny_run):
    work, data, ckpt = tiny_run
    call_script("test_draem.py", "--checkpoint", ckpt, "--data_path", data, "--out", work / "res_panels", "--device",
                "cpu", "--save_images", cwd=work)
    results = read_json(work / "res_panels" / "results.json")
    run = results["runs"][ckpt.stem]
    # each metric's value is checked against scikit-learn in test_promises.py; here: one run, its own mean
    for metric in ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro"):
        assert results["means"][0][metric] == run[metric]
    assert "Mean per configuration" in (work / "res_panels" / "results.md").read_text()
    rows = list(csv.DictReader(open(work / "res_panels" / f"scores_{ckpt.stem}.csv")))
    assert len(rows) == 10 and {r["defect_type"] for r in rows} == {"good", "scratch", "hole", "stain"}
    panels = sorted((work / "res_panels" / "images" / ckpt.stem).rglob("*.png"))
    assert len(panels) == 10
    picture = cv2.imread(str(panels[0]))
    # three tiles at the original 160 px, under a header of titles, beside a colour bar narrower than a tile
    assert picture.shape[0] > 160 and 3 * 160 < picture.shape[1] < 4 * 160


def test_official_two_file_and_anomalib_checkpoints_give_identical_outputs(tiny_run):
    work, data, ckpt = tiny_run
    model, _ = model_from_checkpoint(ckpt)
    name = "DRAEM_test_0.0001_2_bs4_weave_"
    torch.save(model.reconstructive_subnetwork.state_dict(), work / f"{name}.pckl")
    torch.save(model.discriminative_subnetwork.state_dict(), work / f"{name}_seg.pckl")
    anomalib = {f"model.reconstructive_subnetwork.{k}": v for k, v in model.reconstructive_subnetwork.state_dict().items()}
    anomalib |= {f"model.discriminative_subnetwork.{k}": v for k, v in model.discriminative_subnetwork.state_dict().items()}
    torch.save({"state_dict": anomalib}, work / "anomalib_weave.ckpt")
    images = load_test_set(data, "weave", 32).images
    reference, _ = predict(model, images, torch.device("cpu"))
    for path in (work / f"{name}.pckl", work / f"{name}_seg.pckl"):
        loaded, state = model_from_checkpoint(path)
        assert state.category == "weave" and state.config["base_width"] == 4
        torch.testing.assert_close(predict(loaded, images, torch.device("cpu"))[0], reference, rtol=0, atol=0)
    loaded, state = model_from_checkpoint(work / "anomalib_weave.ckpt")
    assert state.config["channel_order"] == "RGB"  # anomalib reads RGB: its input is flipped
    rgb = predict(loaded, images.flip(1), torch.device("cpu"), channel_order="RGB")[0]
    torch.testing.assert_close(rgb, reference, rtol=0, atol=0)
    # The official pair scores through the script too, category taken from the file name.
    call_script("test_draem.py", "--checkpoint", work / f"{name}_seg.pckl", "--data_path", data, "--out", work / "off",
                "--device", "cpu", "--image_size", "32", cwd=work)
    call_script("test_draem.py", "--checkpoint", ckpt, "--data_path", data, "--out", work / "own", "--device", "cpu",
                cwd=work)
    # A folder of checkpoints: every file scored once, the official pair counted as one run.
    folder = work / "folder"
    folder.mkdir()
    for path in (ckpt, work / f"{name}.pckl", work / f"{name}_seg.pckl"):
        (folder / path.name).write_bytes(path.read_bytes())
    call_script("test_draem.py", "--checkpoint", folder, "--data_path", data, "--out", work / "both", "--device", "cpu",
                "--image_size", "32", cwd=work)
    assert sorted(read_json(work / "both" / "results.json")["runs"]) == sorted([name, ckpt.stem])
    official = read_json(work / "off" / "results.json")["runs"][name]
    own = read_json(work / "own" / "results.json")["runs"][ckpt.stem]
    assert official["category"] == "weave"
    assert {m: official[m] for m in METRICS} == {m: own[m] for m in METRICS}


def test_inference_on_a_folder_of_images(tiny_run, tmp_path):
    work, data, ckpt = tiny_run
    folder = tmp_path / "mine"
    folder.mkdir()
    for i, size in enumerate([(50, 70), (97, 33), (128, 128)]):
        cv2.imwrite(str(folder / f"img{i}.jpg"), cv2.resize(cv2.imread(str(data / "weave" / "test" / "hole" / "000.png")), size[::-1]))
    proc = call_script("test_draem.py", "--checkpoint", ckpt, "--images", folder, "--out", tmp_path / "out",
                       "--threshold", "0.5", "--device", "cpu", cwd=work)
    rows = list(csv.DictReader(open(tmp_path / "out" / "scores.csv")))
    assert len(rows) == 3 and all(r["verdict"] in ("OK", "ANOMALY") for r in rows)
    assert proc.stdout.count("OK") + proc.stdout.count("ANOMALY") == 3
    for i, size in enumerate([(50, 70), (97, 33), (128, 128)]):
        picture = cv2.imread(str(tmp_path / "out" / f"img{i}.png"))
        original = cv2.imread(str(folder / f"img{i}.jpg"))
        header = picture.shape[0] - size[0]
        assert header > 0 and picture.shape[1] > 3 * size[1]
        assert np.array_equal(picture[header:, :size[1]], original)  # the input tile at its original resolution


def test_sspcab_paper_recipe_and_bf16_autocast_train_end_to_end(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    call_script("train_draem.py", "--obj_id", "weave", "--data_path", data, "--anomaly_source_path", data / "sources",
                "--epochs", "2", "--sspcab", "--recipe", "paper", "--amp", "bf16", "--eval_every", "-1", *TINY,
                cwd=tmp_path)
    ckpt = next((tmp_path / "checkpoints").glob("*.pt"))
    state = torch.load(ckpt, weights_only=True)
    assert state["config"]["sspcab"] and state["config"]["recipe"] == "paper" and "paper" in ckpt.name
    assert "encoder.block5.masked_conv1.weight" in state["reconstructive"]
    events = EventAccumulator(str(tmp_path / "logs" / ckpt.stem)).Reload()
    sspcab = [e.value for e in events.Scalars("loss/sspcab")]
    assert sspcab and all(math.isfinite(v) and v >= 0 for v in sspcab)
    model, _ = model_from_checkpoint(ckpt)  # loads back into an SSPCAB model of the recorded widths
    assert model.reconstructive_subnetwork.encoder.block5.__class__.__name__ == "SSPCAB"


@pytest.mark.parametrize("recipe,epochs,expected", [
    ("official", 10, [1e-4] * 8 + [2e-5, 4e-6]),  # x0.2 at 0.8 E and 0.9 E
    ("paper", 7, [1e-4] * 4 + [1e-5] * 2 + [1e-6]),  # x0.1 at epochs 400 and 600 of 700, scaled to E
])
def test_learning_rate_schedule_per_recipe(tmp_path, recipe, epochs, expected):
    data = tiny_dataset(tmp_path / "data")
    call_script("train_draem.py", "--obj_id", "weave", "--data_path", data, "--epochs", epochs, "--recipe", recipe,
                "--eval_every", "-1", *TINY[:-6], "--log_every", "3", "--workers", "2", "--device", "cpu", cwd=tmp_path)
    run = next((tmp_path / "logs").iterdir())
    lrs = [e.value for e in EventAccumulator(str(run)).Reload().Scalars("lr")]  # one per epoch: 12 images, bs 4
    assert lrs == pytest.approx(expected, rel=1e-6)


def test_logs_without_a_terminal_are_plain_lines(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    proc = run_script("train_draem.py", "--data_path", data, "--obj_id", "weave", "--epochs", "2", "--eval_every", "-1",
                      *TINY, cwd=tmp_path)
    for stream in (proc.stdout, proc.stderr):
        assert "\r" not in stream and "\x1b[" not in stream  # no bar redraws, no cursor movement
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[weave] step ")]
    # 12 images, batch 4: 3 steps per epoch, a line every 2 steps.
    assert [line.split()[2] for line in lines] == ["2/6", "4/6", "6/6"]
    assert [line.split()[4] for line in lines] == ["1/2", "2/2", "2/2"]
    assert all("loss" in line and "img/s" in line for line in lines)
