"""Bad input gets one line and exit status 2; interrupted runs resume exactly; checkpoints load safely."""
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import ROOT, TINY, run_script, tiny_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("robust") / "data")


def fails(script, *args, cwd, expect):
    proc = run_script(script, *args, cwd=cwd, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert expect in proc.stderr, proc.stderr
    return proc


def test_missing_folders_and_empty_train(tmp_path, data):
    fails("train_draem.py", "--data_path", tmp_path / "nope", "--obj_id", "weave", *TINY, cwd=tmp_path,
          expect="--data_path")
    fails("train_draem.py", "--data_path", data, "--obj_id", "carpet", *TINY, cwd=tmp_path, expect="carpet")
    (tmp_path / "d" / "part" / "train" / "good").mkdir(parents=True)
    fails("train_draem.py", "--data_path", tmp_path / "d", "--obj_id", "part", *TINY, cwd=tmp_path,
          expect="no training images")


def test_every_unreadable_image_is_listed(tmp_path, data):
    import shutil
    shutil.copytree(data / "weave", tmp_path / "d" / "weave")
    good = tmp_path / "d" / "weave" / "train" / "good"
    (good / "empty.png").write_bytes(b"")
    (good / "text.png").write_text("not a png")
    (good / "cut.png").write_bytes((good / "000.png").read_bytes()[:200])
    proc = fails("train_draem.py", "--data_path", tmp_path / "d", "--obj_id", "weave", *TINY, cwd=tmp_path,
                 expect="3 unreadable")
    assert all(name in proc.stderr for name in ("empty.png", "text.png", "cut.png"))


def test_anomaly_source_problems(tmp_path, data):
    fails("train_draem.py", "--data_path", data, "--obj_id", "weave", "--anomaly_source_path", tmp_path / "none",
          *TINY, cwd=tmp_path, expect="--anomaly_source_path")
    (tmp_path / "empty").mkdir()
    fails("train_draem.py", "--data_path", data, "--obj_id", "weave", "--anomaly_source_path", tmp_path / "empty",
          *TINY, cwd=tmp_path, expect="holds no images")


@pytest.mark.parametrize("flag,value", [("--bs", "0"), ("--epochs", "0"), ("--lr", "0"), ("--image_size", "100"),
                                        ("--obj_id", "99")])
def test_invalid_flags(tmp_path, data, flag, value):
    fails("train_draem.py", "--data_path", data, *TINY, flag, value, cwd=tmp_path, expect=flag)


def test_unwritable_output_is_refused_before_training(tmp_path, data):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    fails("train_draem.py", "--data_path", data, "--obj_id", "weave", "--checkpoint_path", blocker / "sub", *TINY,
          cwd=tmp_path, expect="--checkpoint_path")
    fails("train_draem.py", "--data_path", data, "--obj_id", "weave", "--log_path", blocker / "sub", *TINY,
          cwd=tmp_path, expect="--log_path")
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())


def test_cuda_without_gpu(tmp_path, data):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    fails("train_draem.py", "--data_path", data, "--obj_id", "weave", *TINY[:-2], "--device", "cuda", cwd=tmp_path,
          expect="no CUDA GPU")


def test_bad_checkpoints_are_named(tmp_path, data):
    (tmp_path / "text.pt").write_text("hello")
    fails("test_draem.py", "--checkpoint", tmp_path / "text.pt", "--data_path", data, cwd=tmp_path,
          expect="not a checkpoint")
    torch.save({"a": torch.zeros(3)}, tmp_path / "dict.pt")
    fails("test_draem.py", "--checkpoint", tmp_path / "dict.pt", "--data_path", data, cwd=tmp_path,
          expect="not a DRAEM checkpoint")
    run_script("train_draem.py", "--data_path", data, "--obj_id", "weave", "--epochs", "1", "--eval_every", "-1",
               *TINY, cwd=tmp_path)
    good = next((tmp_path / "checkpoints").glob("*.pt"))
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    fails("test_draem.py", "--checkpoint", tmp_path / "cut.pt", "--data_path", data, cwd=tmp_path, expect="truncated")
    state = torch.load(good, weights_only=True)
    state["config"]["base_width"] = 8
    torch.save(state, tmp_path / "wide.pt")
    fails("test_draem.py", "--checkpoint", tmp_path / "wide.pt", "--data_path", data, cwd=tmp_path,
          expect="another architecture or width")


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, data):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format": "draem-checkpoint-v1", "payload": Exploit()}, f)
    fails("test_draem.py", "--checkpoint", tmp_path / "evil.pt", "--data_path", data, cwd=tmp_path,
          expect="refused")
    assert not (tmp_path / "pwned").exists()


def final_weights(path):
    return torch.load(path, weights_only=True)["reconstructive"]


def train_args(data, epochs):
    return ["--data_path", data, "--obj_id", "weave", "--anomaly_source_path", data / "sources", "--epochs", epochs,
            "--eval_every", "-1", "--seed", "3", *TINY]


def start(args, cwd):
    return subprocess.Popen([sys.executable, str(ROOT / "train_draem.py"), *map(str, args)], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(folder, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if list(folder.glob("checkpoints/*.pt")):
            return
        time.sleep(0.05)


def test_sigterm_saves_and_resume_matches_an_uninterrupted_run(tmp_path, data):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    run_script("train_draem.py", *train_args(data, 4), cwd=tmp_path / "a")
    proc = start(train_args(data, 4), tmp_path / "b")
    wait_for_checkpoint(tmp_path / "b", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, 130), err
    ckpt = next((tmp_path / "b" / "checkpoints").glob("*.pt"))
    stopped_at = torch.load(ckpt, weights_only=True)["step"]
    run_script("train_draem.py", *train_args(data, 4), "--resume", cwd=tmp_path / "b")
    a = final_weights(next((tmp_path / "a" / "checkpoints").glob("*.pt")))
    b = final_weights(ckpt)
    assert stopped_at <= 12
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # TensorBoard continues at the same step: one curve, steps strictly increasing up to the last.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    steps = [e.step for e in EventAccumulator(str(tmp_path / "b" / "logs" / ckpt.stem)).Reload().Scalars("loss/total")]
    assert steps == sorted(set(steps)) and steps[-1] == 12 and {2, 4, 6, 8, 10, 12} <= set(steps)


def test_sigkill_at_random_moments_always_leaves_a_loadable_checkpoint(tmp_path, data):
    rng = random.Random(0)
    for attempt in range(3):
        proc = start(train_args(data, 12) + ["--resume"], tmp_path)
        wait_for_checkpoint(tmp_path, proc)
        time.sleep(rng.uniform(0.0, 1.0))
        proc.kill()
        proc.wait()
        ckpt = next((tmp_path / "checkpoints").glob("*.pt"))
        state = torch.load(ckpt, weights_only=True)
        assert state["format"] == "draem-checkpoint-v1"
    run_script("train_draem.py", *train_args(data, 12), "--resume", cwd=tmp_path, timeout=600)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 12


def test_non_finite_loss_stops_naming_the_step_and_saves_nothing_bad(tmp_path, data):
    # Adam with an absurd learning rate drives the weights to Inf within a few steps.
    proc = fails("train_draem.py", "--data_path", data, "--obj_id", "weave", "--lr", "1e30", "--epochs", "3",
                 "--eval_every", "-1", *TINY, cwd=tmp_path, expect="NaN or Inf at step")
    for path in (tmp_path / "checkpoints").glob("*.pt"):
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["reconstructive"].values() if v.is_floating_point())
    assert "step" in proc.stderr.splitlines()[-1]
