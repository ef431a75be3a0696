"""CPU inference per runtime and precision: images/s and peak memory, full model and a narrow one, 256 px.

    python benchmarks/bench_deploy.py                            # widths 128/64 and 32/16, batch 1 and 8
    python benchmarks/bench_deploy.py --widths 32/16 --rounds 5

Runtimes: PyTorch fp32 (as test_draem.py runs it) and bf16 (--amp bf16), ONNX Runtime fp32 and int8,
OpenVINO fp32, bf16 and int8, and both runtimes on this project's own int8 graph (int8-qdq: --finetune 0); each computes anomaly maps of the same randomly initialised model (the
speed of a forward pass does not depend on the weights; int8 is calibrated on 32 random images, half of them
with simulated anomalies, and keeps --float_layers in float: pass the list an int8 export of a trained model
of yours records, since sensitivities measured on random weights mean nothing). Speed:
interleaved rounds in one process, the median per runtime. Memory: each runtime in a process of its own,
the peak resident memory while loading the model and scoring one batch, minus the process's memory
before loading it (Python, torch and the runtimes' libraries).
"""
import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import memory_mib, random_checkpoint, report, reset_peak_memory  # noqa: E402
from deploy.export import export_model, export_settings  # noqa: E402
from scoring.evaluate import predict  # noqa: E402
from scoring.model_files import load_model  # noqa: E402
from training.cli import cpu_has_bf16  # noqa: E402

# int8-qdq: this project's own int8 graph (deploy/qat.py, --finetune 0); int8: the runtime's own quantizer
RUNTIMES = [("pytorch", "fp32"), ("pytorch", "bf16"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"),
            ("onnxruntime", "int8-qdq"), ("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8"),
            ("openvino", "int8-qdq")]
FILES = {"pytorch": "model.pt", "onnxruntime": "model_{}.onnx", "openvino": "model_{}.xml"}


def model_file(folder: Path, runtime: str, precision: str) -> Path:
    return folder / FILES[runtime].format(precision)


def prepare(folder: Path, widths: tuple[int, int], size: int, float_layers: list[str] | None,
            runtimes: list[tuple[str, str]]) -> None:
    """The checkpoint and its exports for these runtimes, int8 calibrated on random images."""
    ckpt = folder / "model.pt"
    random_checkpoint(ckpt, *widths, size)
    calibration = folder / "calibration"
    calibration.mkdir()
    rng = np.random.default_rng(0)
    for i in range(32):
        cv2.imwrite(str(calibration / f"{i:02d}.png"), rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    for runtime, precision in [r for r in runtimes if r[0] != "pytorch"]:
        out = model_file(folder, runtime, precision)
        settings = export_settings(ckpt, format="onnx" if runtime == "onnxruntime" else runtime,
                                   calibration_images=calibration, float_layers=float_layers,
                                   finetune=0 if precision == "int8-qdq" else None)
        export_model(settings, out, precision.split("-")[0])


def runner(folder: Path, runtime: str, precision: str, images: torch.Tensor):
    model, _ = load_model(model_file(folder, runtime, precision), torch.device("cpu"))
    amp = "bf16" if (runtime, precision) == ("pytorch", "bf16") else "off"
    return lambda: predict(model, images, torch.device("cpu"), batch_size=len(images), amp=amp)[0]


def child(folder: Path, runtime: str, precision: str, batch: int, size: int) -> dict:
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    before = reset_peak_memory()
    runner(folder, runtime, precision, images)()
    return {"peak_mib": memory_mib("VmHWM") - before}


def library_versions() -> dict:
    import onnxruntime
    import openvino
    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "openvino": openvino.__version__.split("-")[0], "python": platform.python_version()}


def cpu_description() -> dict:
    text = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    shown = sorted(f for f in flags if f.startswith(("avx512", "amx", "avx_vnni", "avx2", "fma")))
    return {"cpu": model, "threads": torch.get_num_threads(), "flags": shown}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="128/64,32/16")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path)
    p.add_argument("--float_layers", default="auto",
                   help="int8's layers kept in float: auto (measured on the random model), none or comma-separated "
                        "names")
    p.add_argument("--runtimes", help="only these, comma-separated runtime:precision pairs, e.g. "
                                      "pytorch:fp32,openvino:int8-qdq (default all; PyTorch fp32 always runs)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        folder, runtime, precision, batch = args.child.split(",")
        print(json.dumps(child(Path(folder), runtime, precision, int(batch), args.image_size)))
        return
    runtimes = [r for r in RUNTIMES if r[1] != "bf16" or cpu_has_bf16()]
    if args.runtimes:
        asked = {tuple(pair.split(":")) for pair in args.runtimes.split(",")} | {("pytorch", "fp32")}
        unknown = asked - set(RUNTIMES)
        if unknown:
            p.error(f"--runtimes: no runtime:precision {':'.join(sorted(unknown)[0])}; choose from "
                    + ", ".join(f"{r}:{q}" for r, q in RUNTIMES))
        runtimes = [r for r in runtimes if r in asked]
    float_layers = None if args.float_layers == "auto" else \
        [name for name in args.float_layers.split(",") if name not in ("", "none")]
    results = []
    for widths in [tuple(map(int, w.split("/"))) for w in args.widths.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            prepare(folder, widths, args.image_size, float_layers, runtimes)
            for batch in args.batches:
                images = torch.randint(0, 256, (batch, 3, args.image_size, args.image_size), dtype=torch.uint8)
                runs = {r: runner(folder, *r, images) for r in runtimes}
                reference = runs[("pytorch", "fp32")]()
                difference = {r: (run() - reference).abs().max().item() for r, run in runs.items()}  # warms up too
                times = {r: [] for r in runs}
                for _ in range(args.rounds):
                    for r, run in runs.items():
                        started = time.perf_counter()
                        run()
                        times[r].append(time.perf_counter() - started)
                base = batch / statistics.median(times[("pytorch", "fp32")])
                for (runtime, precision), found in times.items():
                    out = subprocess.run([sys.executable, __file__, "--child", f"{folder},{runtime},{precision},{batch}",
                                          "--image_size", str(args.image_size)], capture_output=True, text=True,
                                         check=True).stdout
                    rate = batch / statistics.median(found)
                    row = {"widths": f"{widths[0]}/{widths[1]}", "batch": batch, "runtime": runtime,
                           "precision": precision, "images_per_s": round(rate, 3), "vs_pytorch_fp32": round(rate / base, 2),
                           "peak_mib": round(json.loads(out.strip().splitlines()[-1])["peak_mib"]),
                           "max_map_difference": difference[(runtime, precision)]}
                    results.append(row)
                    print(json.dumps(row), flush=True)
    report({"image_size": args.image_size, "rounds": args.rounds, "float_layers": args.float_layers, **cpu_description(), **library_versions()},
           results, args.json)


if __name__ == "__main__":
    main()
