"""Bad input gets one line and exit status 2; interrupted runs resume exactly; checkpoints load safely."""
import os
import pickle
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, TINY, call_script, tiny_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("robust") / "data")


def fails(script, *args, cwd, expect):
    proc = call_script(script, *args, cwd=cwd, check=False)
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
                                        ("--obj_id", "99"), ("--score_loss", "-1"),
                                        ("--paste_contrast", "1")])
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
    call_script("train_draem.py", "--data_path", data, "--obj_id", "weave", "--epochs", "1", "--eval_every", "-1",
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


def train_args(data, epochs, *extra):
    return ["--data_path", data, "--obj_id", "weave", "--anomaly_source_path", data / "sources", "--epochs", epochs,
            "--eval_every", "-1", "--seed", "3", *TINY, "--log_every", "1", *extra]


def start(args, cwd):
    return subprocess.Popen([sys.executable, str(ROOT / "train_draem.py"), *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def progress_steps(stdout: str) -> list[int]:
    return [int(line.split()[2].split("/")[0]) for line in stdout.splitlines() if line.startswith("[weave] step ")]


def wait_for_step(proc, step: int) -> list[str]:
    """Read the progress lines until one reports `step` or later; return the lines read."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if progress_steps(line) and progress_steps(line)[0] >= step:
            return lines
    raise AssertionError(f"the run ended before step {step}: {''.join(lines)[-2000:]}")


def logged(folder, run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    return [(e.step, e.value) for e in EventAccumulator(str(folder / "logs" / run)).Reload().Scalars("loss/total")]


def test_sigterm_stops_mid_run_and_resume_continues_where_it_stopped(tmp_path, data):
    total = 48  # 16 epochs of 3 steps: the signal lands long before the end
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    call_script("train_draem.py", *train_args(data, 16), cwd=tmp_path / "a")
    proc = start(train_args(data, 16), tmp_path / "b")
    read = wait_for_step(proc, 5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    [ckpt] = (tmp_path / "b" / "checkpoints").glob("*.pt")
    stopped_at = torch.load(ckpt, weights_only=True)["step"]
    assert 5 <= stopped_at < total and f"stopped at step {stopped_at}" in err and "SIGTERM" in err
    assert max(progress_steps("".join(read) + out)) == stopped_at
    resumed = call_script("train_draem.py", *train_args(data, 16), "--resume", cwd=tmp_path / "b")
    # The resumed process started at the stopped step: its first progress line is the next step. (Every random
    # stream is a function of the step, so a run restarted from step 0 would end with the same weights:
    # equal weights alone would prove nothing.)
    assert f"resumed from checkpoints/{ckpt.name} at step {stopped_at}" in resumed.stdout
    assert progress_steps(resumed.stdout) == list(range(stopped_at + 1, total + 1))
    a = torch.load(next((tmp_path / "a" / "checkpoints").glob("*.pt")), weights_only=True)
    b = torch.load(ckpt, weights_only=True)
    assert a["step"] == b["step"] == total
    for part in ("reconstructive", "discriminative"):
        for key, value in a[part].items():
            torch.testing.assert_close(b[part][key], value, rtol=1e-5, atol=1e-6, msg=f"{part}.{key}")
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(b["optimizer"]["state"][index][key], value, rtol=1e-5, atol=1e-6,
                                       msg=f"optimizer {index} {key}")
    # TensorBoard: one curve, every step once, equal to the uninterrupted run's at every step.
    whole, split = logged(tmp_path / "a", ckpt.stem), logged(tmp_path / "b", ckpt.stem)
    assert [s for s, _ in split] == list(range(1, total + 1)) == [s for s, _ in whole]
    assert [v for _, v in split] == pytest.approx([v for _, v in whole], rel=1e-4)


# Runs train_draem.py with torch.save replaced: the first save is whole; the second writes half its bytes to the
# temporary file, says so on stderr and hangs, so the test kills the process inside a write every time (polling
# for the temporary file raced the write and missed it on a fast disk).
HALF_WRITE = """
import io, runpy, sys, time, torch
sys.path.insert(0, sys.argv[1])
save, saves = torch.save, []
def save_half_then_hang(obj, file):
    saves.append(file)
    if len(saves) == 1:
        return save(obj, file)
    whole = io.BytesIO()
    save(obj, whole)
    with open(file, "wb") as out:
        out.write(whole.getvalue()[: whole.tell() // 2])
    print("half written:", file, file=sys.stderr, flush=True)
    time.sleep(600)
torch.save = save_half_then_hang
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_checkpoint(tmp_path, data):
    """Kill the process while its second checkpoint is half written: the checkpoint at the path is the first one,
    whole, the half-written temporary file never takes its name, and --resume continues from it."""
    args = train_args(data, 4)
    proc = subprocess.Popen([sys.executable, "-c", HALF_WRITE, str(ROOT), str(ROOT / "train_draem.py"),
                             *map(str, args)], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    said = []
    for line in proc.stderr:
        said.append(line)
        if line.startswith("half written:"):
            break
    proc.kill()
    proc.wait()
    assert said and said[-1].startswith("half written:"), "".join(said)  # the kill came inside the second save
    folder = tmp_path / "checkpoints"
    [half] = [n for n in os.listdir(folder) if ".tmp" in n]  # the kill left the half-written file behind
    assert 0 < (folder / half).stat().st_size
    [ckpt] = folder.glob("*.pt")
    state = torch.load(ckpt, weights_only=True)
    assert state["format"] == "draem-checkpoint-v1" and state["step"] == 3  # the first save: the end of epoch 1
    call_script("train_draem.py", *args, "--resume", cwd=tmp_path)
    assert torch.load(ckpt, weights_only=True)["step"] == 12


def test_non_finite_loss_stops_naming_the_step_and_saves_nothing_bad(tmp_path, data):
    # Adam with an absurd learning rate drives the weights to Inf within a few steps.
    proc = fails("train_draem.py", "--data_path", data, "--obj_id", "weave", "--lr", "1e30", "--epochs", "3",
                 "--eval_every", "-1", *TINY, cwd=tmp_path, expect="NaN or Inf at step")
    for path in (tmp_path / "checkpoints").glob("*.pt"):
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["reconstructive"].values() if v.is_floating_point())
    assert "step" in proc.stderr.splitlines()[-1]
