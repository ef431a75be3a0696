"""A run's settings as one plain dict: train_draem.py's flags that shape the weights plus what the script decided
for the run (category, amp, bit depth, calibration split, processes, colour order). The checkpoint stores this dict;
here it names the run, --resume compares it (and finds the checkpoint to continue) and scoring groups results by it.
"""
import hashlib
import json
import sys
from collections.abc import Mapping
from pathlib import Path

from recipe import RECIPES
from training.checkpoint import CheckpointError, ModelInfo, run_settings_of

# Where the data lives is recorded but is not part of what a run is: the same data may sit at another path on
# another machine, and seeds trained there still belong to one configuration.
LOCATIONS = ("data_path", "anomaly_source_path")
# The settings a run's name spells out; a digest of all the others follows them.
NAMED = ("category", "recipe", "image_size", "train_crop", "base_width", "seg_base_width", "sspcab", "epochs", "bs",
         "seed")


def plain(value: object) -> object:
    """JSON's spelling of a setting: paths as strings, sizes as [height, width] lists."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def plain_settings(settings: Mapping) -> dict:
    return {k: plain(v) for k, v in settings.items()}


def identity(settings: Mapping) -> dict:
    """Every setting that changes the trained weights: the locations replaced by whether textures are used, a split
    file named by its file name wherever it lies."""
    values = {k: v for k, v in plain_settings(settings).items() if k not in LOCATIONS}
    values["anomaly_sources"] = "textures" if settings.get("anomaly_source_path") else "perlin noise"
    labels = str(values.get("pixel_labels", "all"))
    if labels != "all" and not labels.isdigit():
        values["pixel_labels"] = Path(labels).name
    return values


def differences(mine: Mapping, theirs: Mapping, ignore: tuple[str, ...] = ()) -> list[str]:
    """'name: mine -> theirs' for each setting of the identity that differs, except those ignored."""
    a, b = identity(mine), identity(theirs)
    return [f"{k} {spelled(a.get(k))} -> {spelled(b.get(k))}" for k in sorted(a.keys() | b.keys())
            if k not in ignore and a.get(k) != b.get(k)]


def digest(settings: Mapping, leave_out: tuple[str, ...] = NAMED) -> str:
    """Six hex digits of the identity's settings other than leave_out."""
    rest = {k: v for k, v in identity(settings).items() if k not in leave_out}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()[:6]


def variant(settings: Mapping, leave_out: tuple[str, ...] = ("category",)) -> str:
    """A readable label of the settings, without those left out; equal labels mean equal settings."""
    s = plain_settings(settings)
    crop = s.get("train_crop")
    parts = {"category": s["category"], "recipe": s["recipe"], "image_size": spelled(s["image_size"]),
             "train_crop": f"crop{spelled(crop)}" if crop else "",
             "widths": f"w{s['base_width']}-{s['seg_base_width']}", "sspcab": "sspcab" if s["sspcab"] else "",
             "epochs": f"ep{s['epochs']}", "bs": f"bs{s['bs']}", "seed": f"seed{s['seed']}"}
    shown = [v for k, v in parts.items() if v and k not in leave_out]
    return "_".join(shown + [digest(settings, NAMED + tuple(leave_out))])


def run_name(settings: Mapping) -> str:
    """DRAEM_<category>_<recipe>_<HxW>[_crop<hxw>]_w<widths>[_sspcab]_ep<epochs>_bs<bs>_seed<seed>_<digest of the rest>."""
    return "DRAEM_" + variant(settings, leave_out=())


def spelled(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return "x".join(map(str, value))
    return str(value)


# ---- --resume: which checkpoint continues this run, and whether it may (same settings; more --epochs extends)

def resume_path(resume: str | None, settings: dict, ckpt_path: Path) -> Path | None:
    """The checkpoint --resume continues from; None to start afresh.

    --resume PATH: that file. --resume alone: this run's own checkpoint, else the one checkpoint beside it of the
    same run trained for another --epochs (extended by check_resumable's rules); two such are an error naming both,
    and none is said in one line before starting afresh."""
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.is_file():
            raise CheckpointError(f"--resume {path}: no such checkpoint")
        return path
    if ckpt_path.is_file():
        return ckpt_path
    others = [p for p in sorted(ckpt_path.parent.glob("*.pt")) if other_length_of(p, settings)]
    if len(others) > 1:
        raise CheckpointError(f"--resume: {len(others)} checkpoints of this run with other --epochs "
                              f"({', '.join(map(str, others))}): name the one to continue with --resume PATH")
    if not others:
        print(f"[{settings['category']}] --resume: no checkpoint of this run in {ckpt_path.parent} ({ckpt_path.name}, "
              f"or the same run with other --epochs): starting afresh", file=sys.stderr)
        return None
    return others[0]


def other_length_of(path: Path, settings: dict) -> bool:
    """Whether the checkpoint at path is this very run trained for another --epochs: its settings differ in the
    epoch count alone."""
    stored = run_settings_of(path)
    return stored is not None and not differences(stored, settings, ignore=("epochs",))


def check_resumable(info: ModelInfo, settings: dict, path: Path, total_steps: int) -> None:
    """--resume continues the same run: equal settings, except --epochs, which may extend it."""
    if info.source != "draem":
        raise CheckpointError(f"--resume {path}: not a training checkpoint of this project")
    stored = info.config
    changed = differences(stored, settings, ignore=("epochs",))  # where the data lives is not compared
    if changed:
        raise CheckpointError(f"--resume {path}: that run has other settings ({'; '.join(changed)}); resume "
                              f"with its settings, or train this configuration under its own name")
    if info.step >= total_steps:
        raise CheckpointError(f"--resume {path}: the checkpoint is at step {info.step}, and --epochs "
                              f"{settings['epochs']} ends at step {total_steps}: give more --epochs to extend it")
    for location in ("data_path", "anomaly_source_path"):
        if stored.get(location) != settings.get(location):
            print(f"note: --{location} {settings.get(location)} (the checkpoint trained on {stored.get(location)})",
                  file=sys.stderr)
    if stored["epochs"] != settings["epochs"]:
        epochs, recipe = settings["epochs"], RECIPES[settings["recipe"]]
        milestones = ", ".join(str(round(f * epochs)) for f in recipe.lr_milestones) or "none"
        print(f"note: extending a {stored['epochs']}-epoch run to {epochs} epochs: from step {info.step} the "
              f"learning rate follows the {epochs}-epoch schedule (x{recipe.lr_decay:g} at epochs {milestones})",
              file=sys.stderr)
