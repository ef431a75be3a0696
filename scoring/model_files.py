"""The model files scoring reads: PyTorch checkpoints (training/checkpoint.py) and this project's exports, ONNX
(`.onnx`, run by ONNX Runtime) and OpenVINO IR (`.xml` + `.bin`). This module owns the exports' format: the
metadata they carry, how it is read and rewritten (calibrated thresholds), and how the files run. Writing the
graphs themselves (and int8) is deploy/'s.

An exported graph takes a batch of BGR images `images` (N, 3, H, W), float32 in [0, 1], N free, and returns
`anomaly_map` (N, H, W) and `image_score` (N) by the official protocol (softmax channel 1 of the discriminator;
the max of its 21x21 mean filter, zero padding counted), and `reconstruction` (N, 3, H, W, BGR) for pictures.
Its metadata holds the category, image size, channel order, bit depth, the training configuration and, when the
checkpoint has them, the operating thresholds (of the labelled test set, and calibrated on good images);
image_threshold and pixel_threshold are the deployed ones (ModelInfo.threshold: calibrated first). An IR carries
the same metadata, plus its precision, as one JSON string in its runtime info (`draem_metadata`); bf16 is a
property of the compiled model (OpenVINO's inference precision hint), int8 is in the file. ONNX files need the
packages in requirements-export.txt, IR files those in requirements-deploy.txt; checkpoints need neither.
"""
import importlib
import json
import shutil
from pathlib import Path

import torch

from data_loader import DataError, parse_size
from model_unet import DraemModel
from scoring.evaluate import MapOutput
from training.checkpoint import CheckpointError, ModelInfo, model_from_checkpoint
from training.files import first_line, write_atomically

SUFFIXES = (".pt", ".pth", ".ckpt", ".pckl", ".onnx", ".xml")
ONNX_FORMAT = "draem-onnx-v1"
OPENVINO_FORMAT = "draem-openvino-v1"
OUTPUTS = ["anomaly_map", "image_score", "reconstruction"]
IR_METADATA_KEY = "draem_metadata"
DEPLOY_REQUIREMENTS = "requirements-deploy.txt"
COMPILE_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8 layers run int8; the rest in fp32


def require(module: str, requirements: str = "requirements-export.txt"):
    """Import an optional package, or say in one line which requirements file brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"the Python package {module} is not installed: pip install -r {requirements}")


def load_model(path: Path, device: torch.device, image_size: tuple[int, int] | None = None
               ) -> tuple[DraemModel, ModelInfo]:
    """A PyTorch checkpoint of any supported kind, or a file from export_draem.py: .onnx (run by ONNX Runtime)
    or .xml (OpenVINO IR)."""
    if path.suffix not in (".onnx", ".xml"):
        model, info = model_from_checkpoint(path)
        return model.to(device), info
    model, info = load_onnx(path, device) if path.suffix == ".onnx" else load_openvino(path)
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


def metadata(info: ModelInfo, size: tuple[int, int], source: Path) -> dict[str, str]:
    """What an export of this model at this size records (an ONNX file; an IR adds its own format and precision)."""
    config, points = info.config, info.operating_points
    return {"format": ONNX_FORMAT, "category": info.category or "", "image_size": f"{size[0]}x{size[1]}",
            "channel_order": "BGR", "trained_channel_order": info.channel_order,
            "recipe": str(config["recipe"]), "base_width": str(config["base_width"]),
            "seg_base_width": str(config["seg_base_width"]), "sspcab": str(bool(config["sspcab"])),
            "source_checkpoint": source.name, "source": info.source, "config": json.dumps(config),
            "bit_depth": str(info.bit_depth), "precision": "fp32", "operating_points": json.dumps(points),
            "calibration": json.dumps(info.calibration), "trained_defects": json.dumps(info.trained_defects),
            **threshold_metadata(info)}


def threshold_metadata(info: ModelInfo) -> dict[str, str]:
    """The deployed thresholds (ModelInfo.threshold) as the plain keys readers of the file see first."""
    return {f"{kind}_threshold": str(info.threshold(kind)) for kind in ("image", "pixel")
            if info.threshold(kind) is not None}


def info_from_metadata(meta: dict[str, str], path: Path, source: str) -> ModelInfo:
    """What an exported file's metadata says about its model."""
    size = parse_size(meta["image_size"])
    config = json.loads(meta["config"]) if "config" in meta else {
        "recipe": meta["recipe"], "base_width": int(meta["base_width"]), "seg_base_width": int(meta["seg_base_width"])}
    # The graph takes BGR at its own size, whatever the checkpoint was trained on.
    config |= {"image_size": list(size), "channel_order": "BGR", "bit_depth": int(meta.get("bit_depth", 16))}
    config |= {"precision": meta.get("precision", "fp32")}
    return ModelInfo(config, meta["category"] or None, path.stem, source,
                     {"operating_points": json.loads(meta["operating_points"])},
                     calibration=json.loads(meta.get("calibration", "{}")),
                     trained_defects=json.loads(meta.get("trained_defects", "[]")))


