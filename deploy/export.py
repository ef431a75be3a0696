"""Exporting for inspection PCs: ONNX (fp32, int8) and OpenVINO IR (fp32, bf16, int8), from one checkpoint.

Every format starts from the fp32 ONNX graph (ScoringGraph: the whole scoring inside; the files' format and
metadata are scoring/model_files.py's). int8 is post-training static quantization
(deploy/int8.py: calibrated on good images plus simulated anomalies, the convolutions it hurts most kept in
float): ONNX Runtime's QDQ quantization, or NNCF's for OpenVINO. bf16 is OpenVINO's inference precision on
CPUs with bf16 instructions; the file holds fp32 weights.
"""
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from data_loader import DataError, category_layout, list_images, load_images
from deploy import int8, qat
from model_unet import DraemModel, image_scores
from scoring.model_files import (DEPLOY_REQUIREMENTS, OPENVINO_FORMAT, OUTPUTS, metadata, read_metadata, require,
                                 save_ir, save_with_metadata)
from training.checkpoint import load_checkpoint, model_from_checkpoint

PRECISIONS = {"onnx": ("fp32", "int8"), "openvino": ("fp32", "bf16", "int8")}
SUFFIX = {"onnx": ".onnx", "openvino": ".xml"}
MAX_CALIBRATION_IMAGES = 300
FINETUNE_BUDGET = 10.0  # minutes --precision auto may spend fine-tuning int8 (--finetune_budget)


@dataclass
class Int8Options:
    calibration: Path | None = None  # good images; default the checkpoint's train/good
    count: int = MAX_CALIBRATION_IMAGES  # calibration images in all, good and simulated
    anomaly_share: float = int8.ANOMALY_SHARE
    anomaly_sources: Path | None = None  # default the checkpoint's recorded sources, else Perlin noise
    float_layers: list[str] | None = None  # None: measured (deploy/int8.py) under float_budget
    float_budget: float = int8.FLOAT_BUDGET
    quantizer: dict = field(default_factory=dict)  # passed to quantize_static or nncf.quantize (benchmarks)
    finetune: int | None = None  # None: the runtime's post-training quantizer; N: this project's QDQ graph after
    # N steps of quantization-aware fine-tuning (deploy/qat.py; 0: that graph as calibrated)
    finetune_budget: float = FINETUNE_BUDGET  # --precision auto fine-tunes only when it takes at most this (minutes)
    float_layers_by: str = "as asked"  # who chose float_layers when they are given, for the console and metadata


class ScoringGraph(nn.Module):
    """What an exported file computes: BGR images in, anomaly map, image score and reconstruction out."""

    def __init__(self, model: DraemModel, rgb_model: bool):
        super().__init__()
        self.model, self.rgb_model = model, rgb_model  # anomalib's networks were trained on RGB

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.model(images.flip(1) if self.rgb_model else images)
        reconstruction = out.reconstruction.flip(1) if self.rgb_model else out.reconstruction
        return out.anomaly_map, image_scores(out.anomaly_map), reconstruction


def checkpoint_metadata(checkpoint: Path, image_size: tuple[int, int] | None = None) -> dict[str, str]:
    """What an export of this checkpoint at image_size (default its own) records, without exporting."""
    _, info = model_from_checkpoint(checkpoint)
    return metadata(info, image_size or info.image_size, checkpoint)


def export_onnx(checkpoint: Path, out: Path, image_size: tuple[int, int] | None = None) -> dict[str, str]:
    """Write the fp32 ONNX file (checked by onnx.checker); return its metadata."""
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


def checkpoint_config(checkpoint: Path) -> dict:
    return load_checkpoint(checkpoint)[1].config if checkpoint.suffix != ".pckl" else {}


def calibration_folder(config: dict, given: Path | None) -> Path:
    """--calibration_images, else the checkpoint's own train/good when it is reachable from here."""
    if given is not None:
        return given
    if config.get("data_path") and config.get("category"):
        try:
            folder = category_layout(config["data_path"], config["category"]).train
        except DataError:  # the data set is not here
            folder = None
        if folder is not None and folder.is_dir():
            return folder
    raise DataError("int8 needs good images to calibrate on: give --calibration_images DIR (the checkpoint's "
                    "train/good is not reachable from here)")


def anomaly_sources(config: dict, given: Path | None) -> Path | None:
    """--anomaly_source_path, else the checkpoint's recorded one when it is reachable, else None (Perlin noise)."""
    if given is not None:
        if not given.is_dir():
            raise DataError(f"--anomaly_source_path {given} is not a folder")
        return given
    recorded = config.get("anomaly_source_path")
    return Path(recorded) if recorded and Path(recorded).is_dir() else None


def int8_calibration(checkpoint: Path, size: tuple[int, int], bit_depth: int, recipe: str, options: Int8Options
                     ) -> tuple[np.ndarray, dict[str, str]]:
    """int8.calibration_set for this checkpoint, from the options or what it records."""
    config = checkpoint_config(checkpoint)
    sources = anomaly_sources(config, options.anomaly_sources)
    images, recorded = int8.calibration_set(calibration_folder(config, options.calibration), size, bit_depth,
                                            options.count, options.anomaly_share, recipe, sources)
    print(f"int8 calibration: {recorded['calibration_good']} good images and {recorded['calibration_simulated']} "
          f"simulated anomalies ({recorded['calibration_sources']})")
    return images, recorded


def scoring_graph(checkpoint: Path) -> ScoringGraph:
    """The checkpoint's fp32 networks as the exported graph computes them (BGR in)."""
    model, info = model_from_checkpoint(checkpoint)
    return ScoringGraph(model.eval(), info.channel_order == "RGB").eval()


