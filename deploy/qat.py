"""int8 as a graph of this project's own, and quantization-aware fine-tuning of it.

The graph is the simulated int8 that deploy/int8.py measures each convolution's sensitivity with, written into
the file as QuantizeLinear / DequantizeLinear pairs: ONNX Runtime and OpenVINO then compute the simulation's
arithmetic (not bit for bit: on deep, wide models an activation now and then rounds to the neighbouring level,
docs/int8.md), and a fine-tuned graph's file holds exactly the quantizers that were trained. Each quantized
convolution has its BatchNorm folded in (so BatchNorm is frozen while fine-tuning), its input quantized per
tensor to uint8 at a calibrated range (the scale learnable while fine-tuning, as in LSQ) and its weight per
output channel to int8, symmetric. The convolutions deploy/int8.py keeps in float stay as they are.

Fine-tuning distils the fp32 model: MAP_WEIGHT x L1 between the anomaly maps plus the MSE between the
reconstructions, on the checkpoint's good images, each batch simulated afresh with the checkpoint's recipe
and anomaly sources as training makes it (half of it anomaly-free).
"""
import copy
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from deploy.int8 import fake_int8_weight, input_ranges, uint8_parameters, weight_scales
from perlin import simulate_anomalies
from scoring.model_files import OUTPUTS, require

MAP_WEIGHT = 10.0  # the anomaly map is what decides verdicts and masks; the reconstruction only feeds it
LEARNING_RATE = 1e-6  # measured: 1e-5 raised the distillation loss on a trained model, 1e-6 lowered it
BATCH = 8
FINETUNE_STEPS = 300  # what --precision auto fine-tunes for when post-training int8 fails
FINETUNE_TEXTURES = 256  # anomaly-source images loaded for fine-tuning, evenly spaced through the folder
PROBE_IMAGES = 16  # a fixed batch, not trained on, the distillation loss is reported on before and after


