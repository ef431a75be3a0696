"""Which file holds which kind of model: PyTorch checkpoints (training/checkpoint.py), ONNX exports (onnx_graph.py) or
OpenVINO IR (openvino_model.py)."""
import shutil
from pathlib import Path

import torch

from model_unet import DraemModel
from training.checkpoint import CheckpointError, ModelInfo, model_from_checkpoint

SUFFIXES = (".pt", ".pth", ".ckpt", ".pckl", ".onnx", ".xml")


def load_model(path: Path, device: torch.device, image_size: tuple[int, int] | None = None
               ) -> tuple[DraemModel, ModelInfo]:
    """A PyTorch checkpoint of any supported kind, or a file from export_draem.py: .onnx (run by ONNX Runtime)
    or .xml (OpenVINO IR)."""
    if path.suffix not in (".onnx", ".xml"):
        model, info = model_from_checkpoint(path)
        return model.to(device), info
    if path.suffix == ".onnx":
        from deploy.onnx_graph import load_onnx  # ONNX Runtime only when an .onnx file is asked for
        model, info = load_onnx(path, device)
    else:
        from deploy.openvino_model import load_openvino
        model, info = load_openvino(path, device)
    if image_size and tuple(image_size) != model.size:
        raise CheckpointError(f"--image_size {image_size[0]}x{image_size[1]}: {path} was exported for "
                              f"{model.size[0]}x{model.size[1]} images; export again with that --image_size")
    return model, info


def checkpoint_files(paths: list[Path]) -> list[Path]:
    """Expand folders; one entry per official .pckl pair."""
    files = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES)
            files += [p for p in found if not p.name.endswith("_seg.pckl")]
            if not found:
                raise CheckpointError(f"--checkpoint {path}: no {', '.join(SUFFIXES)} files in this folder")
        else:
            files.append(path)
    return files


def move_model_file(source: Path, out: Path) -> None:
    """Move a model file to out, an IR's .bin first: an .xml at out means a complete pair."""
    for suffix in (".bin", out.suffix):
        if source.with_suffix(suffix).is_file():
            shutil.move(source.with_suffix(suffix), out.with_suffix(suffix))
