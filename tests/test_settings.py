"""A run's settings: one plain dict from train_draem.py's flags, feeding the checkpoint, the name and grouping."""
import pytest
import torch

import train_draem
from helpers import run_settings
from model_unet import DraemModel
from scoring.results import configuration_means, seed_summaries
from training.checkpoint import UNRECORDED, model_from_checkpoint, save_training
from training.settings import LOCATIONS, differences, run_name

# A different value for every setting of the identity: each must change the run's name.
CHANGED = {"category": "bottle", "image_size": [256, 512], "train_crop": [128, 128], "base_width": 64,
           "seg_base_width": 32, "recipe": "paper", "sspcab": True, "score_loss": 0.1, "bs": 16, "lr": 2e-4,
           "epochs": 800, "seed": 1,
           "amp": "bf16", "processes": 4, "sync_bn": True, "channel_order": "RGB",
           "bit_depth": 12, "calibration_split": 0.1, "train_defects": 16, "pixel_labels": "5", "defect_share": 0.5,
           "unsupervised": True, "paste_defects": False, "paste_contrast": 0.5}


def test_every_setting_that_shapes_the_weights_changes_the_run_name():
    base = run_settings(category="carpet", data_path="/data", anomaly_source_path="/dtd")
    assert set(CHANGED) == set(base) - set(LOCATIONS)  # a new flag must be added here, and so to the identity
    names = {run_name(base)}
    for key, value in CHANGED.items():
        other = base | {key: value}
        assert run_name(other) != run_name(base), key
        assert differences(base, other) == [f"{key} {spelled(base[key])} -> {spelled(value)}"]
        names.add(run_name(other))
    assert len(names) == len(CHANGED) + 1
    # without anomaly sources (Perlin noise as the source) is another configuration ...
    assert run_name(base | {"anomaly_source_path": None}) != run_name(base)
    # ... but the same data at another path is the same one
    moved = base | {"data_path": "/mnt/other", "anomaly_source_path": "/mnt/dtd"}
    assert run_name(moved) == run_name(base) and differences(base, moved) == []


# The settings every checkpoint has recorded since they became one plain dict (d73f8dc, 2026-12-03).
FIRST_RECORDED = {"amp", "anomaly_source_path", "base_width", "bit_depth", "bs", "calibration_split", "category",
                  "channel_order", "data_path", "defect_share", "epochs", "image_size", "lr", "paste_defects",
                  "pixel_labels", "processes", "recipe", "seed", "seg_base_width", "sspcab", "sync_bn", "train_crop",
                  "train_defects", "unsupervised"}


def test_a_setting_added_later_says_what_older_checkpoints_trained_with():
    later = set(run_settings()) - FIRST_RECORDED
    assert later, "the list above is out of date"
    # without it, --resume refuses every checkpoint written before the flag existed (tests/integration/test_runs.py)
    assert later <= set(UNRECORDED), f"add {sorted(later - set(UNRECORDED))} to UNRECORDED (training/checkpoint.py)"


def spelled(value):
    return "x".join(map(str, value)) if isinstance(value, list) else str(value)


def test_run_name_is_readable():
    name = run_name(run_settings(category="carpet", image_size=(256, 320), train_crop=(128, 128), base_width=32,
                                 seg_base_width=16, sspcab=True, epochs=20, bs=4, seed=2, anomaly_source_path="/dtd"))
    assert name.startswith("DRAEM_carpet_official_256x320_crop128x128_w32-16_sspcab_ep20_bs4_seed2_")
    assert len(name.rsplit("_", 1)[1]) == 6


def test_the_checkpoint_stores_the_settings_as_plain_values(tmp_path):
    settings = run_settings(category="carpet", image_size=(64, 96), train_crop=(32, 32), base_width=4,
                            seg_base_width=4)
    assert settings["image_size"] == [64, 96] and settings["data_path"] == "data"
    save_training(tmp_path / "run.pt", DraemModel(4, 4), settings)
    _, info = model_from_checkpoint(tmp_path / "run.pt")
    assert info.config == settings and info.image_size == (64, 96)


def test_a_file_without_a_setting_scores_with_the_value_files_had_before_it_existed(tmp_path):
    # a checkpoint written before bit depth, colour order and SSPCAB were recorded, with a square side as an int
    older = {k: v for k, v in run_settings(base_width=4, seg_base_width=4).items()
             if k not in ("bit_depth", "channel_order", "sspcab")} | {"image_size": 32}
    save_training(tmp_path / "old.pt", DraemModel(4, 4), older)
    model, info = model_from_checkpoint(tmp_path / "old.pt")
    assert (info.bit_depth, info.channel_order, info.image_size) == (16, "BGR", (32, 32))
    assert model(torch.zeros(1, 3, 32, 32)).anomaly_map.shape == (1, 32, 32)


def test_stored_settings_are_the_flags_but_those_of_the_process_plus_what_the_script_decides():
    flags = {a.dest for a in train_draem.get_args_parser()._actions} - {"help"}
    stored = set(run_settings())
    assert set(train_draem.PROCESS_FLAGS) <= flags
    assert stored == (flags - set(train_draem.PROCESS_FLAGS)) | {"category", "processes", "channel_order"}
    args = train_draem.parse_args(["--data_path", "x", "--seed", "3", "--image_size", "64x96", "--sspcab"])
    stored = train_draem.settings(args)
    assert (stored["seed"], stored["image_size"], stored["sspcab"], stored["data_path"]) == (3, [64, 96], True, "x")


def result(category, **changes):
    return {"category": category, "source": "draem",
            "config": run_settings(category=category, anomaly_source_path="/dtd", **changes),
            **{m: 0.5 for m in ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap",
                                "pixel_f1_max", "aupro")}}


def test_means_are_per_configuration_and_seed_summaries_per_category():
    results = {"a0": result("carpet", seed=0), "a1": result("carpet", seed=1), "b0": result("bottle", seed=0),
               "s0": result("carpet", seed=0, sspcab=True),
               "official": {"category": "carpet", "source": "official", "aupro": 0.1, "image_auroc": 0.9,
                            "config": {"base_width": 128, "seg_base_width": 64, "image_size": [256, 256],
                                       "sspcab": False},
                            **{m: 0.2 for m in ("image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max")}}}
    results["a1"]["image_auroc"] = 0.7
    means = {tuple(row["runs"]): row for row in configuration_means(results)}
    assert set(means) == {("a0", "b0"), ("a1",), ("s0",), ("official",)}
    assert means[("a1",)]["image_auroc"] == 0.7
    [seeds] = seed_summaries(results)
    assert seeds["runs"] == ["a0", "a1"] and seeds["seeds"] == [0, 1] and seeds["category"] == "carpet"
    assert seeds["image_auroc"]["mean"] == pytest.approx(0.6)
