"""The ONNX file format of this project: exporting a model with the whole scoring inside, and running such files.

The graph takes a batch of BGR images `images` (N, 3, H, W), float32 in [0, 1], N free, and returns
`anomaly_map` (N, H, W) and `image_score` (N) by the official protocol (softmax channel 1 of the
discriminator; the max of its 21x21 mean filter, zero padding counted), and `reconstruction`
(N, 3, H, W, BGR) for pictures. The file's metadata holds the category, image size, channel order,
bit depth, the training configuration and, when the checkpoint has them, the operating thresholds (of the
labelled test set, and calibrated on good images); image_threshold and pixel_threshold are the deployed ones
(ModelInfo.threshold: calibrated first). Larger images are scored in tiles of the exported size
(scoring/tiling.py) around the graph. Exporting and
running need the packages in requirements-export.txt; training and scoring PyTorch checkpoints do not.
"""
import importlib
import json
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from data_loader import DataError, parse_size
from model_unet import DraemModel, image_scores
from training.checkpoint import CheckpointError, ModelInfo, model_from_checkpoint
from training.files import first_line, write_atomically

FORMAT = "draem-onnx-v1"
OUTPUTS = ["anomaly_map", "image_score", "reconstruction"]


def require(module: str, requirements: str = "requirements-export.txt"):
    """Import an optional package, or say in one line which requirements file brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"the Python package {module} is not installed: pip install -r {requirements}")


class ScoringGraph(nn.Module):
    """What the ONNX file computes: BGR images in, anomaly map, image score and reconstruction out."""

    def __init__(self, model: DraemModel, rgb_model: bool):
        super().__init__()
        self.model, self.rgb_model = model, rgb_model  # anomalib's networks were trained on RGB

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.model(images.flip(1) if self.rgb_model else images)
        reconstruction = out.reconstruction.flip(1) if self.rgb_model else out.reconstruction
        return out.anomaly_map, image_scores(out.anomaly_map), reconstruction


def metadata(info: ModelInfo, size: tuple[int, int], source: Path) -> dict[str, str]:
    config, points = info.config, info.operating_points
    return {"format": FORMAT, "category": info.category or "", "image_size": f"{size[0]}x{size[1]}",
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


def checkpoint_metadata(checkpoint: Path, image_size: tuple[int, int] | None = None) -> dict[str, str]:
    """What an export of this checkpoint at image_size (default its own) records, without exporting."""
    _, info = model_from_checkpoint(checkpoint)
    return metadata(info, image_size or info.image_size, checkpoint)


def export(checkpoint: Path, out: Path, image_size: tuple[int, int] | None = None) -> dict[str, str]:
    """Write the ONNX file (checked by onnx.checker); return its metadata."""
    onnx = require("onnx")
    require("onnxscript")  # torch.onnx's exporter builds the graph with it
    model, info = model_from_checkpoint(checkpoint)
    size = image_size or info.image_size
    graph = ScoringGraph(model.eval(), info.channel_order == "RGB").eval()
    example = torch.rand(2, 3, *size)
    tmp = out.with_name(f".{out.name}.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(graph, (example,), tmp, input_names=["images"], output_names=OUTPUTS, dynamo=True,
                          dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=4096)}},
                          external_data=False, verbose=False)
    proto = onnx.load(tmp)
    tmp.unlink()
    props = metadata(info, size, checkpoint)
    save_with_metadata(proto, props, out)
    return props


def with_calibration(props: dict[str, str], calibration: dict) -> dict[str, str]:
    """An exported file's metadata with calibrated thresholds added, and its plain thresholds the deployed ones."""
    props = props | {"calibration": json.dumps(calibration)}
    return props | threshold_metadata(info_from_metadata(props, Path(), "onnx"))


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


def store_calibration(path: Path, calibration: dict) -> None:
    """Add calibrated thresholds to an exported file's metadata, in place and atomically."""
    proto = require("onnx").load(path)
    save_with_metadata(proto, with_calibration(read_metadata(proto), calibration), path)


class ExportedOutput(NamedTuple):
    anomaly_map: Tensor
    reconstruction: Tensor


class OnnxDraem:
    """An exported graph in ONNX Runtime, called as evaluate.predict calls a DraemModel."""

    def __init__(self, session, size: tuple[int, int]):
        self.session, self.size = session, size

    def __call__(self, images: Tensor) -> ExportedOutput:
        anomaly_map, _, reconstruction = self.session.run(OUTPUTS, {"images": images.float().cpu().contiguous().numpy()})
        return ExportedOutput(torch.from_numpy(anomaly_map).to(images.device),
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
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an export of this project (no '{FORMAT}' metadata): "
                              f"make one with export_draem.py")
    info = info_from_metadata(meta, path, "onnx")
    return OnnxDraem(session, info.image_size), info


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
