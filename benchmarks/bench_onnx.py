"""Inference speed: PyTorch (as test_draem.py runs it) against the exported graph in ONNX Runtime, on the CPU.

    python benchmarks/bench_onnx.py                      # full model, 256 px, batch 1 and 16
    python benchmarks/bench_onnx.py --base_width 32 --seg_base_width 16 --repeats 5

Both compute the anomaly map of the same random-initialised model on the same random images; the two are
timed in interleaved rounds in one process (never two torch jobs at once), and the medians are reported.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import random_checkpoint, report  # noqa: E402
from deploy.export import export_onnx  # noqa: E402
from scoring.evaluate import predict  # noqa: E402
from scoring.model_files import load_onnx  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--base_width", type=int, default=128)
    p.add_argument("--seg_base_width", type=int, default=64)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    cpu = torch.device("cpu")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, onnx_path = Path(tmp) / "bench.pt", Path(tmp) / "bench.onnx"
        model = random_checkpoint(ckpt, args.base_width, args.seg_base_width, args.image_size)
        export_onnx(ckpt, onnx_path)
        exported, _ = load_onnx(onnx_path)
        for batch in args.batches:
            images = torch.randint(0, 256, (batch, 3, args.image_size, args.image_size), dtype=torch.uint8)
            runners = {"pytorch": lambda: predict(model, images, cpu, batch_size=batch),
                       "onnxruntime": lambda: predict(exported, images, cpu, batch_size=batch)}
            difference = (runners["pytorch"]()[0] - runners["onnxruntime"]()[0]).abs().max().item()  # also warms up
            times = {name: [] for name in runners}
            for _ in range(args.repeats):
                for name, run in runners.items():
                    started = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - started)
            row = {"batch": batch, "max_map_difference": difference,
                   **{f"{name}_images_per_s": batch / statistics.median(t) for name, t in times.items()}}
            row["ratio_onnx_over_pytorch"] = row["onnxruntime_images_per_s"] / row["pytorch_images_per_s"]
            results.append(row)
            print(f"batch {batch:3d}: PyTorch {row['pytorch_images_per_s']:.2f} images/s, ONNX Runtime "
                  f"{row['onnxruntime_images_per_s']:.2f} images/s ({row['ratio_onnx_over_pytorch']:.2f}x); "
                  f"max |map difference| {difference:.1e}")
    config = {**{k: getattr(args, k) for k in ("image_size", "base_width", "seg_base_width", "repeats")},
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    report(config, results, args.json)


if __name__ == "__main__":
    main()
