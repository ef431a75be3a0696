"""torchrun on the CPU with gloo: category-parallel and data-parallel training."""
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, TINY, tiny_dataset


def torchrun(*args, cwd, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train_draem.py"), *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def two_categories(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    data = tiny_dataset(root / "data")
    shutil.copytree(data / "weave", data / "weave2")
    return root, data


def test_category_parallel_writes_each_checkpoint_once(two_categories, tmp_path):
    _, data = two_categories
    proc = torchrun("--obj_id", "-1", "--data_path", data, "--epochs", "1", "--eval_every", "-1", *TINY, cwd=tmp_path)
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert sorted(c.split("_")[1] for c in checkpoints) == ["weave", "weave2"]
    assert all("_official_32x32_w4-4_ep1_bs4_seed0_" in c for c in checkpoints)
    out = proc.stdout
    assert out.count("[weave] checkpoint") == 1 and out.count("[weave2] checkpoint") == 1
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [c[:-3] for c in checkpoints]


def test_ddp_keeps_ranks_identical_and_writes_one_checkpoint(two_categories, tmp_path):
    _, data = two_categories
    proc = torchrun("--ddp", "--obj_id", "weave", "--data_path", data, "--anomaly_source_path", data / "sources",
                    "--epochs", "2", "--eval_every", "-1", *TINY, cwd=tmp_path)
    fingerprints = dict(re.findall(r"rank (\d) parameter fingerprint (\w+)", proc.stdout))
    assert set(fingerprints) == {"0", "1"} and fingerprints["0"] == fingerprints["1"]
    checkpoints = list((tmp_path / "checkpoints").iterdir())
    assert len(checkpoints) == 1
    state = torch.load(checkpoints[0], weights_only=True)
    # 12 images, global batch 2 x 4 = 8: two steps per epoch.
    assert state["step"] == 4 and state["epoch"] == 2
    assert proc.stdout.count("] checkpoint") == 1


def worker_pid(parent: int, rank: int) -> int:
    """The process torchrun started for a rank (found by its parent and its RANK variable)."""
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            environment = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if ppid == parent and f"RANK={rank}".encode() in environment:
            return int(entry)
    raise AssertionError(f"no worker of rank {rank} under process {parent}")


def test_sigterm_to_one_rank_stops_both_at_one_step_and_resume_is_exact(two_categories, tmp_path):
    """SIGTERM reaches rank 1 only; the ranks agree at the next log point, rank 0 saves that step; the resumed
    run starts there, crosses both learning-rate milestones (epochs 8 and 9 of 10) and ends with the
    weights of an uninterrupted run, equal on both ranks."""
    _, data = two_categories
    common = ["--ddp", "--obj_id", "weave", "--data_path", data, "--anomaly_source_path", data / "sources",
              "--eval_every", "-1", "--epochs", "10", *TINY, "--log_every", "1"]
    total = 20  # 12 images, global batch 2 x 4 = 8: two steps per epoch
    for run in ("whole", "split"):
        (tmp_path / run).mkdir()
    torchrun(*common, cwd=tmp_path / "whole")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(ROOT / "train_draem.py"), *map(str, common)], cwd=tmp_path / "split",
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    read = []
    for line in proc.stdout:
        read.append(line)
        if line.startswith("[weave] step 4/"):
            os.kill(worker_pid(proc.pid, 1), signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=300)
    stops = [int(s) for s in re.findall(r"\[weave\] stopped at step (\d+)", err)]
    assert len(stops) == 2 and stops[0] == stops[1], err[-3000:]
    stopped_at = stops[0]
    assert 4 <= stopped_at < total and "SIGTERM" in err and proc.returncode != 0
    [ckpt] = (tmp_path / "split" / "checkpoints").glob("*.pt")
    assert torch.load(ckpt, weights_only=True)["step"] == stopped_at
    resumed = torchrun(*common, "--resume", cwd=tmp_path / "split")
    assert resumed.stdout.count(f"resumed from checkpoints/{ckpt.name} at step {stopped_at}") == 2  # both ranks
    steps = [int(m) for m in re.findall(r"\[weave\] step (\d+)/", resumed.stdout)]
    assert steps == list(range(stopped_at + 1, total + 1))
    fingerprints = dict(re.findall(r"rank (\d) parameter fingerprint (\w+)", resumed.stdout))
    assert set(fingerprints) == {"0", "1"} and fingerprints["0"] == fingerprints["1"]
    whole = torch.load(tmp_path / "whole" / "checkpoints" / ckpt.name, weights_only=True)
    split = torch.load(ckpt, weights_only=True)
    assert whole["step"] == split["step"] == total
    for net in ("reconstructive", "discriminative"):
        for key, value in whole[net].items():
            torch.testing.assert_close(split[net][key], value, rtol=1e-5, atol=1e-6, msg=key)
