"""torchrun on the CPU with gloo: category-parallel and data-parallel training."""
import os
import re
import shutil
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


def test_ddp_resume_is_exact(two_categories, tmp_path):
    # Every random stream is a function of (seed, epoch or step, rank), so a checkpoint's step is all a
    # data-parallel run needs to continue exactly, on every rank.
    _, data = two_categories
    common = ["--ddp", "--obj_id", "weave", "--data_path", data, "--anomaly_source_path", data / "sources",
              "--eval_every", "-1", *TINY]
    for run in ("whole", "split"):
        (tmp_path / run).mkdir()
    torchrun(*common, "--epochs", "2", cwd=tmp_path / "whole")
    torchrun(*common, "--epochs", "1", cwd=tmp_path / "split")
    [first] = (tmp_path / "split" / "checkpoints").glob("*_ep1_*.pt")
    proc = torchrun(*common, "--epochs", "2", "--resume", first, cwd=tmp_path / "split")
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    [name] = [p.name for p in (tmp_path / "whole" / "checkpoints").glob("*.pt")]
    assert "_ep2_" in name
    whole = torch.load(tmp_path / "whole" / "checkpoints" / name, weights_only=True)
    split = torch.load(tmp_path / "split" / "checkpoints" / name, weights_only=True)
    assert whole["step"] == split["step"] == 4
    for net in ("reconstructive", "discriminative"):
        for key, value in whole[net].items():
            torch.testing.assert_close(split[net][key], value, rtol=1e-5, atol=1e-6, msg=key)
