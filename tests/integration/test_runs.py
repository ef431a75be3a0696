"""One run, one name: variants never overwrite each other, --resume continues only the same run, a folder of
runs is summarised per configuration and per seed, and the test set cannot cost a trained model."""
import shutil
import time
from pathlib import Path

import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from data_loader import load_test_set
from scoring.evaluate import predict
from training.checkpoint import model_from_checkpoint
from helpers import TINY, call_script, read_json, tiny_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("runs") / "data")


def train(data, cwd, *extra, check=True, source=True):
    sources = ["--anomaly_source_path", data / "sources"] if source else []
    return call_script("train_draem.py", "--obj_id", "weave", "--data_path", data, *sources, *TINY, *extra, cwd=cwd,
                      check=check)


def test_seeds_and_a_variant_keep_their_runs_and_a_folder_gives_their_summary(data, tmp_path):
    for extra in (["--seed", "0"], ["--seed", "1"], ["--seed", "0", "--sspcab"]):
        train(data, tmp_path, "--epochs", "1", "--eval_every", "-1", *extra)
    checkpoints = sorted((tmp_path / "checkpoints").glob("*.pt"))
    assert len(checkpoints) == 3 and len(list((tmp_path / "logs").iterdir())) == 3
    assert {p.stem for p in checkpoints} == {p.name for p in (tmp_path / "logs").iterdir()}
    call_script("test_draem.py", "--checkpoint", tmp_path / "checkpoints", "--data_path", data, "--out",
               tmp_path / "res", "--device", "cpu", "--no-save_images", cwd=tmp_path)
    results = read_json(tmp_path / "res" / "results.json")
    [seeds] = results["seeds"]
    variant = next(p.stem for p in checkpoints if "sspcab" in p.stem)
    assert sorted(seeds["seeds"]) == [0, 1] and variant not in seeds["runs"] and len(seeds["runs"]) == 2
    means = {tuple(row["runs"]) for row in results["means"]}
    assert means == {(p.stem,) for p in checkpoints}  # three configurations: no mean over different variants
    markdown = (tmp_path / "res" / "results.md").read_text()
    assert variant in markdown and "0, 1" in markdown