def folded(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> tuple[Tensor, Tensor]:
    """The convolution's weight and bias with the eval-mode BatchNorm after it folded in."""
    weight = conv.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros(weight.shape[0])
    if bn is None:
        return weight.clone(), bias.clone()
    factor = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return weight * factor[:, None, None, None], (bias - bn.running_mean) * factor + bn.bias.detach()


class Int8Conv(nn.Module):
    """A convolution in simulated int8: input per tensor as uint8, weight per output channel as int8."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, low: float, high: float):
        super().__init__()
        weight, bias = folded(conv, bn)
        self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        scale, zero = uint8_parameters(low, high)
        self.input_scale = nn.Parameter(torch.tensor([scale]))
        self.register_buffer("input_zero", torch.tensor([zero], dtype=torch.int32))
        self.register_buffer("weight_scale", weight_scales(self.weight))
        self.fixed = (scale, zero)  # the file's constants, taken from the parameters whenever eval() is called

    def train(self, mode: bool = True) -> "Int8Conv":
        if not mode:
            self.fixed = (float(self.input_scale.detach().clamp_min(1e-12)), int(self.input_zero))
            self.weight_scale.copy_(weight_scales(self.weight))
        return super().train(mode)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:  # the scale learns (its gradient scaled as LSQ advises)
            grad = 1 / math.sqrt(x[0].numel() * 255)
            x = torch._fake_quantize_learnable_per_tensor_affine(x, self.input_scale, self.input_zero.float(), 0,
                                                                 255, grad)
        else:
            x = torch.fake_quantize_per_tensor_affine(x, *self.fixed, 0, 255)
        scale = weight_scales(self.weight) if self.training else self.weight_scale
        weight = fake_int8_weight(self.weight, scale)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def int8_graph(graph: nn.Module, ranges: dict[str, tuple[float, float]], float_layers: list[str]) -> nn.Module:
    """A copy of the scoring graph whose convolutions, but float_layers, are Int8Conv at these input ranges
    (names as deploy/int8.convolutions gives them), each BatchNorm after one folded into it."""
    quantized = copy.deepcopy(graph).cpu().eval()
    for prefix, parent in list(quantized.named_modules()):
        children = list(parent.named_children())
        for i, (name, child) in enumerate(children):
            full = f"{prefix}.{name}".removeprefix(".").removeprefix("model.")
            if not isinstance(child, nn.Conv2d) or full in float_layers:
                continue
            following = children[i + 1][1] if i + 1 < len(children) else None
            bn = following if isinstance(parent, nn.Sequential) and isinstance(following, nn.BatchNorm2d) else None
            setattr(parent, name, Int8Conv(child, bn, *ranges[full]))
            if bn is not None:
                setattr(parent, children[i + 1][0], nn.Identity())
    return quantized


def frozen_batchnorm(student: nn.Module) -> None:
    """The BatchNorm layers left (after the convolutions kept in float) at their running statistics and affine
    parameters: fine-tuning batches of 8 must not rewrite what training measured over the whole set."""
    for module in student.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval().requires_grad_(False)


def distillation_loss(student: nn.Module, teacher: nn.Module, images: Tensor) -> Tensor:
    with torch.no_grad():
        target_map, _, target_reconstruction = teacher(images)
    anomaly_map, _, reconstruction = student(images)
    return MAP_WEIGHT * F.l1_loss(anomaly_map, target_map) + F.mse_loss(reconstruction, target_reconstruction)


def evaluated(student: nn.Module, teacher: nn.Module, images: Tensor) -> float:
    """The distillation loss on images, the student in eval mode (the file's arithmetic), without gradients."""
    was_training = student.training
    student.eval()
    with torch.no_grad():
        loss = distillation_loss(student, teacher, images).item()
    if was_training:
        student.train()
        frozen_batchnorm(student)
    return loss


def seconds_per_step(teacher: nn.Module, size: tuple[int, int], float_layers: list[str], device: torch.device
                     ) -> float:
    """What one fine-tuning step of this graph costs on this device, timed before any is run: a warm-up step, then
    the mean of two, on random images at random-image ranges (the cost depends on neither)."""
    images = torch.rand(BATCH, 3, *size)
    student = int8_graph(teacher, input_ranges(teacher, images)[0], float_layers).to(device).train()
    frozen_batchnorm(student)
    teacher = teacher.to(device).eval()
    optimizer = torch.optim.Adam(student.parameters(), lr=0.0)
    images = images.to(device)
    times = []
    for _ in range(3):
        started = time.perf_counter()
        loss = distillation_loss(student, teacher, images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return sum(times[1:]) / 2


def finetune(student: nn.Module, teacher: nn.Module, good: Tensor, sources: Tensor | None, recipe: str, steps: int,
             device: torch.device) -> dict:
    """steps of Adam at LEARNING_RATE on the student, each on BATCH good images (uint8, N x 3 x H x W) with fresh
    simulated anomalies (seeded: a file fine-tuned twice is the same file); returns what the file's metadata
    records. The teacher is the fp32 graph."""
    student.to(device).train()
    frozen_batchnorm(student)
    teacher.to(device).eval()
    good = good.to(device)
    sources = sources.to(device) if sources is not None else None
    g = torch.Generator(device).manual_seed(0)
    probe = simulate_anomalies(good[torch.randint(0, len(good), (PROBE_IMAGES,), generator=g, device=device)],
                               sources, recipe, g).augmented.clamp(0, 1)
    before = evaluated(student, teacher, probe)
    optimizer = torch.optim.Adam(student.parameters(), lr=LEARNING_RATE)
    started = time.perf_counter()
    with tqdm(total=steps, unit="step", desc="int8 fine-tuning", disable=steps == 0 or not sys.stderr.isatty()) as bar:
        for step in range(steps):
            batch = simulate_anomalies(good[torch.randint(0, len(good), (BATCH,), generator=g, device=device)],
                                       sources, recipe, g).augmented.clamp(0, 1)
            loss = distillation_loss(student, teacher, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update(1)
            if step == 1 and device.type == "cpu":
                each = (time.perf_counter() - started) / 2
                print(f"int8 fine-tuning: about {each * steps / 60:.1f} min on this CPU ({steps} steps of {BATCH})")
    student.eval()
    after = evaluated(student, teacher, probe)
    print(f"int8 fine-tuning: distillation loss on {PROBE_IMAGES} probe images {before:.4g} -> {after:.4g}")
    return {"finetune_steps": str(steps), "finetune_loss_before": f"{before:.6g}", "finetune_loss_after": f"{after:.6g}",
            "finetune_seconds": f"{time.perf_counter() - started:.1f}"}


def weights_as_int8(proto) -> None:
    """Replace each QuantizeLinear of a constant weight by the int8 initializer it computes (in place): the file
    then holds int8 weights, as a quantizer's output does, and both runtimes read DequantizeLinear -> Conv."""
    numpy_helper = require("onnx").numpy_helper
    constants = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    constants |= {node.output[0]: numpy_helper.to_array(node.attribute[0].t) for node in proto.graph.node
                  if node.op_type == "Constant" and node.attribute[0].name == "value"}
    keep = []
    for node in proto.graph.node:
        if node.op_type != "QuantizeLinear" or not all(i in constants for i in node.input):
            keep.append(node)
            continue
        weight, scale, zero = (constants[i] for i in node.input)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * weight.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape if scale.ndim else ()), zero.reshape(shape if zero.ndim else ())
        values = np.clip(np.rint(weight / scale) + zero, -128, 127).astype(zero.dtype)
        proto.graph.initializer.append(numpy_helper.from_array(values, node.output[0]))
    used = {i for node in keep for i in node.input} | {o.name for o in proto.graph.output}
    keep = [node for node in keep if node.op_type != "Constant" or node.output[0] in used]
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
    for t in [t for t in proto.graph.initializer if t.name not in used]:
        proto.graph.initializer.remove(t)


def export_onnx(student: nn.Module, size: tuple[int, int], path: Path) -> None:
    """The student as a QDQ ONNX graph with int8 weights (the metadata is the caller's). TorchScript's exporter:
    torch.export has no fake-quantize kernel for a free batch size."""
    onnx = require("onnx")
    frozen = copy.deepcopy(student).cpu().eval().requires_grad_(False)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(frozen, (torch.rand(2, 3, *size),), path, input_names=["images"], output_names=OUTPUTS,
                          dynamo=False, opset_version=17, dynamic_axes={name: {0: "batch"} for name in
                                                                        ["images", *OUTPUTS]})
    proto = onnx.load(path)
    weights_as_int8(proto)
    onnx.save(proto, path)