def float_share(macs: dict[str, int], layers: list[str]) -> float:
    """Percent of the multiply-adds in these convolutions."""
    return 100 * sum(macs[name] for name in layers) / sum(macs.values())


def prepare_int8(checkpoint: Path, props: dict[str, str], options: Int8Options
                 ) -> tuple[np.ndarray, list[str], dict[str, str]]:
    """The calibration images, the layers kept in float and the metadata that records both."""
    size = tuple(int(s) for s in props["image_size"].split("x"))
    calibration, recorded = int8_calibration(checkpoint, size, int(props["bit_depth"]), props["recipe"], options)
    graph = scoring_graph(checkpoint)
    macs = int8.multiply_adds(graph, calibration[0])
    if options.float_layers is None:
        sensitivity, _ = int8.measure_layers(graph, calibration, int(recorded["calibration_good"]))
        kept = int8.choose_float_layers(sensitivity, macs, options.float_budget)
        how = f"the most sensitive of {len(macs)} convolutions, budget {100 * options.float_budget:g} %"
    else:
        unknown = [name for name in options.float_layers if name not in macs]
        if unknown:
            raise DataError(f"--float_layers: no convolution named {unknown[0]} (names as an int8 file's metadata "
                            f"lists them, e.g. {next(iter(macs))})")
        kept, how = options.float_layers, options.float_layers_by
    share = float_share(macs, kept)
    print(f"kept in float ({how}): {', '.join(kept) or 'none'}; {share:.2f} % of the multiply-adds")
    return calibration, kept, recorded | {
        "precision": "int8", "float_layers": ",".join(kept), "float_share_percent": f"{share:.2f}",
        "float_layers_by": how}


def device_for_finetuning() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def finetuned_int8(checkpoint: Path, props: dict[str, str], calibration: np.ndarray, float_layers: list[str],
                   options: Int8Options, out: Path) -> dict[str, str]:
    """This project's QDQ int8 graph (deploy/qat.py) at the calibration's ranges, fine-tuned options.finetune
    steps against the fp32 model on the checkpoint's good images with fresh simulated anomalies, written to out
    (ONNX); returns what the metadata records of it."""
    config = checkpoint_config(checkpoint)
    size = tuple(int(s) for s in props["image_size"].split("x"))
    teacher = scoring_graph(checkpoint)
    ranges, _ = int8.input_ranges(teacher, torch.from_numpy(calibration))
    student = qat.int8_graph(teacher, ranges, float_layers)
    good = load_images(list_images(calibration_folder(config, options.calibration), recursive=True), size,
                       bit_depth=int(props["bit_depth"]))
    sources = anomaly_sources(config, options.anomaly_sources)
    # at most FINETUNE_TEXTURES of them, evenly spaced: all of DTD at 256 px would hold a gigabyte
    textures = load_images(int8.evenly_spaced(list_images(sources, recursive=True), qat.FINETUNE_TEXTURES), size) \
        if sources is not None else None
    record = qat.finetune(student, teacher, good, textures, props["recipe"], options.finetune, device_for_finetuning())
    qat.export_onnx(student, size, out)
    return record | {"quantizer": "draem-qdq", "finetune_teacher": checkpoint.name,
                     "finetune_images": f"{len(good)} good, sources: {sources or 'Perlin noise'}"}


def export_model(checkpoint: Path, out: Path, format: str = "onnx", precision: str = "fp32",
                 image_size: tuple[int, int] | None = None, options: Int8Options | None = None,
                 fp32: Path | None = None) -> dict[str, str]:
    """Write out in the format and precision asked for; return its metadata. fp32: this checkpoint's fp32 ONNX
    export at this size, when there is one already (exporting takes seconds; --precision auto exports once)."""
    if precision not in PRECISIONS[format]:
        raise DataError(f"--precision {precision}: {format} supports {', '.join(PRECISIONS[format])}")
    if out.suffix != SUFFIX[format]:
        raise DataError(f"--out {out}: a {format} file ends in {SUFFIX[format]}")
    if format == "onnx" and precision == "fp32":
        if fp32 is None:
            return export_onnx(checkpoint, out, image_size)
        shutil.copyfile(fp32, out)
        return read_metadata(require("onnx").load(out))
    ov = require("openvino", DEPLOY_REQUIREMENTS) if format == "openvino" else None
    options = options or Int8Options()
    with tempfile.TemporaryDirectory() as tmp:
        if precision == "int8" and options.finetune is not None:  # this project's own graph: no fp32 file needed
            props = checkpoint_metadata(checkpoint, image_size)
            calibration, float_layers, recorded = prepare_int8(checkpoint, props, options)
            qdq = Path(tmp) / "int8.onnx"
            recorded |= finetuned_int8(checkpoint, props, calibration, float_layers, options, qdq)
            if format == "onnx":
                save_with_metadata(require("onnx").load(qdq), props | recorded, out)
                return props | recorded
            props |= {"format": OPENVINO_FORMAT} | recorded
            save_ir(ov.convert_model(str(qdq)), out, props)
            return props
        if fp32 is None:
            fp32 = Path(tmp) / "fp32.onnx"
            props = export_onnx(checkpoint, fp32, image_size)
        else:
            props = read_metadata(require("onnx").load(fp32))
        if precision == "int8":
            calibration, float_layers, recorded = prepare_int8(checkpoint, props, options)
        if format == "onnx":
            int8.quantize_onnx(fp32, out, calibration, float_layers, recorded, **options.quantizer)
            return read_metadata(require("onnx").load(out))
        model = ov.convert_model(str(fp32))
        if precision == "int8":
            model = int8.quantize_openvino(model, fp32, calibration, float_layers, **options.quantizer)
            props |= recorded
        props |= {"format": OPENVINO_FORMAT, "precision": precision}
        save_ir(model, out, props)
        return props
