"""OpenVINO IR files of this project: an ONNX export converted to IR (fp32, bf16 or int8), and running them.

The IR computes what the ONNX graph computes (deploy/onnx_graph.py: BGR images in; anomaly map, image score and
reconstruction out) and carries the same metadata, plus its precision, as one JSON string in the model's
runtime info (`draem_metadata`). bf16 is a property of the compiled model (OpenVINO's inference precision
hint) on CPUs that have bf16 instructions; int8 is in the file (NNCF's post-training quantization). Needs
the packages in requirements-deploy.txt.
"""
import json
from pathlib import Path

import torch

from deploy.onnx_graph import ExportedOutput, info_from_metadata, require, with_calibration
from training.checkpoint import CheckpointError, ModelInfo
from training.files import first_line, write_atomically

FORMAT = "draem-openvino-v1"
METADATA_KEY = "draem_metadata"
DEPLOY_REQUIREMENTS = "requirements-deploy.txt"
COMPILE_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8 layers run int8; the rest in fp32


def save_ir(model, out: Path, metadata: dict) -> None:
    """Write out (.xml) and its .bin beside it, each via a temporary name, with the metadata inside."""
    ov = require("openvino", DEPLOY_REQUIREMENTS)
    model.set_rt_info(json.dumps(metadata), [METADATA_KEY])
    write_atomically(out, lambda tmp: ov.save_model(model, tmp, compress_to_fp16=False), companions=(".bin",))


def read_ir(path: Path):
    """The IR model and its metadata; one-line errors for other files."""
    ov = require("openvino", DEPLOY_REQUIREMENTS)
    if not path.is_file() or not path.with_suffix(".bin").is_file():
        raise CheckpointError(f"{path}: an OpenVINO model needs {path.name} and {path.with_suffix('.bin').name} "
                              f"side by side")
    try:
        model = ov.Core().read_model(str(path))
    except Exception as exc:  # OpenVINO raises its own kinds for damaged or foreign files
        raise CheckpointError(f"{path} is not a readable OpenVINO model ({first_line(exc)})")
    if not model.has_rt_info([METADATA_KEY]):
        raise CheckpointError(f"{path} is not an export of this project (no {METADATA_KEY}): make one with "
                              f"export_draem.py --format openvino")
    metadata = json.loads(model.get_rt_info([METADATA_KEY]).astype(str))
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an export of this project (format {metadata.get('format')!r})")
    return model, metadata


class OpenVinoDraem:
    """A compiled IR, called as evaluate.predict calls a DraemModel."""

    def __init__(self, compiled, size: tuple[int, int]):
        self.compiled, self.size = compiled, size
        self.outputs = {name: compiled.output(name) for name in ("anomaly_map", "reconstruction")}

    def __call__(self, images: torch.Tensor) -> ExportedOutput:
        result = self.compiled(images.float().cpu().contiguous().numpy())
        return ExportedOutput(*(torch.from_numpy(result[self.outputs[name]].copy()).to(images.device)
                                for name in ("anomaly_map", "reconstruction")))


def load_openvino(path: Path, device: torch.device = torch.device("cpu")) -> tuple[OpenVinoDraem, ModelInfo]:
    """An IR file as (runnable model on the CPU, what its metadata says), compiled at its precision."""
    ov = require("openvino", DEPLOY_REQUIREMENTS)
    model, metadata = read_ir(path)
    precision = metadata.get("precision", "fp32")
    core = ov.Core()
    if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        raise CheckpointError(f"{path} is a bf16 model and this CPU has no bf16 instructions: export fp32 or int8")
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": COMPILE_PRECISION[precision]})
    info = info_from_metadata(metadata, path, "openvino")
    return OpenVinoDraem(compiled, info.image_size), info


def store_calibration(path: Path, calibration: dict) -> None:
    """Add calibrated thresholds to an IR's metadata, rewriting the .xml and .bin atomically."""
    model, metadata = read_ir(path)
    save_ir(model, path, with_calibration(metadata, calibration))
