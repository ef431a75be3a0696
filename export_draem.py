"""Export a DRAEM checkpoint to one ONNX file with the whole scoring inside; run such files.

    python export_draem.py --checkpoint checkpoints/DRAEM_bottle_....pt --out bottle.onnx
    python export_draem.py --checkpoint DRAEM_seg_large_ae_large_0.0001_800_bs8_bottle_.pckl --out bottle.onnx
    python test_draem.py --checkpoint bottle.onnx --images photos/ --out heatmaps/     # check it before shipping

The graph takes a batch of BGR images `images` (N, 3, H, W), float32 in [0, 1], N free, and returns
`anomaly_map` (N, H, W) and `image_score` (N) by the official protocol (softmax channel 1 of the
discriminator; the max of its 21x21 mean filter, zero padding counted), and `reconstruction`
(N, 3, H, W, BGR) for pictures. The file's metadata holds the category, image size, channel order,
recipe, widths and, when the checkpoint has them, the operating thresholds. Exporting and running need
the packages in requirements-export.txt; training and scoring PyTorch checkpoints do not.
"""
import argparse
import importlib
import json
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from checkpoint import CheckpointError, model_from_checkpoint
from cli import one_line_errors
from data_loader import DataError, height_width, parse_size
from metrics import image_scores
from model_unet import DraemModel

FORMAT = "draem-onnx-v1"
OUTPUTS = ["anomaly_map", "image_score", "reconstruction"]


def require(module: str):
    """Import an optional package, or say in one line which requirements file brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"the Python package {module} is not installed: pip install -r requirements-export.txt")


class ScoringGraph(nn.Module):
    """What the ONNX file computes: BGR images in, anomaly map, image score and reconstruction out."""

    def __init__(self, model: DraemModel, rgb_model: bool):
        super().__init__()
        self.model, self.rgb_model = model, rgb_model  # anomalib's networks were trained on RGB

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.model(images.flip(1) if self.rgb_model else images)
        reconstruction = out.reconstruction.flip(1) if self.rgb_model else out.reconstruction
        return out.anomaly_map, image_scores(out.anomaly_map), reconstruction


def metadata(state: dict, size: tuple[int, int], source: Path) -> dict[str, str]:
    config = state["config"]
    points = state.get("metrics", {}).get("operating_points", {})
    return {"format": FORMAT, "category": state.get("category") or "", "image_size": f"{size[0]}x{size[1]}",
            "channel_order": "BGR", "trained_channel_order": config["channel_order"],
            "recipe": str(config.get("recipe", "official")), "base_width": str(config["base_width"]),
            "seg_base_width": str(config["seg_base_width"]), "sspcab": str(bool(config.get("sspcab"))),
            "source_checkpoint": source.name, "operating_points": json.dumps(points),
            **{f"{kind}_threshold": str(points[kind]["threshold"]) for kind in ("image", "pixel") if kind in points}}


def export(checkpoint: Path, out: Path, image_size: tuple[int, int] | None = None) -> dict[str, str]:
    """Write the ONNX file (checked by onnx.checker); return its metadata."""
    onnx = require("onnx")
    require("onnxscript")  # torch.onnx's exporter builds the graph with it
    model, state = model_from_checkpoint(checkpoint)
    size = image_size or height_width(state["config"]["image_size"])
    graph = ScoringGraph(model.eval(), state["config"]["channel_order"] == "RGB").eval()
    example = torch.rand(2, 3, *size)
    tmp = out.with_name(f".{out.name}.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(graph, (example,), tmp, input_names=["images"], output_names=OUTPUTS, dynamo=True,
                          dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=4096)}},
                          external_data=False, verbose=False)
    proto = onnx.load(tmp)
    props = metadata(state, size, checkpoint)
    onnx.helper.set_model_props(proto, props)
    onnx.checker.check_model(proto)
    onnx.save(proto, out)
    tmp.unlink()
    return props


class ExportedOutput(NamedTuple):
    anomaly_map: Tensor
    reconstruction: Tensor


class OnnxDraem:
    """An exported graph in ONNX Runtime, called as test_draem.predict calls a DraemModel."""

    def __init__(self, session, size: tuple[int, int]):
        self.session, self.size = session, size

    def eval(self) -> "OnnxDraem":
        return self

    def to(self, device: torch.device) -> "OnnxDraem":
        return self

    def __call__(self, images: Tensor) -> ExportedOutput:
        anomaly_map, _, reconstruction = self.session.run(OUTPUTS, {"images": images.float().cpu().contiguous().numpy()})
        return ExportedOutput(torch.from_numpy(anomaly_map).to(images.device),
                              torch.from_numpy(reconstruction).to(images.device))


def load_onnx(path: Path, device: torch.device = torch.device("cpu")) -> tuple[OnnxDraem, dict]:
    """An exported file as (runnable model, checkpoint-like state); CUDA where ONNX Runtime has it."""
    ort = require("onnxruntime")
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = ort.InferenceSession(str(path), providers=providers)
    except Exception as exc:  # ONNX Runtime raises its own kinds for damaged or foreign files
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable ONNX file ({first})")
    meta = session.get_modelmeta().custom_metadata_map
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an export of this project (no '{FORMAT}' metadata): "
                              f"make one with export_draem.py")
    size = parse_size(meta["image_size"])
    state = {"config": {"image_size": list(size), "channel_order": "BGR", "recipe": meta["recipe"],
                        "base_width": int(meta["base_width"]), "seg_base_width": int(meta["seg_base_width"])},
             "category": meta["category"] or None, "run": path.stem, "source": "onnx",
             "metrics": {"operating_points": json.loads(meta["operating_points"])}}
    return OnnxDraem(session, size), state


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="this project's .pt, an official .pckl (either of the pair) or an anomalib checkpoint")
    p.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    p.add_argument("--image_size", type=parse_size,
                   help="N or HxW the graph takes, sides multiples of 32 (default: the checkpoint's; 256 for "
                        "official and anomalib checkpoints)")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    args = p.parse_args(argv)
    with one_line_errors(args.debug):
        props = export(args.checkpoint, args.out, args.image_size)
        size_mib = args.out.stat().st_size / 2 ** 20
        print(f"wrote {args.out} ({size_mib:.1f} MiB): images (N, 3, {props['image_size'].replace('x', ', ')}) BGR "
              f"in [0, 1] -> {', '.join(OUTPUTS)}; category {props['category'] or '-'}; thresholds: "
              f"image {props.get('image_threshold', 'none')}, pixel {props.get('pixel_threshold', 'none')}")


if __name__ == "__main__":
    main()