def with_calibration(props: dict[str, str], calibration: dict) -> dict[str, str]:
    """An exported file's metadata with calibrated thresholds added, and its plain thresholds the deployed ones."""
    props = props | {"calibration": json.dumps(calibration)}
    return props | threshold_metadata(info_from_metadata(props, Path(), "onnx"))


def store_calibration(path: Path, calibration: dict) -> None:
    """Add calibrated thresholds to an exported file's metadata (.onnx, or .xml and its .bin), atomically."""
    if path.suffix == ".xml":
        model, props = read_ir(path)
        save_ir(model, path, with_calibration(props, calibration))
    else:
        proto = require("onnx").load(path)
        save_with_metadata(proto, with_calibration(read_metadata(proto), calibration), path)


# ONNX

def save_with_metadata(proto, props: dict[str, str], out: Path) -> None:
    """Write an ONNX model with this metadata, via a temporary file beside out."""
    onnx = require("onnx")
    onnx.helper.set_model_props(proto, props)
    onnx.checker.check_model(proto)
    try:
        write_atomically(out, lambda tmp: onnx.save(proto, tmp))
    except OSError as exc:
        raise CheckpointError(f"{out} cannot be written ({exc.strerror or exc})")


def read_metadata(proto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


class OnnxDraem:
    """An exported graph in ONNX Runtime, called as evaluate.predict calls a DraemModel."""

    def __init__(self, session, size: tuple[int, int]):
        self.session, self.size = session, size

    def __call__(self, images: torch.Tensor) -> MapOutput:
        anomaly_map, _, reconstruction = self.session.run(OUTPUTS, {"images": images.float().cpu().contiguous().numpy()})
        return MapOutput(torch.from_numpy(anomaly_map).to(images.device),
                         torch.from_numpy(reconstruction).to(images.device))


def load_onnx(path: Path, device: torch.device = torch.device("cpu")) -> tuple[OnnxDraem, ModelInfo]:
    """An exported file as (runnable model, what its metadata says); CUDA where ONNX Runtime has it."""
    ort = require("onnxruntime")
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = ort.InferenceSession(str(path), providers=providers)
    except Exception as exc:  # ONNX Runtime raises its own kinds for damaged or foreign files
        raise CheckpointError(f"{path} is not a readable ONNX file ({first_line(exc)})")
    meta = session.get_modelmeta().custom_metadata_map
    if meta.get("format") != ONNX_FORMAT:
        raise CheckpointError(f"{path} is not an export of this project (no '{ONNX_FORMAT}' metadata): "
                              f"make one with export_draem.py")
    info = info_from_metadata(meta, path, "onnx")
    return OnnxDraem(session, info.image_size), info


# OpenVINO IR

def save_ir(model, out: Path, props: dict) -> None:
    """Write out (.xml) and its .bin beside it, each via a temporary name, with the metadata inside."""
    ov = require("openvino", DEPLOY_REQUIREMENTS)
    model.set_rt_info(json.dumps(props), [IR_METADATA_KEY])
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
    if not model.has_rt_info([IR_METADATA_KEY]):
        raise CheckpointError(f"{path} is not an export of this project (no {IR_METADATA_KEY}): make one with "
                              f"export_draem.py --format openvino")
    props = json.loads(model.get_rt_info([IR_METADATA_KEY]).astype(str))
    if props.get("format") != OPENVINO_FORMAT:
        raise CheckpointError(f"{path} is not an export of this project (format {props.get('format')!r})")
    return model, props


class OpenVinoDraem:
    """A compiled IR, called as evaluate.predict calls a DraemModel."""

    def __init__(self, compiled, size: tuple[int, int]):
        self.compiled, self.size = compiled, size
        self.outputs = {name: compiled.output(name) for name in ("anomaly_map", "reconstruction")}

    def __call__(self, images: torch.Tensor) -> MapOutput:
        result = self.compiled(images.float().cpu().contiguous().numpy())
        return MapOutput(*(torch.from_numpy(result[self.outputs[name]].copy()).to(images.device)
                           for name in ("anomaly_map", "reconstruction")))


def load_openvino(path: Path) -> tuple[OpenVinoDraem, ModelInfo]:
    """An IR file as (runnable model on the CPU, what its metadata says), compiled at its precision."""
    ov = require("openvino", DEPLOY_REQUIREMENTS)
    model, props = read_ir(path)
    precision = props.get("precision", "fp32")
    core = ov.Core()
    if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        raise CheckpointError(f"{path} is a bf16 model and this CPU has no bf16 instructions: export fp32 or int8")
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": COMPILE_PRECISION[precision]})
    info = info_from_metadata(props, path, "openvino")
    return OpenVinoDraem(compiled, info.image_size), info
