"""Score DRAEM checkpoints on MVTec-layout test sets, or find anomalies in your own images.

    python test_draem.py --checkpoint checkpoints/DRAEM_bottle_....pt --data_path ./datasets/mvtec
    python test_draem.py --checkpoint checkpoints/ --data_path ./datasets/mvtec      # every checkpoint in a folder
    python test_draem.py --checkpoint ckpt.pt --images my_photos/ --out heatmaps/ --threshold 0.5

Checkpoints: this project's .pt files, the official pair X_<category>_.pckl + X_<category>__seg.pckl (name
either), or anomalib checkpoints. Protocol (official): image score = max of the 21x21 mean-filtered
anomaly map; image AUROC / AP; pixel AUROC / AP over all test pixels pooled; AUPRO up to FPR 0.3.
"""
import argparse
import csv
import json
import math
import time
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from checkpoint import CheckpointError, model_from_checkpoint
from cli import one_line_errors, pick_device
from data_loader import (DataError, TestSet, decode, default_workers, list_images, load_images, load_test_set,
                         resolve_categories)
from metrics import auroc, average_precision, image_scores, pixel_metrics
from model_unet import DraemModel
from visualize import panel, write_png

METRICS = ["image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro"]
MASK_PROTOCOLS = {
    "standard": lambda m: m >= 128,  # bilinearly resized mask > 0.5
    "official": lambda m: m == 255,  # the official code's uint8 cast of mask / 255: only exact 255 counts
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--checkpoint", type=Path, nargs="+", required=True, help="checkpoint file(s) or folder(s) of them")
    a("--data_path", type=Path, help="folder holding <category>/test/ and <category>/ground_truth/")
    a("--obj_id", help="category to score: 0..14 or a folder name (default: the checkpoint's own)")
    a("--image_size", type=int, help="side the images are resized to (default: the checkpoint's; 256 for official "
                                     "and anomalib checkpoints)")
    a("--images", type=Path, help="an image or a folder of images to score instead of a test set (no labels)")
    a("--out", type=Path, default=Path("results"), help="output folder (default ./results)")
    a("--threshold", type=float, help="with --images: print OK or ANOMALY per image at this image score")
    a("--save_images", action="store_true", help="write a panel per test image (input, reconstruction, heatmap)")
    a("--mask_protocol", choices=sorted(MASK_PROTOCOLS), default="standard",
      help="standard: masks binarised at 0.5; official: only pixels exactly 255 after resizing (default standard)")
    a("--batch_size", type=int, default=16, help="images per forward pass (default 16)")
    a("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    a("--workers", type=int, default=0, help="threads that decode images (default: up to 8)")
    a("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


@torch.inference_mode()
def predict(model: DraemModel, images: torch.Tensor, device: torch.device, channel_order: str = "BGR",
            batch_size: int = 16, keep_reconstructions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Anomaly maps (N, H, W) float32 on device for (N, 3, H, W) uint8 BGR images; optionally reconstructions."""
    model.eval().to(device)  # fp32: the metrics must not depend on the training precision
    maps, recs = [], []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device, non_blocking=True).float() / 255
        x = x.flip(1) if channel_order == "RGB" else x
        out = model(x.contiguous(memory_format=torch.channels_last))
        maps.append(torch.softmax(out.logits.float(), dim=1)[:, 1])
        if keep_reconstructions:
            rec = out.reconstruction.float()
            recs.append((rec.flip(1) if channel_order == "RGB" else rec).cpu())
    return torch.cat(maps), (torch.cat(recs) if keep_reconstructions else None)


def evaluate(model: DraemModel, test_set: TestSet, device: torch.device, channel_order: str = "BGR",
             batch_size: int = 16, mask_protocol: str = "standard", keep_reconstructions: bool = False) -> dict:
    maps, recs = predict(model, test_set.images, device, channel_order, batch_size, keep_reconstructions)
    scores = image_scores(maps)
    labels = test_set.labels.to(device)
    masks = MASK_PROTOCOLS[mask_protocol](test_set.masks[:, 0].to(device))
    metrics = {"image_auroc": auroc(scores, labels), "image_ap": average_precision(scores, labels),
               **pixel_metrics(maps, masks)}
    return {"metrics": metrics, "scores": scores.cpu(), "maps": maps, "masks": masks, "reconstructions": recs}


def one_category(obj_id: str, data_path: Path) -> str:
    categories = resolve_categories(obj_id, data_path)
    if len(categories) != 1:
        raise DataError(f"--obj_id {obj_id}: name one category (0..14 or a folder name)")
    return categories[0]


def checkpoint_files(paths: list[Path]) -> list[Path]:
    """Expand folders; one entry per official .pckl pair."""
    files = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in (".pt", ".pth", ".ckpt", ".pckl"))
            files += [p for p in found if not p.name.endswith("_seg.pckl")]
            if not found:
                raise CheckpointError(f"--checkpoint {path}: no .pt, .pth, .ckpt or .pckl files in this folder")
        else:
            files.append(path)
    return files


def write_scores_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}"


def results_markdown(results: dict[str, dict]) -> str:
    head = "| run | category | image AUROC | image AP | pixel AUROC | pixel AP | AUPRO |\n|---|---|---|---|---|---|---|\n"
    rows = [f"| {run} | {r['category']} | " + " | ".join(percent(r[m]) for m in METRICS) + " |"
            for run, r in results.items()]
    mean = mean_metrics(results)
    rows.append("| **mean** | | " + " | ".join(f"**{percent(mean[m])}**" for m in METRICS) + " |")
    return head + "\n".join(rows) + "\n"


def mean_metrics(results: dict[str, dict]) -> dict[str, float]:
    mean = {}
    for m in METRICS:
        values = [r[m] for r in results.values() if not math.isnan(r[m])]
        mean[m] = sum(values) / len(values) if values else float("nan")
    return mean


def score_test_sets(args, device: torch.device) -> None:
    if args.data_path is None:
        raise DataError("--data_path is required to score a test set (or pass --images)")
    results, writer = {}, SummaryWriter(args.out / "tensorboard")
    for path in checkpoint_files(args.checkpoint):
        model, state = model_from_checkpoint(path)
        config = state["config"]
        category = one_category(args.obj_id, args.data_path) if args.obj_id else state.get("category")
        if not category:
            raise CheckpointError(f"{path}: the category is not recorded in the checkpoint; pass --obj_id")
        started = time.perf_counter()
        test_set = load_test_set(args.data_path, category, args.image_size or config["image_size"], args.workers or None)
        out = evaluate(model, test_set, device, config["channel_order"], args.batch_size, args.mask_protocol,
                       keep_reconstructions=args.save_images)
        run = state.get("run", path.stem)
        results[run] = {"category": category, "checkpoint": str(path), **out["metrics"],
                        "images": len(test_set.paths), "seconds": round(time.perf_counter() - started, 2)}
        print(f"{run} [{category}] " + " ".join(f"{m}={percent(out['metrics'][m])}" for m in METRICS)
              + f" ({len(test_set.paths)} images, {results[run]['seconds']} s)")
        write_scores_csv(args.out / f"scores_{run}.csv", [
            {"path": str(p), "defect_type": t, "label": int(y), "score": f"{s:.6f}"}
            for p, t, y, s in zip(test_set.paths, test_set.defect_types, test_set.labels.tolist(), out["scores"].tolist())])
        for m in METRICS:
            writer.add_scalar(f"{run}/{m}", out["metrics"][m], 0)
        writer.add_pr_curve(f"{run}/image", test_set.labels, out["scores"])
        writer.add_pr_curve(f"{run}/pixel", out["masks"].flatten().cpu(), out["maps"].flatten().cpu())
        if args.save_images:
            for i, image_path in enumerate(test_set.paths):
                picture = panel(decode(image_path), out["reconstructions"][i], out["maps"][i], out["masks"][i])
                write_png(args.out / "images" / run / test_set.defect_types[i] / f"{image_path.stem}.png", picture)
    writer.close()
    mean = mean_metrics(results)
    (args.out / "results.json").write_text(json.dumps({"runs": results, "mean": mean,
                                                       "mask_protocol": args.mask_protocol}, indent=2))
    (args.out / "results.md").write_text(results_markdown(results))
    print("mean " + " ".join(f"{m}={percent(mean[m])}" for m in METRICS))
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'} and per-image scores_*.csv"
          + (f"; panels under {args.out / 'images'}" if args.save_images else ""))


def score_images(args, device: torch.device) -> None:
    """Unlabelled images: a CSV of scores and a panel per image at its own resolution."""
    if len(args.checkpoint) != 1:
        raise CheckpointError("--images takes exactly one --checkpoint")
    model, state = model_from_checkpoint(checkpoint_files(args.checkpoint)[0])
    config = state["config"]
    if args.images.is_dir():
        paths = list_images(args.images, recursive=True)
    elif args.images.is_file():
        paths = [args.images]
    else:
        raise DataError(f"--images {args.images} does not exist")
    if not paths:
        raise DataError(f"--images {args.images} holds no images")
    images = load_images(paths, args.image_size or config["image_size"], args.workers or default_workers())
    maps, recs = predict(model, images, device, config["channel_order"], args.batch_size, keep_reconstructions=True)
    scores = image_scores(maps).tolist()
    rows = []
    for path, score, rec, amap in zip(paths, scores, recs, maps):
        relative = path.relative_to(args.images) if args.images.is_dir() else Path(path.name)
        panel_path = args.out / relative.with_suffix(".png")
        write_png(panel_path, panel(decode(path), rec, amap))
        row = {"path": str(path), "score": f"{score:.6f}", "panel": str(panel_path)}
        if args.threshold is not None:
            row["verdict"] = "ANOMALY" if score >= args.threshold else "OK"
            print(f"{row['verdict']:7} {score:.4f} {path}")
        rows.append(row)
    write_scores_csv(args.out / "scores.csv", rows)
    print(f"scored {len(rows)} image(s): {args.out / 'scores.csv'} and panels under {args.out}")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    if args.image_size is not None and (args.image_size < 32 or args.image_size % 32):
        parser.error("--image_size must be a positive multiple of 32")
    with one_line_errors(args.debug):
        device = pick_device(args.device)
        args.out.mkdir(parents=True, exist_ok=True)
        if args.images is not None:
            score_images(args, device)
        else:
            score_test_sets(args, device)


if __name__ == "__main__":
    main()