def test_resume_refuses_other_settings_and_extends_to_more_epochs(data, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    train(data, tmp_path / "a", "--epochs", "1", "--seed", "0")
    [one_epoch] = (tmp_path / "a" / "checkpoints").glob("*.pt")
    for extra, named in ((["--seed", "1"], "seed 0 -> 1"), (["--base_width", "8"], "base_width 4 -> 8"),
                         (["--recipe", "paper", "--sspcab"], "sspcab False -> True")):
        proc = train(data, tmp_path / "a", "--epochs", "1", "--resume", one_epoch, *extra, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        [line] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert named in line and "other settings" in line, line
    # A larger --epochs extends the run; its stored metrics are printed at the end when none are computed.
    proc = train(data, tmp_path / "a", "--epochs", "2", "--seed", "0", "--resume", one_epoch, "--eval_every", "-1")
    assert "metrics image_auroc=" in proc.stdout
    assert f"resumed from {one_epoch} at step 3" in proc.stdout and "extending a 1-epoch run to 2 epochs" in proc.stderr
    steps = [line.split()[2] for line in proc.stdout.splitlines() if line.startswith("[weave] step ")]
    assert steps == ["4/6", "6/6"]  # started at the checkpoint's step, did not redo the first epoch
    [extended] = [p for p in (tmp_path / "a" / "checkpoints").glob("*.pt") if p != one_epoch]
    assert "_ep2_" in extended.name and "_ep1_" in one_epoch.name  # the 1-epoch run is still there
    state = torch.load(extended, weights_only=True)
    assert state["step"] == 6 and state["epoch"] == 2
    # The official schedule's milestones of a 1- and a 2-epoch run both lie at their end, so the extended run
    # must equal a 2-epoch run trained without a stop.
    train(data, tmp_path / "b", "--epochs", "2", "--seed", "0")
    straight = torch.load(next((tmp_path / "b" / "checkpoints").glob("*.pt")), weights_only=True)
    for part in ("reconstructive", "discriminative"):
        for key, value in straight[part].items():
            torch.testing.assert_close(state[part][key], value, rtol=1e-5, atol=1e-6, msg=f"{part}.{key}")


def test_resume_alone_finds_its_run_when_epochs_grow_and_never_restarts_silently(data, tmp_path):
    # nothing to resume: said in one line, then a fresh run from step 1
    proc = train(data, tmp_path, "--epochs", "1", "--eval_every", "-1", "--resume")
    [line] = [line for line in proc.stderr.splitlines() if "--resume" in line]
    assert "no checkpoint of this run" in line and "starting afresh" in line, proc.stderr
    [one_epoch] = (tmp_path / "checkpoints").glob("*.pt")
    # --resume alone with a larger --epochs: the 1-epoch run is found and extended from its stored step
    proc = train(data, tmp_path, "--epochs", "2", "--eval_every", "-1", "--resume")
    assert f"resumed from {Path('checkpoints') / one_epoch.name} at step 3" in proc.stdout, proc.stdout
    assert "extending a 1-epoch run to 2 epochs" in proc.stderr
    steps = [line.split()[2] for line in proc.stdout.splitlines() if line.startswith("[weave] step ")]
    assert steps == ["4/6", "6/6"]  # a restart would log 2/6 first
    two_epochs = one_epoch.with_name(one_epoch.name.replace("_ep1_", "_ep2_"))
    assert torch.load(two_epochs, weights_only=True)["step"] == 6
    # two runs of other lengths to extend: an error naming both, nothing trained
    proc = train(data, tmp_path, "--epochs", "3", "--eval_every", "-1", "--resume", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert one_epoch.name in line and two_epochs.name in line and "--resume PATH" in line, line
    assert len(list((tmp_path / "checkpoints").glob("*.pt"))) == 2


def test_a_checkpoint_written_before_a_flag_existed_is_resumed_by_the_code_that_adds_it(data, tmp_path):
    train(data, tmp_path, "--epochs", "1", "--eval_every", "-1")
    [new] = (tmp_path / "checkpoints").glob("*.pt")
    # as written before --score_loss and --paste_contrast existed: neither recorded, and another name then
    state = torch.load(new, weights_only=True)
    assert state["config"].pop("score_loss") == 0.0 and state["config"].pop("paste_contrast") == 0.0
    older = new.with_name("DRAEM_weave_written_before.pt")
    torch.save(state, older)
    new.unlink()
    proc = train(data, tmp_path, "--epochs", "2", "--eval_every", "-1", "--resume")
    assert f"resumed from {Path('checkpoints') / older.name} at step 3" in proc.stdout, proc.stdout + proc.stderr
    steps = [line.split()[2] for line in proc.stdout.splitlines() if line.startswith("[weave] step ")]
    assert steps == ["4/6", "6/6"]
    # a flag set away from the value older files trained with is another run: refused, in one line
    proc = train(data, tmp_path, "--epochs", "2", "--score_loss", "0.1", "--resume", older, check=False)
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "score_loss 0.0 -> 0.1" in line, proc.stderr


def test_a_defect_image_without_a_mask_costs_only_its_pixel_metrics(data, tmp_path):
    shutil.copytree(data / "weave", tmp_path / "d" / "weave")
    (tmp_path / "d" / "weave" / "ground_truth" / "hole" / "001_mask.png").unlink()
    proc = train(tmp_path / "d", tmp_path, "--epochs", "1", source=False)
    assert "1 defect image(s) without a mask" in proc.stderr and "hole/001.png" in proc.stderr
    [ckpt] = (tmp_path / "checkpoints").glob("*.pt")
    stored = torch.load(ckpt, weights_only=True)["metrics"]
    assert stored["mask_coverage"] == {"defect_images": 6, "defect_images_with_mask": 5}
    assert "pixel metrics over the 5 of 6 defect images that have masks" in proc.stdout
    call_script("test_draem.py", "--checkpoint", ckpt, "--data_path", tmp_path / "d", "--out", tmp_path / "res",
               "--device", "cpu", "--no-save_images", cwd=tmp_path)
    run = read_json(tmp_path / "res" / "results.json")["runs"][ckpt.stem]
    assert run["mask_coverage"] == stored["mask_coverage"] and run["images"] == 10
    assert "| 5/6 |" in (tmp_path / "res" / "results.md").read_text()
    # Image metrics over all 10 images; pixel metrics over the 9 with known pixels, against scikit-learn.
    model, _ = model_from_checkpoint(ckpt)
    test_set = load_test_set(tmp_path / "d", "weave", 32)
    maps = predict(model, test_set.images, torch.device("cpu"))[0].numpy()
    scores = [float(line.split(",")[3]) for line in (tmp_path / "res" / f"scores_{ckpt.stem}.csv").read_text().split()[1:]]
    assert run["image_auroc"] == pytest.approx(roc_auc_score(test_set.labels.numpy(), scores), abs=1e-9)
    known = test_set.has_mask.numpy()
    assert known.sum() == 9
    pixels, truth = maps[known].ravel(), (test_set.masks[:, 0].numpy()[known] >= 128).ravel()
    assert run["pixel_auroc"] == pytest.approx(roc_auc_score(truth, pixels), abs=1e-6)
    assert run["pixel_ap"] == pytest.approx(average_precision_score(truth, pixels), abs=1e-6)
    hole = run["per_defect_type"]["hole"]
    assert hole["images"] == 2 and hole["images_with_mask"] == 1


def test_an_unreadable_test_image_fails_before_the_first_step(data, tmp_path):
    shutil.copytree(data / "weave", tmp_path / "d" / "weave")
    (tmp_path / "d" / "weave" / "test" / "hole" / "broken.png").write_bytes(b"not a png")
    started = time.perf_counter()
    proc = train(tmp_path / "d", tmp_path, "--epochs", "500", check=False, source=False)
    seconds = time.perf_counter() - started
    assert proc.returncode == 2 and "broken.png" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "step" not in proc.stdout and not list((tmp_path / "checkpoints").glob("*.pt")), proc.stdout
    assert seconds < 30, f"the broken test set was reported after {seconds:.1f} s"
    print(f"broken test set reported after {seconds:.1f} s")
