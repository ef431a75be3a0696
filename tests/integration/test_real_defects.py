"""Real defects in training (training/defects.py): a defect kind the simulation cannot make is learned from four
real examples, with masks or with image-level labels alone, and not without them; the files trained on are never
scored; resume is exact; bad input gets one line and costs nothing already written."""
import os
import pickle
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from data_loader import load_test_set
from helpers import TINY, call_script, read_json, tiny_dataset
from deploy.accuracy_gate import reference
from scoring.evaluate import evaluate
from training.checkpoint import model_from_checkpoint
from training.demo import texture

# Settings under which four real examples are learned in 40 steps (about 20 s on 2 CPU cores).
SHADE = ["--image_size", "64", "--base_width", "8", "--seg_base_width", "8", "--bs", "4", "--epochs", "10",
         "--lr", "2e-3", "--defect_share", "0.5", "--log_every", "20", "--workers", "2", "--device", "cpu"]


def shaded_weave(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The demo's weave darkened by a smooth Gaussian bump, and the bump's core as the mask. It has no edge
    anywhere, and the simulation cannot make it: every simulated anomaly is a blend inside a thresholded Perlin
    mask, whose border is a sharp step."""
    image = texture(rng, size).astype(np.float32)
    cy, cx = rng.uniform(size * 0.25, size * 0.75, 2)
    sigma = rng.uniform(size / 10, size / 7)
    y, x = np.mgrid[0:size, 0:size]
    bump = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma ** 2))
    image *= (1 - 0.45 * bump)[..., None]
    return image.astype(np.uint8), ((bump > 0.5) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def shade(tmp_path_factory) -> Path:
    """16 good training images; a test set of 8 good and 12 shaded images with masks."""
    root, rng = tmp_path_factory.mktemp("shade"), np.random.default_rng(0)
    category = root / "weave"
    for folder, count in (("train/good", 16), ("test/good", 8)):
        (category / folder).mkdir(parents=True)
        for i in range(count):
            cv2.imwrite(str(category / folder / f"{i:03d}.png"), texture(rng, 64))
    (category / "test" / "shade").mkdir()
    (category / "ground_truth" / "shade").mkdir(parents=True)
    for i in range(12):
        image, mask = shaded_weave(rng)
        cv2.imwrite(str(category / "test" / "shade" / f"{i:03d}.png"), image)
        cv2.imwrite(str(category / "ground_truth" / "shade" / f"{i:03d}_mask.png"), mask)
    return root


def train(data: Path, work: Path, name: str, *extra) -> Path:
    call_script("train_draem.py", "--obj_id", "weave", "--data_path", data, "--run_name", name, *SHADE, *extra,
                cwd=work)
    return work / "checkpoints" / f"{name}.pt"


@pytest.fixture(scope="module")
def baseline(shade, tmp_path_factory) -> Path:
    """DRAEM as published: good images and simulated anomalies only."""
    return train(shade, tmp_path_factory.mktemp("baseline"), "none")


def scored_without(checkpoint: Path, data: Path, leave_out: frozenset[str]) -> dict:
    """The checkpoint's metrics on the test set without the files left out (another run's training defects)."""
    model, info = model_from_checkpoint(checkpoint)
    test_set = load_test_set(data, "weave", info.image_size, 2, info.bit_depth, leave_out)
    return evaluate(model, test_set, torch.device("cpu"), info.channel_order)["metrics"]


def test_a_defect_the_simulation_cannot_make_is_learned_from_four_real_examples_and_never_scored(
        shade, baseline, tmp_path):
    ckpt = train(shade, tmp_path, "four", "--train_defects", "4", "--no-paste_defects")
    state = torch.load(ckpt, weights_only=True)
    trained = state["trained_defects"]
    assert len(trained) == 4 and all(f["origin"] == "test" and f["mask"] for f in trained)
    trained_paths = sorted(f["path"] for f in trained)
    _, info = model_from_checkpoint(ckpt)
    # Learned: on the 8 shaded images neither run trained on, found and, trained on as they are, localised well;
    # DRAEM alone is near chance. Pasted onto good images (the default) the shade is found less well, yet better
    # than by DRAEM alone: pasting matches a defect's brightness to the part in a ring around its mask, and this
    # shade's darkening runs on past its mask into that ring, so part of its contrast is lost (image AUROC 0.69
    # with one thread, over 0.9 with two; docs/training.md: --no-paste_defects is for such defects).
    ours, theirs = state["metrics"], scored_without(baseline, shade, info.trained_digests)
    assert ours["image_auroc"] > 0.9 and ours["pixel_ap"] > 0.5, ours
    assert theirs["pixel_ap"] < 0.2 and theirs["image_auroc"] < ours["image_auroc"] - 0.2, theirs
    assert sorted(state["metrics"]["left_out"]) == trained_paths
    pasted = torch.load(train(shade, tmp_path, "pasted", "--train_defects", "4"), weights_only=True)
    assert pasted["config"]["paste_defects"] and sorted(pasted["metrics"]["left_out"]) == trained_paths
    assert theirs["image_auroc"] < pasted["metrics"]["image_auroc"] <= ours["image_auroc"]

    # Never scored: test_draem.py leaves the 4 out and says so, in results.json, the CSV and the report.
    proc = call_script("test_draem.py", "--checkpoint", ckpt, "--out", tmp_path / "res", "--device", "cpu",
                       cwd=tmp_path)
    assert "scored on 8 of 12 defect images; 4 used in training" in proc.stdout
    [result] = read_json(tmp_path / "res" / "results.json")["runs"].values()
    assert sorted(result["left_out"]) == trained_paths and result["images"] == 16
    scored = (tmp_path / "res" / "scores_four.csv").read_text()
    assert not any(Path(p).name in scored and f"shade/{Path(p).name}" in scored for p in trained_paths)
    assert scored.count("\n") == 1 + 16
    report = (tmp_path / "res" / "report.html").read_text()
    assert "Scored on 8 of 12 defect images; 4 used in training" in report
    assert all(p in report for p in trained_paths)
    assert not any(f"shade/{Path(p).stem}.png" in panel.as_posix()
                   for p in trained_paths for panel in (tmp_path / "res" / "images").rglob("*.png"))
    # Calibrating on a folder that holds one of them leaves it out too.
    good = tmp_path / "good"
    good.mkdir()
    for source in [*sorted((shade / "weave" / "test" / "good").glob("*.png"))[:3], Path(trained_paths[0])]:
        shutil.copy(source, good / f"{source.parent.name}_{source.name}")
    proc = call_script("test_draem.py", "--checkpoint", ckpt, "--calibrate", good, "--device", "cpu", cwd=tmp_path)
    assert "left out 1 defect image(s) the model trained on" in proc.stderr and "on the other 3" in proc.stderr
    # ... and the accuracy gate's labelled reference leaves them out too.
    ref = reference(ckpt, shade, torch.device("cpu"))
    assert sorted(map(str, ref["test_set"].left_out)) == trained_paths and len(ref["test_set"].paths) == 16


def test_image_labels_without_masks_teach_the_model_too(shade, baseline, tmp_path):
    ckpt = train(shade, tmp_path, "weak", "--train_defects", "4", "--pixel_labels", "0")
    state = torch.load(ckpt, weights_only=True)
    assert len(state["trained_defects"]) == 4 and all(f["mask"] is None for f in state["trained_defects"])
    _, info = model_from_checkpoint(ckpt)
    ours, theirs = state["metrics"], scored_without(baseline, shade, info.trained_digests)
    assert ours["image_auroc"] > 0.9 and theirs["image_auroc"] < ours["image_auroc"] - 0.2, (ours, theirs)


def logged(folder: Path, run: str, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    return [(e.step, e.value) for e in EventAccumulator(str(folder / "logs" / run)).Reload().Scalars(tag)]


def test_resume_with_real_defects_equals_an_uninterrupted_run(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    common = ["--obj_id", "weave", "--data_path", data, "--train_defects", "2", "--eval_every", "-1", *TINY]
    for work in ("a", "b"):
        (tmp_path / work).mkdir()
    call_script("train_draem.py", *common, "--epochs", "4", "--run_name", "r", cwd=tmp_path / "a")
    call_script("train_draem.py", *common, "--epochs", "2", "--run_name", "r", cwd=tmp_path / "b")
    resumed = call_script("train_draem.py", *common, "--epochs", "4", "--run_name", "r", "--resume",
                          cwd=tmp_path / "b")
    assert "resumed from checkpoints/r.pt at step 6" in resumed.stdout  # 12 images, 4 a step: 3 steps an epoch
    assert "[weave] step 2/" not in resumed.stdout and "[weave] step 8/12" in resumed.stdout
    a, b = (torch.load(tmp_path / w / "checkpoints" / "r.pt", weights_only=True) for w in ("a", "b"))
    assert a["step"] == b["step"] == 12 and a["trained_defects"] == b["trained_defects"]
    for part in ("reconstructive", "discriminative"):
        for key, value in a[part].items():
            torch.testing.assert_close(b[part][key], value, rtol=1e-5, atol=1e-6, msg=f"{part}.{key}")
    # The real-defect loss is its own curve, equal in both runs at every logged step.
    whole, split = (logged(tmp_path / w, "r", "loss/real_defects") for w in ("a", "b"))
    assert [s for s, _ in whole] == [2, 4, 6, 8, 10, 12] == [s for s, _ in split]
    assert [v for _, v in split] == pytest.approx([v for _, v in whole], rel=1e-4)
    # A training defect added since: the checkpoint is another run's, and --resume says so.
    own = data / "weave" / "train" / "tear"
    own.mkdir()
    shutil.copy(data / "weave" / "test" / "good" / "000.png", own / "t0.png")
    refused = call_script("train_draem.py", *common, "--epochs", "5", "--run_name", "r", "--resume",
                          cwd=tmp_path / "b", check=False)
    assert refused.returncode == 2 and "it trained on 2 real defect image(s), this run has 3" in refused.stderr


class MakesAFolder:
    """A pickle that would make a folder if unpickled by plain pickle.load."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_bad_real_defect_input_gets_one_line_and_loses_nothing(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    common = ["--obj_id", "weave", "--data_path", data, "--epochs", "1", "--eval_every", "-1", "--run_name", "r", *TINY]
    call_script("train_draem.py", *common, cwd=tmp_path)
    checkpoint = tmp_path / "checkpoints" / "r.pt"
    written = checkpoint.read_bytes()

    def fails(*extra, expect: str) -> None:
        proc = call_script("train_draem.py", *common, *extra, cwd=tmp_path, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        [line] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert expect in line, line
        assert checkpoint.read_bytes() == written  # the earlier run's checkpoint is untouched

    fails("--train_defects", "7", expect="--train_defects 7: the test set of")  # 6 defect images
    # a split file naming images that are not there; one holding an object; one that is not a pickle
    split = tmp_path / "split_1.pyb"
    split.write_bytes(pickle.dumps(([("000", False), ("nope", True)], [])))
    fails("--train_defects", "2", "--pixel_labels", split, expect=f"{split}: names 1 training image(s)")
    made = tmp_path / "made_by_the_pickle"
    split.write_bytes(pickle.dumps(([(MakesAFolder(str(made)), True)], [])))
    fails("--train_defects", "2", "--pixel_labels", split, expect="posix.mkdir object, not only names")
    assert not made.exists()
    split.write_bytes(b"not a pickle")
    fails("--train_defects", "2", "--pixel_labels", split, expect=f"{split}: not a readable split file")
    fails("--pixel_labels", "5", expect="has no training defects")
    fails("--train_defects", "2", "--pixel_labels", "1", "--image_size", "64", "--train_crop", "32",
          expect="--train_crop with defect images that have no mask")
    # a training defect whose mask is of another size than its image
    own = data / "weave" / "train" / "tear"
    own.mkdir()
    shutil.copy(data / "weave" / "test" / "hole" / "000.png", own / "t0.png")
    (data / "weave" / "ground_truth" / "tear").mkdir()
    cv2.imwrite(str(data / "weave" / "ground_truth" / "tear" / "t0_mask.png"), np.zeros((10, 20), np.uint8))
    fails(expect=f"mask {data / 'weave' / 'ground_truth' / 'tear' / 't0_mask.png'} is 20x10")


def test_real_defects_train_on_crops_as_normal_images_do(tmp_path):
    """--train_crop crops a pasted defect with its part and mask (draw_pasted), so masked defects train with it."""
    data = tiny_dataset(tmp_path / "data")
    call_script("train_draem.py", "--obj_id", "weave", "--data_path", data, "--epochs", "1", "--eval_every", "-1",
                "--run_name", "crops", *TINY, "--image_size", "64", "--train_crop", "32", "--train_defects", "2",
                cwd=tmp_path)
    state = torch.load(tmp_path / "checkpoints" / "crops.pt", weights_only=True)
    assert state["step"] > 0 and len(state["trained_defects"]) == 2


def test_bench_defects_leaves_out_what_a_run_of_that_seed_and_n_trains_on(tmp_path):
    """bench_defects --leave_out M scores later batches of runs on the images an N = M run left: its draw is the
    training's own, per seed (a run of seed 5 with --train_defects 3 records the same three files)."""
    from benchmarks.bench_defects import drawn_for, get_args_parser
    data = tiny_dataset(tmp_path / "data")
    call_script("train_draem.py", "--obj_id", "weave", "--data_path", data, "--epochs", "1", "--eval_every", "-1",
                "--run_name", "three", "--seed", "5", "--train_defects", "3", *TINY, cwd=tmp_path)
    trained = {f["digest"] for f in torch.load(tmp_path / "checkpoints" / "three.pt")["trained_defects"]}
    args = get_args_parser().parse_args(["--data_path", str(data), "--obj_id", "weave", "--seeds", "5"])
    assert len(trained) == 3 and drawn_for(args, 3) == trained
    args.seeds = [5, 6]
    assert trained < drawn_for(args, 3) and drawn_for(args, 0) == frozenset()
