"""The N-defect protocol: DRAEM trained with N of a labelled set's real defects moved into training, every run
scored on the same remaining defects.

    python benchmarks/bench_defects.py --data_path ./datasets --obj_id mtd \
        --anomaly_source_path ./datasets/dtd/images --counts 0 5 16 53 --seeds 0 1 --out bench_results/defects \
        -- --image_size 128 --base_width 32 --seg_base_width 16 --epochs 5 --device cpu

Each (N, seed) trains once with train_draem.py (the flags after -- go to every run; a run whose checkpoint
exists is not trained again). Then every checkpoint is scored on one test set: the category's test set without
every defect image any of the runs trained on (the union of their recorded files), so the rows differ in the
training alone. --leave_out M also leaves out the M defects each seed's run would draw for N = M, so a later batch
of runs (other flags, fewer counts) is scored on the same images as an earlier one that ran N = M. Writes
results.json and results.md (the table, and each N's change against N = 0 per seed).
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_loader import category_layout, file_digest, load_test_set  # noqa: E402
from engine import defect_draw  # noqa: E402
from scoring.evaluate import evaluate  # noqa: E402
from scoring.metrics import percent  # noqa: E402
from training.checkpoint import model_from_checkpoint  # noqa: E402
from training.defects import moved_from_test  # noqa: E402

SHOWN = {"image_auroc": "image AUROC", "image_ap": "image AP", "pixel_ap": "pixel AP", "aupro": "AUPRO"}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", type=Path, required=True)
    p.add_argument("--obj_id", required=True, help="the category (a folder name)")
    p.add_argument("--anomaly_source_path", type=Path)
    p.add_argument("--counts", type=int, nargs="+", default=[0, 5, 16, 53], help="N real defects (default 0 5 16 53)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", type=Path, default=Path("bench_results/defects"))
    p.add_argument("--leave_out", type=int, default=0, metavar="M",
                   help="also leave out the M defects each seed would train on at N = M (default 0: only those "
                        "the runs trained on)")
    p.add_argument("train_flags", nargs=argparse.REMAINDER, help="-- then flags for every train_draem.py run")
    return p


def train(args: argparse.Namespace, count: int, seed: int, extra: list[str]) -> Path:
    name = f"defects{count}_seed{seed}"
    checkpoint = args.out / "checkpoints" / f"{name}.pt"
    if checkpoint.exists():
        return checkpoint
    command = [sys.executable, "train_draem.py", "--obj_id", args.obj_id, "--data_path", str(args.data_path),
               "--train_defects", str(count), "--seed", str(seed), "--run_name", name, "--eval_every", "-1",
               "--checkpoint_path", str(args.out / "checkpoints"), "--log_path", str(args.out / "logs"), *extra]
    if args.anomaly_source_path:
        command += ["--anomaly_source_path", str(args.anomaly_source_path)]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=Path(__file__).resolve().parents[1])
    print(f"{name}: trained in {time.perf_counter() - started:.0f} s", flush=True)
    return checkpoint


def drawn_for(args: argparse.Namespace, count: int) -> frozenset[str]:
    """The digests of the test defects that --train_defects count moves into training, for each of the seeds."""
    layout = category_layout(args.data_path, args.obj_id)
    return frozenset(file_digest(d["path"]) for seed in args.seeds
                     for d in moved_from_test(layout, count, defect_draw(seed)))


def markdown(rows: list[dict], common: dict) -> str:
    head = "| N real defects | seed | " + " | ".join(SHOWN.values()) + " |"
    lines = [f"Scored on {common['good']} good and {common['defects']} defect images of {common['category']}: "
             f"{common['left_out']} defect images left out, the union of those the runs trained on"
             + (f" and of the N = {common['leave_out']} draws of their seeds." if common["leave_out"] else "."), "",
             head, "|---|---|" + "---|" * len(SHOWN)]
    lines += [f"| {r['count']} | {r['seed']} | " + " | ".join(percent(r[m]) for m in SHOWN) + " |" for r in rows]
    base = {r["seed"]: r for r in rows if r["count"] == 0}
    lines += ["", "Change against N = 0 of the same seed, in points.", "", head, "|---|---|" + "---|" * len(SHOWN)]
    lines += [f"| {r['count']} | {r['seed']} | " + " | ".join(f"{100 * (r[m] - base[r['seed']][m]):+.1f}" for m in SHOWN)
              + " |" for r in rows if r["count"] and r["seed"] in base]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = get_args_parser().parse_args()
    extra = [f for f in args.train_flags if f != "--"]
    runs = {(n, s): train(args, n, s, extra) for n in args.counts for s in args.seeds}
    models = {key: model_from_checkpoint(path) for key, path in runs.items()}
    trained = frozenset().union(*(info.trained_digests for _, info in models.values()),
                                drawn_for(args, args.leave_out))
    info = next(iter(models.values()))[1]
    test_set = load_test_set(args.data_path, args.obj_id, info.image_size, None, info.bit_depth, trained)
    common = {"category": args.obj_id, "good": int((test_set.labels == 0).sum()), "defects": int(test_set.labels.sum()),
              "left_out": len(test_set.left_out), "leave_out": args.leave_out, "train_flags": extra}
    rows = []
    for (count, seed), (model, info) in models.items():
        metrics = evaluate(model, test_set, torch.device("cpu"), info.channel_order)["metrics"]
        rows.append({"count": count, "seed": seed, "run": runs[(count, seed)].stem, **metrics})
        print(f"N={count} seed={seed} " + " ".join(f"{m}={percent(metrics[m])}" for m in SHOWN), flush=True)
    rows.sort(key=lambda r: (r["count"], r["seed"]))
    (args.out / "results.json").write_text(json.dumps({"common_test_set": common, "runs": rows}, indent=2))
    (args.out / "results.md").write_text(markdown(rows, common))
    print(markdown(rows, common))


if __name__ == "__main__":
    main()
