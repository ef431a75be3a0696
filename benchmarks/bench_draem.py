"""Benchmark DRAEM: training step, anomaly simulation and evaluation, for one configuration.

    python benchmarks/bench_draem.py --preset cpu      # about a minute on 2 CPU cores
    python benchmarks/bench_draem.py --preset full     # 256 px, full widths, bf16: for a GPU

Prints a table and writes JSON (--json). FLOPs are counted with torch.utils.flop_counter on one training
step; MFU = achieved model FLOP/s / the device's peak (--peak_tflops, known GPUs looked up by name).
It also times a straightforward fp32 loop over the same model (NCHW, plain Adam, no autocast) so the
training step can be compared with it.
"""
import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import train_step  # noqa: E402
from loss import draem_loss  # noqa: E402
from model_unet import DraemModel, init_weights  # noqa: E402
from perlin import simulate_anomalies  # noqa: E402
from scoring.evaluate import predict  # noqa: E402
from training.cli import pick_device  # noqa: E402

PRESETS = {
    "tiny": {"image_size": 32, "base_width": 8, "seg_base_width": 8, "bs": 2, "amp": "off", "steps": 1},  # a smoke run
    "cpu": {"image_size": 128, "base_width": 32, "seg_base_width": 16, "bs": 8, "amp": "off", "steps": 8},
    "full": {"image_size": 256, "base_width": 128, "seg_base_width": 64, "bs": 8, "amp": "bf16", "steps": 30},
}
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "4090": 165.0}  # dense bf16


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, steps: int, device: torch.device, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, help="timed steps (median reported)")
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd step")
    p.add_argument("--peak_tflops", type=float, help="device peak for MFU (known GPUs are looked up)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    cfg = dict(PRESETS[args.preset])
    steps = args.steps or cfg["steps"]
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    size, bs = cfg["image_size"], cfg["bs"]
    dtype = {"bf16": torch.bfloat16, "off": None}[cfg["amp"]] if device.type == "cuda" else None
    g = torch.Generator(device).manual_seed(0)
    images = torch.randint(0, 256, (64, 3, size, size), dtype=torch.uint8, generator=g, device=device)
    sources = torch.randint(0, 256, (64, 3, size, size), dtype=torch.uint8, generator=g, device=device)
    batch_of = lambda: simulate_anomalies(images[torch.randint(0, 64, (bs,), generator=g, device=device)], sources,
                                          "official", g)
    result = {"preset": args.preset, **cfg, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else f"cpu ({torch.get_num_threads()} threads)", "amp": str(dtype), "torch": torch.__version__}

    def make_model(memory_format):
        torch.manual_seed(0)
        model = DraemModel(cfg["base_width"], cfg["seg_base_width"])
        init_weights(model)
        return model.to(device, memory_format=memory_format).train()

    # Training step, as train_draem.py runs it.
    model = make_model(torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    batch = batch_of()  # simulated samples only
    step = lambda net: train_step(net, batch, optimizer, scaler, autocast, False)
    with FlopCounterMode(display=False) as counter:
        step(model)
    flops_per_step = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = median_seconds(lambda: step(model), steps, device)
    result |= {"train_images_per_s": bs / seconds, "train_step_ms": 1000 * seconds,
               "tflop_per_image": flops_per_step / bs / 1e12, "achieved_tflops": flops_per_step / seconds / 1e12}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    peak = peak_tflops(device, args.peak_tflops)
    result["mfu"] = result["achieved_tflops"] / peak if peak else None
    if args.compile:
        compiled = torch.compile(model)
        seconds_c = median_seconds(lambda: step(compiled), steps, device, warmup=3)
        result |= {"compiled_train_images_per_s": bs / seconds_c,
                   "compiled_mfu": flops_per_step / seconds_c / 1e12 / peak if peak else None}

    # A straightforward fp32 loop over the same model, for comparison.
    plain = make_model(torch.contiguous_format)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-4)

    def plain_step():
        out = plain(batch.augmented)
        total, _ = draem_loss(out, batch)
        plain_opt.zero_grad()
        total.backward()
        plain_opt.step()
    result["plain_fp32_train_images_per_s"] = bs / median_seconds(plain_step, steps, device)
    result["train_speedup_vs_plain"] = result["train_images_per_s"] / result["plain_fp32_train_images_per_s"]

    # Anomaly simulation alone, and its share of a training step.
    sim = median_seconds(batch_of, steps * 2, device)
    result |= {"simulation_samples_per_s": bs / sim, "simulation_share_of_step": sim / (sim + seconds)}

    # Evaluation: anomaly maps for a test-set-sized batch (inference only).
    test_images = images.repeat(2, 1, 1, 1)
    model.eval()
    ev = median_seconds(lambda: predict(model, test_images, device, batch_size=32), max(2, steps // 4), device, 1)
    result["eval_images_per_s"] = len(test_images) / ev

    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
