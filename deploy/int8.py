"""Post-training int8 for DRAEM: what it calibrates on, which convolutions it keeps in float, and the two quantizers.

Calibration sees what the line will see: good images and, by default, as many simulated anomalies made from
them with the checkpoint's own recipe (perlin.py), as training does (half of its samples are anomaly-free).
On good images alone the ranges after the discriminator's input (reconstruction beside image) never cover a
defect and get clipped exactly where the map should light up.

Which convolutions stay in float is measured, not guessed: each convolution alone is quantized in PyTorch
(simulated int8: weights symmetric per output channel, its input asymmetric per tensor at the range seen on
the calibration set) and the mean absolute change of the anomaly map against fp32 is its sensitivity. The
most sensitive convolutions stay in float while their multiply-adds fit a budget (FLOAT_BUDGET of the
model's), those below MIN_SENSITIVITY of the worst one excepted. ONNX Runtime (QDQ) and NNCF (OpenVINO) then
quantize every other convolution; the softmax and the image score run in float in both.
"""
import dataclasses
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from data_loader import DataError, list_images, load_images
from perlin import simulate_anomalies
from recipe import RECIPES
from scoring.model_files import DEPLOY_REQUIREMENTS, read_metadata, require, save_with_metadata

ANOMALY_SHARE = 0.5  # training's own mix: recipe.anomaly_free_p of its samples are good
FLOAT_BUDGET = 0.10  # at most this share of the multiply-adds stays in float
MIN_SENSITIVITY = 0.05  # convolutions this much less sensitive than the worst are quantized whatever the budget
SENSITIVITY_IMAGES = 16  # calibration images (half of them simulated anomalies) the sensitivity is measured on
SEED = 0


def evenly_spaced(items: list, count: int) -> list:
    return [items[round(i)] for i in np.linspace(0, len(items) - 1, min(count, len(items)))] if items else []


def simulated_anomalies(bases: Tensor, sources: Path | None, recipe: str, seed: int = SEED) -> tuple[Tensor, str]:
    """One simulated anomaly on each of these uint8 BGR images (the recipe's, none left anomaly-free), as float in
    [0, 1], and what they were made of in words: textures under sources, or Perlin noise when sources is None."""
    texture_paths = list_images(sources, recursive=True) if sources is not None else []
    if sources is not None and not texture_paths:
        raise DataError(f"--anomaly_source_path {sources} holds no images")
    textures = load_images(evenly_spaced(texture_paths, 64), tuple(bases.shape[-2:])) if texture_paths else None
    every_one_anomalous = dataclasses.replace(RECIPES.get(recipe, RECIPES["official"]), anomaly_free_p=0.0)
    made = simulate_anomalies(bases, textures, every_one_anomalous, torch.Generator().manual_seed(seed))
    described = f"{len(texture_paths)} textures in {sources}" if textures is not None else "Perlin noise"
    return made.augmented.clamp(0, 1), described


def calibration_set(folder: Path, size: tuple[int, int], bit_depth: int, count: int, anomaly_share: float,
                    recipe: str, sources: Path | None) -> tuple[np.ndarray, dict[str, str]]:
    """count images, (N, 3, H, W) float32 BGR in [0, 1] as the graph takes them: good ones evenly spaced through
    the folder, then anomaly_share of count simulated from them; and what the metadata records of them."""
    paths = list_images(folder, recursive=True)
    if not paths:
        raise DataError(f"--calibration_images {folder} holds no images")
    simulated = round(count * anomaly_share)
    good = load_images(evenly_spaced(paths, count - simulated), size, bit_depth=bit_depth).float() / 255
    anomalies, described = torch.empty(0, *good.shape[1:]), "none"
    if simulated:
        bases = load_images(evenly_spaced(paths, simulated), size, bit_depth=bit_depth)
        anomalies, described = simulated_anomalies(bases, sources, recipe)
    return torch.cat((good, anomalies)).numpy(), {
        "calibration_images": str(len(good) + simulated), "calibration_good": str(len(good)),
        "calibration_simulated": str(simulated), "calibration_sources": described}


def convolutions(graph: nn.Module) -> dict[str, nn.Conv2d]:
    return {name.removeprefix("model."): m for name, m in graph.named_modules() if isinstance(m, nn.Conv2d)}


def weight_scales(weight: Tensor) -> Tensor:
    """Per output channel, the symmetric int8 scale of a convolution's weight."""
    return (weight.detach().abs().flatten(1).amax(1) / 127).clamp_min(1e-12)


def uint8_parameters(low: float, high: float) -> tuple[float, int]:
    """Scale and zero point of an asymmetric uint8 range that holds low..high and 0 exactly."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max((high - low) / 255, 1e-12)
    return scale, int(min(255, max(0, round(-low / scale))))


def fake_int8_weight(weight: Tensor, scale: Tensor | None = None) -> Tensor:
    scale = weight_scales(weight) if scale is None else scale
    return torch.fake_quantize_per_channel_affine(weight, scale, torch.zeros_like(scale, dtype=torch.int32), 0,
                                                  -128, 127)


def fake_uint8(x: Tensor, low: float, high: float) -> Tensor:
    return torch.fake_quantize_per_tensor_affine(x, *uint8_parameters(low, high), 0, 255)


def input_ranges(graph: nn.Module, images: Tensor) -> tuple[dict[str, tuple[float, float]], dict[str, int]]:
    """Each convolution's input range over the images, and its multiply-adds per image."""
    ranges, macs, hooks = {}, {}, []
    for name, conv in convolutions(graph).items():
        def seen(module, inputs, output, name=name):
            low, high = ranges.get(name, (np.inf, -np.inf))
            ranges[name] = (min(low, inputs[0].min().item()), max(high, inputs[0].max().item()))
            kernel = module.kernel_size[0] * module.kernel_size[1]
            macs[name] = output[0].numel() * module.in_channels // module.groups * kernel
        hooks.append(conv.register_forward_hook(seen))
    with torch.no_grad():
        for batch in images.split(8):
            graph(batch)
    for hook in hooks:
        hook.remove()
    return ranges, macs


