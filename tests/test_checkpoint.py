"""The checkpoint writer is atomic: a write or a rename that fails part-way leaves the previous checkpoint
byte for byte, and no temporary file behind."""
import os

import pytest
import torch

from helpers import run_settings
from model_unet import DraemModel
from training import checkpoint
from training.checkpoint import load_checkpoint, save_training


def saved(tmp_path, seed):
    torch.manual_seed(seed)
    path = tmp_path / "run.pt"
    save_training(path, DraemModel(4, 4), run_settings(category="part", seed=seed), {"step": seed})
    return path


def test_a_write_that_dies_part_way_leaves_the_last_checkpoint(tmp_path, monkeypatch):
    path = saved(tmp_path, 1)
    before = path.read_bytes()
    real_save = torch.save

    def dies_half_way(obj, f):  # writes half of a real checkpoint, then the process "dies"
        import io
        buffer = io.BytesIO()
        real_save(obj, buffer)
        half = buffer.getvalue()[: len(buffer.getvalue()) // 2]
        if isinstance(f, (str, os.PathLike)):  # a writer that saves to a path directly
            with open(f, "wb") as out:
                out.write(half)
        else:
            f.write(half)
        raise KeyboardInterrupt("killed while writing")
    monkeypatch.setattr(checkpoint.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        saved(tmp_path, 2)
    assert path.read_bytes() == before and load_checkpoint(path)[1].step == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]


def test_a_rename_that_fails_leaves_the_last_checkpoint(tmp_path, monkeypatch):
    path = saved(tmp_path, 1)
    before = path.read_bytes()

    def fails(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint.os, "replace", fails)
    with pytest.raises(OSError):
        saved(tmp_path, 2)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]
    monkeypatch.undo()
    saved(tmp_path, 3)
    assert load_checkpoint(path)[1].step == 3
