"""The training step in fp32 and in bf16 autocast on this CPU: images/s, interleaved rounds in one process.

    python benchmarks/bench_train_amp.py                       # 128 px, widths 32/16, batch 8
    python benchmarks/bench_train_amp.py --image_size 128 --base_width 16 --seg_base_width 16   # the demo's model

The step is engine.train_step, as train_draem.py runs it (channels_last, losses in fp32). bf16 is what
--amp auto picks on CPUs with AVX512_BF16 or AMX; elsewhere it is emulated, and slower.
"""
import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import train_step  # noqa: E402
from model_unet import DraemModel, init_weights  # noqa: E402
from perlin import simulate_anomalies  # noqa: E402
from training.cli import cpu_capabilities  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--base_width", type=int, default=32)
    p.add_argument("--seg_base_width", type=int, default=16)
    p.add_argument("--bs", type=int, default=8)
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds; each times 3 steps per precision")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 3, args.image_size, args.image_size), dtype=torch.uint8, generator=g)
    batch = simulate_anomalies(images[: args.bs], images[-8:], "official", g)  # no real defects
    steps = {}
    for name, autocast in (("fp32", nullcontext()), ("bf16", torch.autocast("cpu", dtype=torch.bfloat16))):
        torch.manual_seed(0)
        model = DraemModel(args.base_width, args.seg_base_width)
        init_weights(model)
        model = model.to(memory_format=torch.channels_last).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        steps[name] = lambda m=model, o=optimizer, s=scaler, a=autocast: train_step(m, batch, o, s, a, False)
    times = {name: [] for name in steps}
    for step in steps.values():
        step()  # warm-up
    for _ in range(args.rounds):
        for name, step in steps.items():
            started = time.perf_counter()
            for _ in range(3):
                step()
            times[name].append((time.perf_counter() - started) / 3)
    rate = {name: args.bs / statistics.median(t) for name, t in times.items()}
    result = {**vars(args), "json": None, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "cpu": cpu_capabilities(), "images_per_s": rate, "bf16_over_fp32": rate["bf16"] / rate["fp32"]}
    print(json.dumps(result, indent=2, default=str))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
