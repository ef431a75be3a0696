"""The training script as a library and as a logged job: flags, demo defaults, handlers, logs, the LR table."""
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import engine
import train_draem
from train_draem import DEMO, get_args_parser, parse_args
from data_loader import DataError, list_images, load_images
from helpers import ROOT, TINY, tiny_dataset
from engine import calibration_holdout
from recipe import RECIPES


def test_demo_settings_are_defaults_that_explicit_flags_override(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plain = parse_args(["--demo"])
    assert {k: getattr(plain, k) for k in DEMO} == DEMO
    # Values equal to the normal defaults were silently replaced before.
    given = parse_args(["--demo", "--epochs", "700", "--image_size", "256", "--obj_id", "my_part",
                                    "--base_width", "128"])
    assert (given.epochs, given.image_size, given.obj_id, given.base_width) == (700, (256, 256), "my_part", 128)
    assert given.seg_base_width == DEMO["seg_base_width"]
    assert not (tmp_path / "datasets").exists()  # parsing builds nothing
    assert parse_args(["--data_path", "x"]).epochs == 700  # no --demo: the normal defaults


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_learning_rate_table_matches_multisteplr(name):
    recipe = RECIPES[name]
    for epochs in (1, 7, 10, 700):
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-4)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, [round(f * epochs) for f in recipe.lr_milestones], recipe.lr_decay)
        for epoch in range(epochs):
            assert recipe.learning_rate(1e-4, epoch, epochs) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)
            optimizer.step()
            scheduler.step()


def test_recipe_help_is_built_from_the_table():
    text = " ".join(get_args_parser().format_help().split())
    for name, recipe in RECIPES.items():
        assert f"{name}: {recipe.describe()}" in text


