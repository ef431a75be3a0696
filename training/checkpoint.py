"""The checkpoint format, written and read here alone: one dict per category and run, written atomically.

Also reads the official two-file ``.pckl`` state_dicts and anomalib checkpoints. Everything loads with
``torch.load(weights_only=True)``: a checkpoint is a pickle, and an untrusted one must not be able to run code.
"""
import math
import os
import pickle
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from data_loader import CATEGORIES, CHANNEL_ORDER, FULL_RANGE, height_width
from model_unet import DraemModel
from training.files import first_line, write_atomically

FORMAT = "draem-checkpoint-v1"
# A setting a file does not record (official and anomalib weights, and checkpoints written before the setting
# existed): the value those were trained and are read with. Scoring reads it, and --resume compares it, so that a
# run trained before a flag was added continues under the code that adds it. A flag added to train_draem.py gets
# its entry here: the value at which it trains as the code did before it (tests/test_settings.py checks).
UNRECORDED = {"image_size": [256, 256], "channel_order": CHANNEL_ORDER, "bit_depth": FULL_RANGE, "sspcab": False,
              "recipe": "official", "score_loss": 0.0, "paste_contrast": 0.0}
ANOMALIB_PREFIX = "model."


class CheckpointError(ValueError):
    """A checkpoint problem the scripts report as one line (no traceback)."""


@dataclass
class ModelInfo:
    """What scoring needs to know about a model besides its weights."""
    config: dict  # the run's settings (training/settings.py); for official and anomalib weights, what the weights tell
    category: str | None
    run: str  # the file's name without its suffix: what results are listed under
    source: str  # "draem" (this project), "official", "anomalib" or "onnx"
    metrics: dict = field(default_factory=dict)  # the end-of-training evaluation, with its operating points
    step: int = 0
    calibration: dict = field(default_factory=dict)  # thresholds set on good images alone (scoring/calibration.py)
    trained_defects: list[dict] = field(default_factory=list)  # real defect files trained on (training/defects.py)

    def __post_init__(self) -> None:
        self.config = UNRECORDED | self.config

    @property
    def trained_digests(self) -> frozenset[str]:
        """The digests of the defect images the model trained on: every evaluation leaves these files out."""
        return frozenset(f["digest"] for f in self.trained_defects)

    @property
    def image_size(self) -> tuple[int, int]:
        return height_width(self.config["image_size"])

    @property
    def channel_order(self) -> str:
        return self.config["channel_order"]

    @property
    def bit_depth(self) -> int:
        """How 16-bit images are read (data_loader.to_bgr8)."""
        return int(self.config["bit_depth"])

    @property
    def operating_points(self) -> dict:
        return self.metrics.get("operating_points", {})

    def test_set_threshold(self, kind: str) -> float | None:
        """The max-F1 threshold, "image" or "pixel", of the labelled test set scored at the end of training."""
        value = self.operating_points.get(kind, {}).get("threshold")
        return None if value is None or math.isnan(value) else value

    def calibrated_threshold(self, kind: str) -> float | None:
        """The threshold, "image" or "pixel", calibrated for a false-alarm budget on good images."""
        return self.calibration.get(kind, {}).get("threshold")

    def threshold(self, kind: str) -> float | None:
        """The deployed threshold: the one calibrated on good images for the false-alarm budget asked for, else
        the labelled test set's max-F1 one, else None. Verdicts on the line, exports' metadata and the examples
        all use this one."""
        found = self.calibrated_threshold(kind)
        return found if found is not None else self.test_set_threshold(kind)


def load_weights(model: DraemModel, state: dict, path: Path, optimizer: torch.optim.Optimizer | None = None,
                 scaler: torch.amp.GradScaler | None = None) -> None:
    """A checkpoint's weights (load_checkpoint's state; and, when given, the optimiser's and scaler's state) into a
    model of the same architecture."""
    for net, name in ((model.reconstructive_subnetwork, "reconstructive"),
                      (model.discriminative_subnetwork, "discriminative")):
        try:
            net.load_state_dict(state[name])
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())[:300]
            raise CheckpointError(f"checkpoint {path}: {name} weights are of another architecture or "
                                  f"width ({detail})")
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scaler is not None:
        scaler.load_state_dict(state["scaler"])


# ---- writing ------------------------------------------------------------------------------------------

PROGRESS = {"epoch": 0, "step": 0, "metrics": {}, "calibration": {}, "trained_defects": []}


def save_training(path: Path, model: DraemModel, settings: dict, progress: dict | None = None,
                  optimizer: torch.optim.Optimizer | None = None, scaler: torch.amp.GradScaler | None = None) -> None:
    """A training run's checkpoint: weights, settings (a plain dict, training/settings.py), optimiser state and the
    run's progress: any of PROGRESS's entries (the step and epoch reached, the latest metrics, thresholds calibrated
    on good images, the real defect files it trained on); those not given are empty."""
    unknown = set(progress or {}) - set(PROGRESS)
    if unknown:
        raise ValueError(f"save_training: unknown progress entries {sorted(unknown)}")
    write_atomically(path, partial(torch.save, {
        "format": FORMAT, "config": settings, "category": settings["category"], "run": path.stem,
        "reconstructive": model.reconstructive_subnetwork.state_dict(),
        "discriminative": model.discriminative_subnetwork.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer else None, "scaler": scaler.state_dict() if scaler else None,
        **PROGRESS, **(progress or {})}))


