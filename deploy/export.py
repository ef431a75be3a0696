"""Exporting for inspection PCs: ONNX (fp32, int8) and OpenVINO IR (fp32, bf16, int8), from one checkpoint.

Every format starts from the fp32 ONNX graph (ScoringGraph: the whole scoring inside; the files' format and
metadata are scoring/model_files.py's). int8 is post-training static quantization
(deploy/int8.py: calibrated on good images plus simulated anomalies, the convolutions it hurts most kept in
float): ONNX Runtime's QDQ quantization, or NNCF's for OpenVINO. bf16 is OpenVINO's inference precision on
CPUs with bf16 instructions; the file holds fp32 weights.
"""
import argparse
import hashlib
import shutil
import tempfile
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
# What export_model reads besides the checkpoint, as export_draem.py's flags default (float_layers: None when
# measured, else the names; float_layers_by: who chose them).
EXPORT_DEFAULTS = {"format": "onnx", "image_size": None, "calibration_images": None,
                   "calibration_count": MAX_CALIBRATION_IMAGES, "calibration_anomalies": int8.ANOMALY_SHARE,
                   "anomaly_source_path": None, "float_layers": None, "float_layers_by": "as asked",
                   "float_budget": int8.FLOAT_BUDGET, "finetune": None}


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


def int8_calibration(args: argparse.Namespace, size: tuple[int, int], bit_depth: int, recipe: str
                     ) -> tuple[np.ndarray, dict[str, str]]:
    """int8.calibration_set for args.checkpoint, as the flags ask or from what the checkpoint records."""
    config = checkpoint_config(args.checkpoint)
    sources = anomaly_sources(config, args.anomaly_source_path)
    images, recorded = int8.calibration_set(calibration_folder(config, args.calibration_images), size, bit_depth,
                                            args.calibration_count, args.calibration_anomalies, recipe, sources)
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


MEASURED: dict[tuple, tuple[dict[str, float], dict[str, int]]] = {}  # measured_layers' results in this process


def measured_layers(checkpoint: Path, calibration: np.ndarray, good: int) -> tuple[dict[str, float], dict[str, int]]:
    """int8.measure_layers on the checkpoint's scoring graph, once per checkpoint file and calibration set in a
    process: --precision auto's post-training int8 and its accuracy control start from one measurement (each is
    a pass per convolution over SENSITIVITY_IMAGES)."""
    key = (str(checkpoint.resolve()), checkpoint.stat().st_mtime_ns, good,
           hashlib.sha256(np.ascontiguousarray(calibration).tobytes()).hexdigest())
    if key not in MEASURED:
        MEASURED[key] = int8.measure_layers(scoring_graph(checkpoint), calibration, good)
    return MEASURED[key]


def prepare_int8(args: argparse.Namespace, props: dict[str, str]) -> tuple[np.ndarray, list[str], dict[str, str]]:
    """The calibration images, the layers kept in float and the metadata that records both."""
    size = tuple(int(s) for s in props["image_size"].split("x"))
    calibration, recorded = int8_calibration(args, size, int(props["bit_depth"]), props["recipe"])
    graph = scoring_graph(args.checkpoint)
    macs = int8.multiply_adds(graph, calibration[0])
    if args.float_layers is None:
        sensitivity, _ = measured_layers(args.checkpoint, calibration, int(recorded["calibration_good"]))
        kept = int8.choose_float_layers(sensitivity, macs, args.float_budget)
        how = f"the most sensitive of {len(macs)} convolutions, budget {100 * args.float_budget:g} %"
    else:
        unknown = [name for name in args.float_layers if name not in macs]
        if unknown:
            raise DataError(f"--float_layers: no convolution named {unknown[0]} (names as an int8 file's metadata "
                            f"lists them, e.g. {next(iter(macs))})")
        kept, how = args.float_layers, args.float_layers_by
    share = float_share(macs, kept)
    print(f"kept in float ({how}): {', '.join(kept) or 'none'}; {share:.2f} % of the multiply-adds")
    return calibration, kept, recorded | {
        "precision": "int8", "float_layers": ",".join(kept), "float_share_percent": f"{share:.2f}",
        "float_layers_by": how}