def test_main_from_python_restores_signal_handlers_and_honours_debug(tmp_path, monkeypatch):
    data = tiny_dataset(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    train_draem.main(train_draem.parse_args(["--data_path", str(data), "--obj_id", "weave", "--epochs", "1", "--eval_every", "-1", *TINY]))
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert list((tmp_path / "checkpoints").glob("*.pt"))
    bad = ["--data_path", str(tmp_path / "nope"), "--obj_id", "weave", *TINY]
    with pytest.raises(SystemExit) as exit_info:  # one line and status 2 without --debug ...
        train_draem.main(train_draem.parse_args(bad))
    assert exit_info.value.code == 2
    with pytest.raises(DataError):  # ... the exception itself with the parsed --debug (not sys.argv)
        train_draem.main(train_draem.parse_args(bad + ["--debug"]))
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_importing_the_loader_leaves_opencv_threads_alone():
    code = ("import cv2; cv2.setNumThreads(3); import data_loader; imported = cv2.getNumThreads(); "
            "during = data_loader.parallel_read(lambda item, size: cv2.getNumThreads(), [1, 2], 0, 2); "
            "print(imported, *during, cv2.getNumThreads())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["3", "1", "1", "3"]  # untouched at import, 1 while reading in parallel, restored


def run_main(monkeypatch, tmp_path, *extra, wrap_step=None, record_saves=None):
    """train_draem.main in this process on the tiny dataset, with the real step and saver observed."""
    data = tiny_dataset(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    if wrap_step:
        real = engine.train_step
        monkeypatch.setattr(engine, "train_step", lambda *a, **k: wrap_step(real, *a, **k))
    if record_saves is not None:
        real_save = engine.save_training

        def save(path, model, config, progress, *rest):
            real_save(path, model, config, progress, *rest)
            record_saves.append((progress["step"], path.read_bytes()))
        monkeypatch.setattr(engine, "save_training", save)
    train_draem.main(train_draem.parse_args(["--data_path", str(data), "--obj_id", "weave", "--anomaly_source_path", str(data / "sources"),
                      *TINY, *map(str, extra)]))
    return data


def test_train_crop_is_what_the_step_trains_on(tmp_path, monkeypatch):
    shapes = []

    def observe(real, net, batch, *rest):
        shapes.append((tuple(batch.augmented.shape), tuple(batch.mask.shape)))
        return real(net, batch, *rest)
    run_main(monkeypatch, tmp_path, "--image_size", "64x96", "--train_crop", "32x64", "--epochs", "1",
             "--eval_every", "-1", wrap_step=observe)
    assert shapes == [((4, 3, 32, 64), (4, 1, 32, 64))] * 3


def test_a_non_finite_loss_after_a_good_checkpoint_keeps_that_checkpoint(tmp_path, monkeypatch):
    calls, saves = [], []

    def poison(real, net, batch, *rest):  # from the fifth step on, a weight is NaN, so the loss is too
        calls.append(1)
        if len(calls) >= 5:
            with torch.no_grad():
                next(net.parameters()).fill_(float("nan"))
        return real(net, batch, *rest)
    with pytest.raises(SystemExit) as stopped:
        run_main(monkeypatch, tmp_path, "--epochs", "3", "--eval_every", "-1", wrap_step=poison, record_saves=saves)
    assert stopped.value.code == 2
    # 3 steps per epoch: the end of epoch 1 (step 3) was saved, the NaN came at step 5, nothing saved after it.
    assert [step for step, _ in saves] == [3]
    [ckpt] = (tmp_path / "checkpoints").glob("*.pt")
    assert ckpt.read_bytes() == saves[0][1]
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 3 and all(torch.isfinite(v).all() for v in state["reconstructive"].values())


def test_a_non_finite_loss_is_named_by_its_step(tmp_path, capsys, monkeypatch):
    def poison(real, net, batch, *rest):
        with torch.no_grad():
            next(net.parameters()).fill_(float("nan"))
        return real(net, batch, *rest)
    with pytest.raises(SystemExit):
        run_main(monkeypatch, tmp_path, "--epochs", "1", "--eval_every", "-1", wrap_step=poison)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: loss is NaN or Inf at step 1") and "no checkpoint was written yet" in line


def test_save_every_and_eval_every(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    saves = []
    run_main(monkeypatch, tmp_path, "--epochs", "4", "--save_every", "3", "--eval_every", "2", record_saves=saves)
    # 3 steps per epoch. Saved at epoch 3 (--save_every), and before and after each evaluation (epochs 2 and 4).
    assert [step for step, _ in saves] == [6, 6, 9, 12, 12]
    [ckpt] = (tmp_path / "checkpoints").glob("*.pt")
    events = EventAccumulator(str(tmp_path / "logs" / ckpt.stem)).Reload()
    assert [e.step for e in events.Scalars("test/image_auroc")] == [6, 12]
    assert torch.load(ckpt, weights_only=True)["metrics"]["epoch"] == 4


def test_preview_shows_exactly_what_the_first_steps_train_on(tmp_path, monkeypatch, capsys):
    shown, trained = [], []
    monkeypatch.setattr(engine, "sample_grid", lambda normal, augmented, masks, title, real: (
        shown.append((normal, augmented, masks)), np.zeros((8, 8, 3), np.uint8))[1])
    run_main(monkeypatch, tmp_path, "--preview", "6", "--train_crop", "32", "--image_size", "64")
    path = capsys.readouterr().out.strip().splitlines()[-1].removeprefix("preview: ")
    assert (tmp_path / path).is_file() and not list(tmp_path.glob("checkpoints/*.pt"))  # written; nothing trained

    def observe(real, net, batch, *rest):
        trained.append((batch.image.clone(), batch.augmented.clone(), batch.mask.clone()))
        return real(net, batch, *rest)
    run_main(monkeypatch, tmp_path / "run", "--epochs", "1", "--eval_every", "-1", "--train_crop", "32",
             "--image_size", "64", wrap_step=observe)
    for got, first in zip(shown[0], (torch.cat(t)[:6] for t in zip(*trained))):  # steps of 4: the first two
        assert torch.equal(got, first)


def test_held_out_images_are_not_trained_on(tmp_path, monkeypatch):
    seen = []

    def observe(images, *rest):
        seen.append(images)
        return real_step_batch(images, *rest)
    real_step_batch = engine.step_batch
    monkeypatch.setattr(engine, "step_batch", observe)
    data = run_main(monkeypatch, tmp_path, "--epochs", "1", "--eval_every", "-1", "--calibration_split", "0.25")
    paths = list_images(data / "weave" / "train" / "good")
    kept, held = calibration_holdout(len(paths), 0.25, 0)
    assert len(seen[0]) == len(kept) == 9
    assert torch.equal(seen[0], load_images([paths[i] for i in kept], 32))


@pytest.mark.parametrize("flags,expect", [
    (["--bit_depth", "9"], "argument --bit_depth: expected auto or one of 8, 10, 12, 14, 16"),
    (["--calibration_split", "1"], "--calibration_split 1: expected a share in [0, 1)"),
    (["--false_alarm_rate", "0"], "argument --false_alarm_rate: expected a share of good images in (0, 1)"),
    (["--preview", "0"], "--preview N: N must be at least 1")])
def test_bad_training_flags_get_one_line(flags, expect, capsys):
    with pytest.raises(SystemExit) as stopped:
        parse_args(["--data_path", "x", *flags])
    assert stopped.value.code == 2 and expect in capsys.readouterr().err
