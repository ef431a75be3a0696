"""TrainConfig: one place for every setting of a run, feeding the flags, the checkpoint, the name and grouping."""
import dataclasses
from pathlib import Path

import pytest

from training.config import LOCATIONS, TrainConfig, get_args_parser, parse_args
from scoring.results import configuration_means, seed_summaries

# A different value for every field of the identity: each must change the run's name.
CHANGED = {"category": "bottle", "image_size": (256, 512), "train_crop": (128, 128), "base_width": 64,
           "seg_base_width": 32, "recipe": "paper", "sspcab": True, "bs": 16, "lr": 2e-4, "epochs": 800, "seed": 1,
           "amp": "bf16", "processes": 4, "sync_bn": True, "channel_order": "RGB",
           "bit_depth": 12, "calibration_split": 0.1, "train_defects": 16, "pixel_labels": "5", "defect_share": 0.5,
           "unsupervised": True, "paste_defects": False}


def test_every_setting_that_shapes_the_weights_changes_the_run_name():
    base = TrainConfig(category="carpet", data_path="/data", anomaly_source_path="/dtd")
    identity_fields = {f.name for f in dataclasses.fields(TrainConfig)} - set(LOCATIONS)
    assert set(CHANGED) == identity_fields  # a new field must be added here, and so to the identity
    names = {base.run_name()}
    for key, value in CHANGED.items():
        other = dataclasses.replace(base, **{key: value})
        assert other.run_name() != base.run_name(), key
        assert base.differences(other) == [f"{key} {fmt(getattr(base, key))} -> {fmt(value)}"]
        names.add(other.run_name())
    assert len(names) == len(CHANGED) + 1
    # without anomaly sources (Perlin noise as the source) is another configuration ...
    assert dataclasses.replace(base, anomaly_source_path=None).run_name() != base.run_name()
    # ... but the same data at another path is the same one
    moved = dataclasses.replace(base, data_path="/mnt/other", anomaly_source_path="/mnt/dtd")
    assert moved.run_name() == base.run_name() and base.differences(moved) == []


def test_settings_added_later_keep_older_names_at_their_earlier_value():
    older = TrainConfig.from_dict({"category": "carpet", "seed": 3, "anomaly_source_path": "/dtd"})  # no bit_depth
    assert older.bit_depth == "auto" and older.calibration_split == 0.0
    assert dataclasses.replace(older, bit_depth=8).run_name() == older.run_name()  # 8-bit data read as before
    assert dataclasses.replace(older, bit_depth=12).run_name() != older.run_name()
    assert dataclasses.replace(older, calibration_split=0.1).run_name() != older.run_name()


def fmt(value):
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value)


def test_run_name_is_readable():
    config = TrainConfig(category="carpet", image_size=(256, 320), train_crop=(128, 128), base_width=32,
                         seg_base_width=16, sspcab=True, epochs=20, bs=4, seed=2, anomaly_source_path="/dtd")
    name = config.run_name()
    assert name.startswith("DRAEM_carpet_official_256x320_crop128x128_w32-16_sspcab_ep20_bs4_seed2_")
    assert len(name.rsplit("_", 1)[1]) == 6


def test_checkpoint_dict_round_trip_and_older_configs():
    config = TrainConfig(category="carpet", data_path=Path("/data"), image_size=(64, 96), train_crop=(32, 32))
    stored = config.to_dict()
    assert stored["image_size"] == [64, 96] and stored["data_path"] == "/data"
    assert TrainConfig.from_dict(stored) == config
    # an older checkpoint: a square side as an int, no processes / sync_bn / train_crop, an unknown key
    old = {"bs": 4, "lr": 1e-4, "epochs": 2, "base_width": 4, "seg_base_width": 4, "recipe": "official",
           "sspcab": False, "seed": 0, "amp": "off", "image_size": 32, "category": "weave", "channel_order": "BGR",
           "data_path": "d", "anomaly_source_path": "", "removed_setting": 1}
    loaded = TrainConfig.from_dict(old)
    assert loaded.image_size == (32, 32) and loaded.processes == 1 and loaded.train_crop is None
    assert loaded.anomaly_source_path is None


def test_every_setting_but_those_the_script_decides_is_a_training_flag():
    flags = {a.dest for a in get_args_parser()._actions}
    for f in dataclasses.fields(TrainConfig):
        assert (f.name in flags) == (f.name not in ("category", "processes", "channel_order")), f.name
    args = parse_args(["--data_path", "x", "--seed", "3", "--image_size", "64x96", "--sspcab"])
    config = TrainConfig.from_args(args, category="c")
    assert (config.seed, config.image_size, config.sspcab, config.data_path) == (3, (64, 96), True, "x")


def result(category, **settings):
    config = TrainConfig(category=category, anomaly_source_path="/dtd", **settings)
    return {"category": category, "source": "draem", "config": config.to_dict(),
            **{m: 0.5 for m in ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap",
                                "pixel_f1_max", "aupro")}}


def test_means_are_per_configuration_and_seed_summaries_per_category():
    results = {"a0": result("carpet", seed=0), "a1": result("carpet", seed=1), "b0": result("bottle", seed=0),
               "s0": result("carpet", seed=0, sspcab=True),
               "official": {"category": "carpet", "source": "official", "aupro": 0.1, "image_auroc": 0.9,
                            "config": {"base_width": 128, "seg_base_width": 64, "image_size": [256, 256]},
                            **{m: 0.2 for m in ("image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max")}}}
    results["a1"]["image_auroc"] = 0.7
    means = {tuple(row["runs"]): row for row in configuration_means(results)}
    assert set(means) == {("a0", "b0"), ("a1",), ("s0",), ("official",)}
    assert means[("a1",)]["image_auroc"] == 0.7
    [seeds] = seed_summaries(results)
    assert seeds["runs"] == ["a0", "a1"] and seeds["seeds"] == [0, 1] and seeds["category"] == "carpet"
    assert seeds["image_auroc"]["mean"] == pytest.approx(0.6)
