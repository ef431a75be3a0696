"""Checkpoints: one dict per category and run, written atomically; also reads the official two-file
``.pckl`` state_dicts and anomalib checkpoints. Everything loads with ``torch.load(weights_only=True)``:
a checkpoint is a pickle, and an untrusted one must not be able to run code.
"""
import os
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from data_loader import CATEGORIES, CHANNEL_ORDER
from model_unet import DraemModel

FORMAT = "draem-checkpoint-v1"
ANOMALIB_PREFIX = "model."


class CheckpointError(ValueError):
    """A checkpoint problem the scripts report as one line (no traceback)."""


def save_checkpoint(state: dict, path: Path) -> None:
    """Write to a temporary file beside path, fsync, then rename: a crash never leaves a half-written path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe or corrupt pickle"
        raise CheckpointError(f"checkpoint {path} was refused: it is not a plain tensor checkpoint ({first[:200]})")
    except Exception as exc:  # torch.load raises many kinds on damaged files (EOFError, KeyError, RuntimeError ...)
        raise CheckpointError(f"checkpoint {path} is truncated or not a checkpoint ({type(exc).__name__})")
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} is not a checkpoint (holds a {type(obj).__name__})")
    return obj


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


def load_state(path: Path) -> dict:
    """Any supported checkpoint as {reconstructive, discriminative, config, category, ...}."""
    path = Path(path)
    if path.suffix == ".pckl":
        rec_path, seg_path = official_pair(path)
        for p in (rec_path, seg_path):
            if not p.is_file():
                raise CheckpointError(f"official checkpoint {path}: its twin {p} is missing")
        rec, seg = read(rec_path), read(seg_path)
        category = category_from_name(rec_path.stem)
        return {"reconstructive": rec, "discriminative": seg, "category": category, "source": "official",
                "run": rec_path.stem,
                "config": {**infer_widths(rec, seg), "channel_order": "BGR", "image_size": 256}}
    state = read(path)
    if state.get("format") == FORMAT:
        return state
    weights = state.get("state_dict", state)
    rec_prefix = ANOMALIB_PREFIX + "reconstructive_subnetwork."
    seg_prefix = ANOMALIB_PREFIX + "discriminative_subnetwork."
    if any(k.startswith(rec_prefix) for k in weights):
        rec = {k[len(rec_prefix):]: v for k, v in weights.items() if k.startswith(rec_prefix)}
        seg = {k[len(seg_prefix):]: v for k, v in weights.items() if k.startswith(seg_prefix)}
        # anomalib reads RGB (torchvision); the networks were trained on what it read.
        return {"reconstructive": rec, "discriminative": seg, "category": category_from_name(path.stem),
                "source": "anomalib", "config": {**infer_widths(rec, seg), "channel_order": "RGB", "image_size": 256}}
    raise CheckpointError(f"{path} is not a DRAEM checkpoint (no '{FORMAT}' format tag, no official or anomalib keys)")


def load_weights(model: nn.Module, reconstructive: dict, discriminative: dict, path: Path) -> None:
    for net, weights, name in ((model.reconstructive_subnetwork, reconstructive, "reconstructive"),
                               (model.discriminative_subnetwork, discriminative, "discriminative")):
        try:
            net.load_state_dict(weights)
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())[:300]
            raise CheckpointError(f"checkpoint {path}: {name} weights are of another architecture or width ({detail})")


def model_from_checkpoint(path: Path) -> tuple[DraemModel, dict]:
    """The model in eval mode on the CPU, and the checkpoint's state (config, category, metrics ...)."""
    state = load_state(path)
    config = state["config"]
    model = DraemModel(config["base_width"], config["seg_base_width"], config.get("sspcab", False))
    load_weights(model, state["reconstructive"], state["discriminative"], path)
    config.setdefault("channel_order", CHANNEL_ORDER)
    return model.eval(), state
