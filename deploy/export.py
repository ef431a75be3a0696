"""Exporting for inspection PCs: ONNX (fp32, int8) and OpenVINO IR (fp32, bf16, int8), from one checkpoint.

Every format starts from the fp32 ONNX graph of onnx_graph.py. int8 is post-training static quantization
calibrated on good training images: ONNX Runtime's QDQ quantization, or NNCF's for OpenVINO. Both quantize
the convolutions only and keep in float the discriminative network's last convolution (its two logits
decide every pixel of the anomaly map: a quantization step there moves every map value) and everything
after it, the softmax and the image score's 21x21 mean filter and maximum. bf16 is OpenVINO's inference
precision on CPUs with bf16 instructions; the file holds fp32 weights.
"""
import tempfile
from pathlib import Path

import numpy as np

from data_loader import DataError, list_images, load_images
from deploy.onnx_graph import export, read_metadata, require, save_with_metadata
from deploy.openvino_model import DEPLOY_REQUIREMENTS, FORMAT as OPENVINO_FORMAT, save_ir
from training.checkpoint import load_checkpoint

PRECISIONS = {"onnx": ("fp32", "int8"), "openvino": ("fp32", "bf16", "int8")}
SUFFIX = {"onnx": ".onnx", "openvino": ".xml"}
MAX_CALIBRATION_IMAGES = 300


def calibration_folder(checkpoint: Path, given: Path | None) -> Path:
    """--calibration_images, else the checkpoint's own train/good when it is reachable from here."""
    if given is not None:
        return given
    config = load_checkpoint(checkpoint).info.config if checkpoint.suffix != ".pckl" else {}
    if config.get("data_path") and config.get("category"):
        folder = Path(config["data_path"]) / config["category"] / "train" / "good"
        if folder.is_dir():
            return folder
    raise DataError("int8 needs good images to calibrate on: give --calibration_images DIR (the checkpoint's "
                    "train/good is not reachable from here)")


def calibration_images(folder: Path, size: tuple[int, int], bit_depth: int, count: int) -> np.ndarray:
    """Up to count images of the folder, evenly spaced through its sorted files, as the graph takes them."""
    paths = list_images(folder, recursive=True)
    if not paths:
        raise DataError(f"--calibration_images {folder} holds no images")
    chosen = [paths[round(i)] for i in np.linspace(0, len(paths) - 1, min(count, len(paths)))]
    return (load_images(chosen, size, bit_depth=bit_depth).float() / 255).numpy()


def final_convolution(nodes, op_of, inputs_of, producer):
    """The convolution node (ONNX or OpenVINO) whose output the softmax reads, through adds or reshapes."""
    [softmax] = [n for n in nodes if op_of(n) in ("Softmax", "SoftMax")]
    node = softmax
    while op_of(node) != "Convolution" and op_of(node) != "Conv":
        node = producer(inputs_of(node)[0])
    return node


def quantize_onnx(source: Path, out: Path, images: np.ndarray) -> None:
    """ONNX Runtime static QDQ int8 quantization of the convolutions, the discriminator's last one excepted."""
    onnx = require("onnx")
    quantization = require("onnxruntime.quantization")
    proto = onnx.load(source)
    producers = {output: node for node in proto.graph.node for output in node.output}
    last = final_convolution(proto.graph.node, lambda n: n.op_type, lambda n: n.input, producers.get)

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            self.batches = iter(images[i:i + 1] for i in range(len(images)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    with tempfile.TemporaryDirectory() as tmp:
        quantized = Path(tmp) / "int8.onnx"
        quantization.quantize_static(str(source), str(quantized), Reader(), quant_format=quantization.QuantFormat.QDQ,
                                     op_types_to_quantize=["Conv"], nodes_to_exclude=[last.name], per_channel=True,
                                     activation_type=quantization.QuantType.QUInt8,
                                     weight_type=quantization.QuantType.QInt8)
        result = onnx.load(quantized)
    save_with_metadata(result, read_metadata(proto) | {"precision": "int8", "calibration_images": str(len(images))},
                       out)


def quantize_openvino(model, images: np.ndarray):
    """NNCF int8 quantization of an OpenVINO model, the discriminator's last convolution excepted."""
    nncf = require("nncf", DEPLOY_REQUIREMENTS)
    ops = model.get_ordered_ops()
    last = final_convolution(ops, lambda n: n.get_type_name(), lambda n: list(n.inputs()),
                             lambda port: port.get_source_output().get_node())
    dataset = nncf.Dataset([images[i:i + 1] for i in range(len(images))])
    return nncf.quantize(model, dataset, subset_size=len(images),
                         ignored_scope=nncf.IgnoredScope(names=[last.get_friendly_name()]))


def export_model(checkpoint: Path, out: Path, format: str = "onnx", precision: str = "fp32",
                 image_size: tuple[int, int] | None = None, calibration: Path | None = None,
                 calibration_count: int = MAX_CALIBRATION_IMAGES) -> dict[str, str]:
    """Write out in the format and precision asked for; return its metadata."""
    if precision not in PRECISIONS[format]:
        raise DataError(f"--precision {precision}: {format} supports {', '.join(PRECISIONS[format])}")
    if out.suffix != SUFFIX[format]:
        raise DataError(f"--out {out}: a {format} file ends in {SUFFIX[format]}")
    if format == "onnx" and precision == "fp32":
        return export(checkpoint, out, image_size)
    ov = require("openvino", DEPLOY_REQUIREMENTS) if format == "openvino" else None
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        props = export(checkpoint, fp32, image_size)
        images = None
        if precision == "int8":
            folder = calibration_folder(checkpoint, calibration)
            size = tuple(int(s) for s in props["image_size"].split("x"))
            images = calibration_images(folder, size, int(props["bit_depth"]), calibration_count)
        if format == "onnx":
            quantize_onnx(fp32, out, images)
            return read_metadata(require("onnx").load(out))
        model = ov.convert_model(str(fp32))
        if images is not None:
            model = quantize_openvino(model, images)
        props |= {"format": OPENVINO_FORMAT, "precision": precision,
                  **({"calibration_images": str(len(images))} if images is not None else {})}
        save_ir(model, out, props)
        return props