def store_calibration(path: Path, calibration: dict) -> None:
    """Add calibrated thresholds to a checkpoint of this project, in place and atomically (all else kept)."""
    state = read(path)
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: calibrated thresholds are stored in this project's .pt, .onnx and .xml "
                              f"files, not in official or anomalib checkpoints; export it (export_draem.py) and "
                              f"calibrate the export")
    if not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK):
        raise CheckpointError(f"{path} cannot be written: the calibrated thresholds were not stored")
    write_atomically(path, partial(torch.save, state | {"calibration": calibration}))


# ---- reading ------------------------------------------------------------------------------------------

def read(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"checkpoint {path} was refused: it is not a plain tensor checkpoint "
                              f"({first_line(exc, 'unsafe or corrupt pickle')})")
    except Exception as exc:  # torch.load raises many kinds on damaged files (EOFError, KeyError, RuntimeError ...)
        raise CheckpointError(f"checkpoint {path} is truncated or not a checkpoint ({type(exc).__name__})")
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} is not a checkpoint (holds a {type(obj).__name__})")
    return obj


def run_settings_of(path: Path) -> dict | None:
    """The settings a checkpoint of this project records; None for any other file. Only they are read (mmap: the
    weights stay on disk), so that a folder of checkpoints is searched in moments."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a damaged or foreign file: no settings of ours
        return None
    return UNRECORDED | state["config"] if isinstance(state, dict) and state.get("format") == FORMAT else None


def infer_widths(reconstructive: dict, discriminative: dict) -> dict:
    try:
        return {"base_width": reconstructive["encoder.block1.0.weight"].shape[0],
                "seg_base_width": discriminative["encoder_segment.block1.0.weight"].shape[0],
                "sspcab": "encoder.block5.masked_conv1.weight" in reconstructive}
    except KeyError as exc:
        raise CheckpointError(f"not a DRAEM state_dict: key {exc} is missing")


def official_pair(path: Path) -> tuple[Path, Path]:
    """The two files of an official checkpoint, from either of them: X_<cat>_.pckl and X_<cat>__seg.pckl."""
    stem = path.name[: -len(".pckl")]
    base = stem[: -len("_seg")] if stem.endswith("_seg") else stem
    return path.with_name(base + ".pckl"), path.with_name(base + "_seg.pckl")


def category_from_name(stem: str) -> str | None:
    for category in sorted(CATEGORIES, key=len, reverse=True):
        if stem.endswith(f"_{category}_") or stem.endswith(f"_{category}"):
            return category
    match = re.search(r"_bs\d+_(.+?)_?$", stem)
    return match.group(1) if match else None


def load_checkpoint(path: Path) -> tuple[dict, ModelInfo]:
    """Any supported checkpoint: this project's .pt, an official .pckl pair (either file), or anomalib's. Returns
    its state, the two networks' weights ("reconstructive", "discriminative") and, for this project's, the
    optimiser's and scaler's ("optimizer", "scaler"; None in other files), and what is known about the model."""
    path = Path(path)
    if path.suffix == ".pckl":
        rec_path, seg_path = official_pair(path)
        for p in (rec_path, seg_path):
            if not p.is_file():
                raise CheckpointError(f"official checkpoint {path}: its twin {p} is missing")
        rec, seg = read(rec_path), read(seg_path)
        info = ModelInfo(infer_widths(rec, seg), category_from_name(rec_path.stem), rec_path.stem, "official")
        return {"reconstructive": rec, "discriminative": seg, "optimizer": None, "scaler": None}, info
    state = read(path)
    if state.get("format") == FORMAT:
        info = ModelInfo(state["config"], state.get("category"), path.stem, "draem", state.get("metrics") or {},
                         state.get("step", 0), state.get("calibration") or {}, state.get("trained_defects") or [])
        return {name: state.get(name) for name in ("reconstructive", "discriminative", "optimizer", "scaler")}, info
    weights = state.get("state_dict", state)
    rec_prefix = ANOMALIB_PREFIX + "reconstructive_subnetwork."
    seg_prefix = ANOMALIB_PREFIX + "discriminative_subnetwork."
    if any(k.startswith(rec_prefix) for k in weights):
        rec = {k[len(rec_prefix):]: v for k, v in weights.items() if k.startswith(rec_prefix)}
        seg = {k[len(seg_prefix):]: v for k, v in weights.items() if k.startswith(seg_prefix)}
        # anomalib reads RGB (torchvision); the networks were trained on what it read.
        config = infer_widths(rec, seg) | {"channel_order": "RGB"}
        info = ModelInfo(config, category_from_name(path.stem), path.stem, "anomalib")
        return {"reconstructive": rec, "discriminative": seg, "optimizer": None, "scaler": None}, info
    raise CheckpointError(f"{path} is not a DRAEM checkpoint (no '{FORMAT}' format tag, no official or anomalib keys)")


def model_from_checkpoint(path: Path) -> tuple[DraemModel, ModelInfo]:
    """The model in eval mode on the CPU, and what is known about it (config, category, metrics ...)."""
    state, info = load_checkpoint(path)
    model = DraemModel(info.config["base_width"], info.config["seg_base_width"], info.config["sspcab"])
    load_weights(model, state, path)
    return model.eval(), info