def sensitivities(graph: nn.Module, images: Tensor) -> tuple[dict[str, float], dict[str, int]]:
    """Every convolution by its module name inside DraemModel: the mean |anomaly-map change| when it alone is int8,
    and its multiply-adds per image."""
    ranges, macs = input_ranges(graph, images)
    with torch.no_grad():
        reference = graph(images)[0]
        changes = {}
        for name, conv in convolutions(graph).items():
            weight = conv.weight.data.clone()
            conv.weight.data = fake_int8_weight(weight)
            hook = conv.register_forward_pre_hook(lambda m, inputs, r=ranges[name]: (fake_uint8(inputs[0], *r),))
            changes[name] = (graph(images)[0] - reference).abs().mean().item()
            hook.remove()
            conv.weight.data = weight
    return changes, macs


def by_sensitivity(sensitivity: dict[str, float]) -> list[str]:
    return sorted(sensitivity, key=lambda name: -sensitivity[name])


def choose_float_layers(sensitivity: dict[str, float], macs: dict[str, int], budget: float = FLOAT_BUDGET
                        ) -> list[str]:
    """The most sensitive convolutions whose multiply-adds fit the budget; none below MIN_SENSITIVITY of the worst."""
    total, worst = sum(macs.values()), max(sensitivity.values())
    kept, spent = [], 0
    for name in by_sensitivity(sensitivity):
        if sensitivity[name] < MIN_SENSITIVITY * worst:
            break
        if spent + macs[name] <= budget * total:
            kept.append(name)
            spent += macs[name]
    return kept


def measure_layers(graph: nn.Module, calibration: np.ndarray, good: int) -> tuple[dict[str, float], dict[str, int]]:
    """sensitivities() on SENSITIVITY_IMAGES of the calibration set (its first `good` images good, the rest
    simulated anomalies), half good, half simulated."""
    images = torch.from_numpy(calibration)
    good, simulated = images[:good], images[good:]
    half = SENSITIVITY_IMAGES // 2 if len(simulated) else SENSITIVITY_IMAGES
    picked = [good[evenly_spaced(list(range(len(good))), half)]]
    if len(simulated):
        picked.append(simulated[evenly_spaced(list(range(len(simulated))), SENSITIVITY_IMAGES - half)])
    return sensitivities(graph, torch.cat(picked))


def multiply_adds(graph: nn.Module, image: np.ndarray) -> dict[str, int]:
    return input_ranges(graph, torch.from_numpy(image[None]))[1]


def onnx_conv_names(proto, layers: list[str]) -> dict[str, str]:
    """ONNX Conv node name of each PyTorch convolution (its weight initializer carries the module's name)."""
    by_weight = {node.input[1]: node.name for node in proto.graph.node if node.op_type == "Conv"}
    return {name: by_weight[f"model.{name}.weight"] for name in layers}


def quantize_onnx(source: Path, out: Path, images: np.ndarray, float_layers: list[str],
                  metadata: dict[str, str], **options) -> None:
    """ONNX Runtime static QDQ int8: every convolution but float_layers; per-channel weights, uint8 activations."""
    onnx = require("onnx")
    quantization = require("onnxruntime.quantization")
    proto = onnx.load(source)

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            self.batches = iter(images[i:i + 1] for i in range(len(images)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    settings = {"per_channel": True, "activation_type": quantization.QuantType.QUInt8,
                "weight_type": quantization.QuantType.QInt8} | options
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ONNX Runtime's advice to pre-process, printed on the root logger each time
    try:
        with tempfile.TemporaryDirectory() as tmp:
            quantized = Path(tmp) / "int8.onnx"
            quantization.quantize_static(str(source), str(quantized), Reader(),
                                         quant_format=quantization.QuantFormat.QDQ, op_types_to_quantize=["Conv"],
                                         nodes_to_exclude=list(onnx_conv_names(proto, float_layers).values()),
                                         **settings)
            result = onnx.load(quantized)
    finally:
        root.setLevel(level)
    save_with_metadata(result, read_metadata(proto) | metadata, out)


def quantize_openvino(model, source: Path, images: np.ndarray, float_layers: list[str], **options):
    """NNCF int8 of an OpenVINO model converted from source (ONNX): every convolution but float_layers."""
    nncf = require("nncf", DEPLOY_REQUIREMENTS)
    nncf.set_log_level(logging.ERROR)  # its per-layer INFO lines would bury the console's own
    names = set(onnx_conv_names(require("onnx").load(source), float_layers).values())
    ignored = [op.get_friendly_name() for op in model.get_ordered_ops()
               if op.get_type_name() == "Convolution" and op.get_friendly_name().split("/")[0] in names]
    dataset = nncf.Dataset([images[i:i + 1] for i in range(len(images))])
    # AvgPool: the image score's mean filter reads the float map (NNCF would quantize the map to 256 levels)
    return nncf.quantize(model, dataset, subset_size=len(images),
                         ignored_scope=nncf.IgnoredScope(names=ignored, types=["AvgPool"], validate=False), **options)