def device_for_finetuning() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def finetuned_int8(args: argparse.Namespace, props: dict[str, str], calibration: np.ndarray, float_layers: list[str],
                   out: Path) -> dict[str, str]:
    """This project's QDQ int8 graph (deploy/qat.py) at the calibration's ranges, fine-tuned args.finetune steps
    against the fp32 model on the checkpoint's good images with fresh simulated anomalies, written to out (ONNX);
    returns what the metadata records of it."""
    checkpoint = args.checkpoint
    size = tuple(int(s) for s in props["image_size"].split("x"))
    teacher = scoring_graph(checkpoint)
    ranges, _ = int8.input_ranges(teacher, torch.from_numpy(calibration))
    student = qat.int8_graph(teacher, ranges, float_layers)
    # with 0 steps (accuracy control's rounds) the graph as calibrated: no training images loaded, no probe run
    record = {"quantizer": "draem-qdq", "finetune_steps": "0"}
    if args.finetune > 0:
        config = checkpoint_config(checkpoint)
        good = load_images(list_images(calibration_folder(config, args.calibration_images), recursive=True), size,
                           bit_depth=int(props["bit_depth"]))
        sources = anomaly_sources(config, args.anomaly_source_path)
        # at most FINETUNE_TEXTURES of them, evenly spaced: all of DTD at 256 px would hold a gigabyte
        textures = load_images(int8.evenly_spaced(list_images(sources, recursive=True), qat.FINETUNE_TEXTURES),
                               size) if sources is not None else None
        record |= qat.finetune(student, teacher, good, textures, props["recipe"], args.finetune,
                               device_for_finetuning())
        record |= {"finetune_teacher": checkpoint.name,
                   "finetune_images": f"{len(good)} good, sources: {sources or 'Perlin noise'}"}
    qat.export_onnx(student, size, out)
    return record


def export_settings(checkpoint: Path, **given: object) -> argparse.Namespace:
    """export_model's settings for checkpoint without export_draem.py's command line (the benchmarks): the given
    ones, EXPORT_DEFAULTS' for the rest."""
    unknown = given.keys() - EXPORT_DEFAULTS.keys()
    if unknown:
        raise TypeError(f"export_settings: no setting {', '.join(sorted(unknown))}")
    return argparse.Namespace(checkpoint=checkpoint, **EXPORT_DEFAULTS | given)


def export_model(args: argparse.Namespace, out: Path, precision: str, fp32: Path | None = None, **quantizer
                 ) -> dict[str, str]:
    """Write out: args.checkpoint in args.format at this precision and args.image_size (None: the checkpoint's),
    int8 as export_draem.py's int8 flags in args say (float_layers: None when measured, else the list, chosen by
    float_layers_by; finetune: None for the runtime's post-training quantizer, N for this project's QDQ graph after
    N steps of quantization-aware fine-tuning). Returns the file's metadata. fp32: the checkpoint's fp32 ONNX
    export at this size, when there is one already (exporting takes seconds; --precision auto exports once).
    quantizer: passed to quantize_static or nncf.quantize (benchmarks)."""
    checkpoint, format, image_size = args.checkpoint, args.format, args.image_size
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
    with tempfile.TemporaryDirectory() as tmp:
        if precision == "int8" and args.finetune is not None:  # this project's own graph: no fp32 file needed
            props = checkpoint_metadata(checkpoint, image_size)
            calibration, float_layers, recorded = prepare_int8(args, props)
            qdq = Path(tmp) / "int8.onnx"
            recorded |= finetuned_int8(args, props, calibration, float_layers, qdq)
            if format == "onnx":
                save_with_metadata(require("onnx").load(qdq), props | recorded, out)
                return props | recorded
            props |= {"format": OPENVINO_FORMAT} | recorded
            save_ir(ov.convert_model(str(qdq)), out, props)
            return props
        if precision == "int8":  # before exporting: a bad flag or calibration folder costs no export
            calibration, float_layers, recorded = prepare_int8(args, checkpoint_metadata(checkpoint, image_size))
        if fp32 is None:
            fp32 = Path(tmp) / "fp32.onnx"
            props = export_onnx(checkpoint, fp32, image_size)
        else:
            props = read_metadata(require("onnx").load(fp32))
        if format == "onnx":
            int8.quantize_onnx(fp32, out, calibration, float_layers, recorded, **quantizer)
            return read_metadata(require("onnx").load(out))
        model = ov.convert_model(str(fp32))
        if precision == "int8":
            model = int8.quantize_openvino(model, fp32, calibration, float_layers, **quantizer)
            props |= recorded
        props |= {"format": OPENVINO_FORMAT, "precision": precision}
        save_ir(model, out, props)
        return props
