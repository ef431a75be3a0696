"""Scoring one large image whole vs in tiles: seconds and peak memory, full widths and small ones, on the CPU.

    python benchmarks/bench_tiling.py                      # 2048x2048, tiles 256 overlapping by 32, 3 rounds
    python benchmarks/bench_tiling.py --widths 128/64 --rounds 1      # the full model only (minutes per image)

Each measurement runs in its own process (peak resident memory is per process), one at a time, in
interleaved rounds; the process's address space is capped at --memory_limit GiB so that a whole image
that does not fit fails cleanly instead of swapping. Randomly initialised weights: the cost of a forward
pass does not depend on them. Reported: median seconds per image, images/s, and the peak resident memory
minus the process's resident memory before scoring (the model and the image).
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import memory_mib, report, reset_peak_memory  # noqa: E402
from model_unet import DraemModel, init_weights  # noqa: E402
from scoring.evaluate import predict  # noqa: E402
from scoring.tiling import TiledModel  # noqa: E402


def measure(widths: tuple[int, int], tiled: bool, args: argparse.Namespace) -> dict:
    """In the child process: score one size x size image once, return seconds and memory."""
    limit = int(args.memory_limit * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.manual_seed(0)
    model = DraemModel(*widths)
    init_weights(model)
    model.eval()
    image = torch.randint(0, 256, (1, 3, args.size, args.size), dtype=torch.uint8)
    scorer = TiledModel(model, (args.tile, args.tile), args.tile_overlap, args.tile_batch) if tiled else model
    before = reset_peak_memory()
    started = time.perf_counter()
    try:
        predict(scorer, image, torch.device("cpu"), batch_size=1)
    except Exception as exc:  # an allocation beyond the cap: the whole image does not fit
        return {"fits": False, "error": str(exc).splitlines()[0][:200], "limit_gib": args.memory_limit}
    seconds = time.perf_counter() - started
    peak = memory_mib("VmHWM")
    return {"fits": True, "seconds": seconds, "peak_mib": peak, "extra_mib": peak - before}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--tile_overlap", type=int, default=32)
    p.add_argument("--tile_batch", type=int, default=8, help="tiles per forward pass (test_draem.py's --batch_size)")
    p.add_argument("--widths", default="128/64,16/16", help="base/seg widths, comma-separated (default 128/64,16/16)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--memory_limit", type=float, default=20, help="GiB of address space per measurement")
    p.add_argument("--json", type=Path)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        base, seg, mode = args.child.split(",")
        print(json.dumps(measure((int(base), int(seg)), mode == "tiled", args)))
        return
    widths = [tuple(map(int, w.split("/"))) for w in args.widths.split(",")]
    runs = {(w, mode): [] for w in widths for mode in ("whole", "tiled")}
    for _ in range(args.rounds):
        for (widths, mode), found in runs.items():
            child = [sys.executable, __file__, "--child", f"{widths[0]},{widths[1]},{mode}",
                     *[f"--{k}={getattr(args, k)}" for k in ("size", "tile", "tile_overlap", "tile_batch", "memory_limit")]]
            out = subprocess.run(child, capture_output=True, text=True, check=True).stdout
            found.append(json.loads(out.strip().splitlines()[-1]))
    results = []
    for (widths, mode), found in runs.items():
        row = {"widths": f"{widths[0]}/{widths[1]}", "mode": mode, "rounds": len(found)}
        if all(r["fits"] for r in found):
            seconds = statistics.median(r["seconds"] for r in found)
            row |= {"seconds": round(seconds, 2), "images_per_s": round(1 / seconds, 4),
                    "peak_mib": round(statistics.median(r["peak_mib"] for r in found)),
                    "extra_mib": round(statistics.median(r["extra_mib"] for r in found))}
        else:
            row |= {"fits": False, "error": next(r["error"] for r in found if not r["fits"])}
        results.append(row)
        print(json.dumps(row), flush=True)
    report({"size": args.size, "tile": args.tile, "tile_overlap": args.tile_overlap, "tile_batch": args.tile_batch,
            "rounds": args.rounds, "threads": torch.get_num_threads(), "torch": torch.__version__}, results, args.json)


if __name__ == "__main__":
    main()
