"""Streaming inference on a folder: images/s and peak memory of `test_draem.py --images` for N images.

    python benchmarks/bench_inference.py                         # 100 and 1000 images, widths 16/16, 256 px
    python benchmarks/bench_inference.py --counts 16 --base_width 128 --seg_base_width 64   # the full model

The images are real ones (../shared/data/mtd, grayscale JPEGs of varying sizes, cycled to reach N) when
that folder is beside the checkout, else generated demo textures. Each count runs `test_draem.py` in its
own process; its peak resident memory comes from the operating system (wait4), its rate from the script.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data" / "mtd"

from bench_common import random_checkpoint, report  # noqa: E402
from training.demo import make_demo_dataset  # noqa: E402


def source_images(work: Path) -> list[Path]:
    if SHARED.is_dir():
        return sorted(SHARED.rglob("*.jpg"))
    root = make_demo_dataset(work / "demo", train=64, test_good=16, per_defect=8, sources=1)
    return sorted((root / "weave").rglob("*.png"))


def make_folder(folder: Path, sources: list[Path], count: int) -> None:
    folder.mkdir(parents=True)
    for i in range(count):  # links: the files are read, never copied
        source = sources[i % len(sources)]
        (folder / f"{i:05d}{source.suffix}").symlink_to(source.resolve())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--base_width", type=int, default=16)
    p.add_argument("--seg_base_width", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sources = source_images(work)
        ckpt = work / "bench.pt"
        random_checkpoint(ckpt, args.base_width, args.seg_base_width, args.image_size)
        for count in args.counts:
            folder = work / f"in{count}"
            make_folder(folder, sources, count)
            cmd = [sys.executable, str(ROOT / "test_draem.py"), "--checkpoint", str(ckpt), "--images", str(folder),
                   "--out", str(work / f"out{count}"), "--threshold", "0.5", "--pixel_threshold", "0.5",
                   "--batch_size", str(args.batch_size), "--device", args.device]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            stdout, stderr = proc.stdout.read(), proc.stderr.read()
            _, status, usage = os.wait4(proc.pid, 0)
            if status:
                raise SystemExit(f"test_draem.py failed: {stderr[-2000:]}")
            rate = float(re.search(r"\(([\d.]+) images/s\)", stdout).group(1))
            row = {"images": count, "images_per_s": rate, "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}
            results.append(row)
            print(f"{count:5d} images: {rate:6.1f} images/s, peak memory {row['peak_rss_mib']} MiB")
    config = {k: getattr(args, k) for k in ("image_size", "base_width", "seg_base_width", "batch_size", "device")}
    config["images_from"] = "shared/data/mtd" if SHARED.is_dir() else "generated demo textures"
    config["torch_threads"] = torch.get_num_threads()
    report(config, results, args.json)


if __name__ == "__main__":
    main()
