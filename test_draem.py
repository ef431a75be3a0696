"""Score DRAEM checkpoints on MVTec-layout test sets, or find anomalies in your own images.

    python test_draem.py --checkpoint checkpoints/DRAEM_bottle_....pt --data_path ./datasets/mvtec
    python test_draem.py --checkpoint checkpoints/ --data_path ./datasets/mvtec      # every checkpoint in a folder
    python test_draem.py --checkpoint ckpt.pt --images my_photos/ --out heatmaps/ --threshold 0.5

Checkpoints: this project's .pt files, the official pair X_<category>_.pckl + X_<category>__seg.pckl (name
either), anomalib checkpoints, or .onnx files from export_draem.py (run by ONNX Runtime). Protocol
(official): image score = max of the 21x21 mean-filtered anomaly map; image AUROC / AP; pixel AUROC / AP
over all test pixels pooled; AUPRO up to FPR 0.3.
"""
import argparse
import csv
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from checkpoint import CheckpointError, model_from_checkpoint
from cli import one_line_errors, pick_device
from data_loader import (DataError, TestSet, decode, default_workers, height_width, list_images, load_test_set,
                         parse_size, read_each, resize, resolve_categories, to_tensor, warn)
from metrics import (auroc, auroc_from_counts, average_precision, average_precision_from_counts, best_f1,
                     curve_points, image_operating_points, image_scores, pixel_metrics, rank, roc_pr_counts,
                     threshold_values)
from model_unet import DraemModel
from regions import defect_regions, resize_map
from report import METRIC_NAMES, percent, write_report
from visualize import panel, write_png

METRICS = ["image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro"]
MASK_PROTOCOLS = {
    "standard": lambda m: m >= 128,  # bilinearly resized mask > 0.5
    "official": lambda m: m == 255,  # the official code's uint8 cast of mask / 255: only exact 255 counts
}


def threshold_value(text: str) -> str | float:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a number, not {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--checkpoint", type=Path, nargs="+", required=True, help="checkpoint file(s) or folder(s) of them")
    a("--data_path", type=Path, help="folder holding <category>/test/ and <category>/ground_truth/")
    a("--obj_id", help="category to score: 0..14 or a folder name (default: the checkpoint's own)")
    a("--image_size", type=parse_size, help="N or HxW the images are resized to (default: the checkpoint's; 256 for official "
                                     "and anomalib checkpoints)")
    a("--images", type=Path, help="an image or a folder of images to score instead of a test set (no labels)")
    a("--out", type=Path, default=Path("results"), help="output folder (default ./results)")
    a("--threshold", type=threshold_value,
      help="with --images: image score at or above which an image is ANOMALY; auto = the checkpoint's max-F1 "
           "threshold (default: auto when the checkpoint holds one)")
    a("--pixel_threshold", type=threshold_value,
      help="with --images: anomaly-map value at or above which a pixel is defective (defect masks and regions); "
           "auto = the checkpoint's max-F1 pixel threshold (default: auto when the checkpoint holds one)")
    a("--save_images", action=argparse.BooleanOptionalAction, default=True,
      help="write a labelled panel per image: input, reconstruction, heatmap (default on; --no-save_images skips "
           "them, and the report then shows no pictures)")
    a("--mask_protocol", choices=sorted(MASK_PROTOCOLS), default="standard",
      help="standard: masks binarised at 0.5; official: only pixels exactly 255 after resizing (default standard)")
    a("--batch_size", type=int, default=16, help="images per forward pass, and per chunk with --images (default 16)")
    a("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    a("--workers", type=int, default=0, help="threads that decode images (default: up to 8)")
    a("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def out_of_memory(exc: BaseException) -> bool:
    """True for an allocation failure of the device (CUDA) or of the host (a CPU RuntimeError)."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "can't allocate memory" in str(exc)


def predict(model: DraemModel, images: torch.Tensor, device: torch.device, channel_order: str = "BGR",
            batch_size: int = 16, keep_reconstructions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Anomaly maps (N, H, W) float32 on device for (N, 3, H, W) uint8 BGR images; optionally reconstructions.

    When a batch does not fit in memory (large images), the batch size is halved until it does, with a
    note; an image that does not fit alone is a one-line error.
    """
    while True:
        try:
            return predict_batches(model, images, device, channel_order, batch_size, keep_reconstructions)
        except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is one
            if not out_of_memory(exc):
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            height, width = images.shape[-2:]
            if batch_size == 1:
                raise DataError(f"one {height}x{width} image does not fit in the memory of {device} even at batch "
                                f"size 1: use a smaller --image_size or another --device")
            batch_size //= 2
            warn(f"{height}x{width} images do not fit in the memory of {device} at this batch size: "
                 f"retrying with --batch_size {batch_size}")


@torch.inference_mode()
def predict_batches(model: DraemModel, images: torch.Tensor, device: torch.device, channel_order: str,
                    batch_size: int, keep_reconstructions: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    model.eval().to(device)  # fp32: the metrics must not depend on the training precision
    maps, recs = [], []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device, non_blocking=True).float() / 255
        x = x.flip(1) if channel_order == "RGB" else x
        out = model(x.contiguous(memory_format=torch.channels_last))
        maps.append(out.anomaly_map)
        if keep_reconstructions:
            rec = out.reconstruction.float()
            recs.append((rec.flip(1) if channel_order == "RGB" else rec).cpu())
    return torch.cat(maps), (torch.cat(recs) if keep_reconstructions else None)


def evaluate(model: DraemModel, test_set: TestSet, device: torch.device, channel_order: str = "BGR",
             batch_size: int = 16, mask_protocol: str = "standard", keep_reconstructions: bool = False) -> dict:
    """Metrics, operating points, per-defect-type rows and curves; one sort for the images, one for the pixels."""
    maps, recs = predict(model, test_set.images, device, channel_order, batch_size, keep_reconstructions)
    scores = image_scores(maps)
    labels = test_set.labels.to(device)
    masks = MASK_PROTOCOLS[mask_protocol](test_set.masks[:, 0].to(device))
    image_ranking, pixel_ranking = rank(scores), rank(maps)
    image_counts, pixel_counts = roc_pr_counts(image_ranking, labels), roc_pr_counts(pixel_ranking, masks)
    image_points = image_operating_points(scores, labels, image_ranking)
    pixel_point = best_f1(*pixel_counts, threshold_values(pixel_ranking, maps))
    metrics = {"image_auroc": auroc_from_counts(*image_counts), "image_ap": average_precision_from_counts(*image_counts),
               "image_f1_max": image_points["f1"],
               **pixel_metrics(maps, masks, ranking=pixel_ranking, counts=pixel_counts),
               "pixel_f1_max": pixel_point["f1"]}
    return {"metrics": {m: metrics[m] for m in METRICS},
            "operating_points": {"image": image_points, "pixel": pixel_point},
            "per_defect_type": per_defect_type(scores, maps, labels, masks, test_set.defect_types),
            "curves": {"image": curve_points(*image_counts), "pixel": curve_points(*pixel_counts)},
            "scores": scores.cpu(), "maps": maps, "masks": masks, "reconstructions": recs}


def per_defect_type(scores: torch.Tensor, maps: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
                    defect_types: list[str]) -> dict[str, dict]:
    """Each defect type against the good images: its image AUROC and its pixel AP (its images' and the good
    images' pixels pooled)."""
    types = np.array(defect_types)
    rows = {}
    for defect in sorted(set(defect_types) - {"good"}):
        keep = torch.from_numpy((types == defect) | (types == "good")).to(scores.device)
        rows[defect] = {"images": int((types == defect).sum()), "image_auroc": auroc(scores[keep], labels[keep]),
                        "pixel_ap": average_precision(maps[keep], masks[keep])}
    return rows


def one_category(obj_id: str, data_path: Path) -> str:
    categories = resolve_categories(obj_id, data_path)
    if len(categories) != 1:
        raise DataError(f"--obj_id {obj_id}: name one category (0..14 or a folder name)")
    return categories[0]


def load_model(path: Path, device: torch.device, image_size: tuple[int, int] | None) -> tuple[DraemModel, dict]:
    """A PyTorch checkpoint of any supported kind, or an ONNX file from export_draem.py (run by ONNX Runtime)."""
    if path.suffix != ".onnx":
        return model_from_checkpoint(path)
    from export_draem import load_onnx  # ONNX Runtime only when an .onnx file is asked for
    model, state = load_onnx(path, device)
    if image_size and tuple(image_size) != model.size:
        raise CheckpointError(f"--image_size {image_size[0]}x{image_size[1]}: {path} was exported for "
                              f"{model.size[0]}x{model.size[1]} images; export again with that --image_size")
    return model, state


def checkpoint_files(paths: list[Path]) -> list[Path]:
    """Expand folders; one entry per official .pckl pair."""
    files = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in (".pt", ".pth", ".ckpt", ".pckl", ".onnx"))
            files += [p for p in found if not p.name.endswith("_seg.pckl")]
            if not found:
                raise CheckpointError(f"--checkpoint {path}: no .pt, .pth, .ckpt, .pckl or .onnx files in this folder")
        else:
            files.append(path)
    return files


def write_scores_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def mean_metrics(results: dict[str, dict]) -> dict[str, float]:
    mean = {}
    for m in METRICS:
        values = [r[m] for r in results.values() if not math.isnan(r[m])]
        mean[m] = sum(values) / len(values) if values else float("nan")
    return mean


def seed_summary(results: dict[str, dict]) -> list[dict]:
    """Mean and sample standard deviation of each metric over runs that differ only in --seed (2 or more)."""
    groups: dict[str, list[str]] = {}
    for run, r in results.items():
        if "seed" in r["config"]:  # this project's checkpoints; official and anomalib ones record no seed
            groups.setdefault(json.dumps({k: v for k, v in r["config"].items() if k != "seed"}, sort_keys=True),
                              []).append(run)
    rows = []
    for runs in (runs for runs in groups.values() if len(runs) > 1):
        row = {"category": results[runs[0]]["category"], "runs": runs,
               "seeds": [results[run]["config"]["seed"] for run in runs]}
        for m in METRICS:
            values = [results[run][m] for run in runs if not math.isnan(results[run][m])]
            row[m] = ({"mean": statistics.fmean(values), "std": statistics.stdev(values)} if len(values) > 1
                      else {"mean": float("nan"), "std": float("nan")})
        rows.append(row)
    return rows


def results_markdown(results: dict[str, dict], seeds: list[dict]) -> str:
    names = [METRIC_NAMES[m] for m in METRICS]
    lines = ["| run | category | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    lines += [f"| {run} | {r['category']} | " + " | ".join(percent(r[m]) for m in METRICS) + " |"
              for run, r in results.items()]
    mean = mean_metrics(results)
    lines.append("| **mean** | | " + " | ".join(f"**{percent(mean[m])}**" for m in METRICS) + " |")
    if seeds:
        lines += ["", "Runs that differ only in --seed: mean ± sample standard deviation.", "",
                  "| category | seeds | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        lines += [f"| {row['category']} | {', '.join(map(str, row['seeds']))} | "
                  + " | ".join(f"{percent(row[m]['mean'])} ± {percent(row[m]['std'])}" for m in METRICS) + " |"
                  for row in seeds]
    lines += ["", "Operating points (image: anomalous when score >= threshold; rates on this test set).", "",
              "| run | max-F1 threshold | precision | recall | no-escape threshold | false alarms | "
              "no-false-alarm threshold | escapes | pixel max-F1 threshold |", "|---|---|---|---|---|---|---|---|---|"]
    for run, r in results.items():
        image, pixel = r["operating_points"]["image"], r["operating_points"]["pixel"]
        lines.append(f"| {run} | {image['threshold']:.6g} | {percent(image['precision'])} | {percent(image['recall'])} | "
                     f"{image['threshold_no_escape']:.6g} | {percent(image['false_alarm_rate'])} | "
                     f"{image['threshold_no_false_alarm']:.6g} | {percent(image['escape_rate'])} | "
                     f"{pixel['threshold']:.6g} |")
    lines += ["", "Per defect type (each against the good images).", "",
              "| run | defect type | images | image AUROC | pixel AP |", "|---|---|---|---|---|"]
    lines += [f"| {run} | {defect} | {row['images']} | {percent(row['image_auroc'])} | {percent(row['pixel_ap'])} |"
              for run, r in results.items() for defect, row in r["per_defect_type"].items()]
    return "\n".join(lines) + "\n"


def verdict(score: float, threshold: float | None) -> str:
    return "" if threshold is None or math.isnan(threshold) else ("ANOMALY" if score >= threshold else "OK")


def test_cases(test_set: TestSet, scores: list[float], threshold: float, run: str, panels: bool) -> list[dict]:
    """One row per test image for the CSV and the report: its label, score, verdict and whether it is an error."""
    cases = []
    for path, defect, label, score in zip(test_set.paths, test_set.defect_types, test_set.labels.tolist(), scores):
        decision = verdict(score, threshold)
        error = ("missed defect" if label and decision == "OK" else "false alarm" if not label and decision == "ANOMALY"
                 else "")
        cases.append({"path": str(path), "defect_type": defect, "label": label, "score": score, "verdict": decision,
                      "error": error, "panel": f"images/{run}/{defect}/{path.stem}.png" if panels else ""})
    return cases


def log_to_tensorboard(writer: SummaryWriter, run: str, out: dict, labels: torch.Tensor) -> None:
    for m in METRICS:
        writer.add_scalar(f"{run}/{m}", out["metrics"][m], 0)
    writer.add_pr_curve(f"{run}/image", labels, out["scores"])
    writer.add_pr_curve(f"{run}/pixel", out["masks"].flatten().cpu(), out["maps"].flatten().cpu())


def write_test_panels(out_dir: Path, test_set: TestSet, out: dict, cases: list[dict], threshold: float) -> None:
    for i, case in enumerate(cases):
        caption = (f"{case['defect_type']} | score {case['score']:.3f} | {case['verdict']} at max-F1 threshold "
                   f"{threshold:.3f}" + (f" | {case['error'].upper()}" if case["error"] else ""))
        picture = panel(decode(test_set.paths[i]), out["reconstructions"][i], out["maps"][i], out["masks"][i], caption)
        write_png(out_dir / case["panel"], picture)


def score_test_sets(args, device: torch.device) -> None:
    if args.data_path is None:
        raise DataError("--data_path is required to score a test set (or pass --images)")
    results, details, writer = {}, {}, SummaryWriter(args.out / "tensorboard")
    for path in checkpoint_files(args.checkpoint):
        model, state = load_model(path, device, args.image_size)
        config = state["config"]
        category = one_category(args.obj_id, args.data_path) if args.obj_id else state.get("category")
        if not category:
            raise CheckpointError(f"{path}: the category is not recorded in the checkpoint; pass --obj_id")
        started = time.perf_counter()
        test_set = load_test_set(args.data_path, category, args.image_size or height_width(config["image_size"]),
                                 args.workers or None)
        out = evaluate(model, test_set, device, config["channel_order"], args.batch_size, args.mask_protocol,
                       keep_reconstructions=args.save_images)
        run = state.get("run", path.stem)
        threshold = out["operating_points"]["image"]["threshold"]
        cases = test_cases(test_set, out["scores"].tolist(), threshold, run, args.save_images)
        results[run] = {"category": category, "checkpoint": str(path), **out["metrics"],
                        "operating_points": out["operating_points"], "per_defect_type": out["per_defect_type"],
                        "config": config, "images": len(test_set.paths),
                        "seconds": round(time.perf_counter() - started, 2)}
        print(f"{run} [{category}] " + " ".join(f"{m}={percent(out['metrics'][m])}" for m in METRICS)
              + f" ({len(test_set.paths)} images, {results[run]['seconds']} s)")
        write_scores_csv(args.out / f"scores_{run}.csv", [
            {"path": c["path"], "defect_type": c["defect_type"], "label": c["label"], "score": f"{c['score']:.9g}",
             "verdict": c["verdict"]} for c in cases])
        log_to_tensorboard(writer, run, out, test_set.labels)
        if args.save_images:
            write_test_panels(args.out, test_set, out, cases, threshold)
        details[run] = {"curves": out["curves"], "cases": cases}
    writer.close()
    mean, seeds = mean_metrics(results), seed_summary(results)
    (args.out / "results.json").write_text(json.dumps({"runs": results, "mean": mean, "seeds": seeds,
                                                       "mask_protocol": args.mask_protocol}, indent=2))
    (args.out / "results.md").write_text(results_markdown(results, seeds))
    write_report(args.out, results, details, seeds)
    print("mean " + " ".join(f"{m}={percent(mean[m])}" for m in METRICS))
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}, {args.out / 'report.html'} and per-image "
          f"scores_*.csv" + (f"; panels under {args.out / 'images'}" if args.save_images else ""))


def stored_threshold(state: dict, kind: str) -> float | None:
    """The max-F1 threshold ("image" or "pixel") the checkpoint's end-of-training evaluation stored, if any."""
    value = state.get("metrics", {}).get("operating_points", {}).get(kind, {}).get("threshold")
    return None if value is None or math.isnan(value) else value


def chosen_threshold(value: str | float | None, state: dict, kind: str, flag: str, path: Path) -> float | None:
    """A number as given; auto (and the default) from the checkpoint; auto without a stored one is an error."""
    if value is not None and value != "auto":
        return value
    stored = stored_threshold(state, kind)
    if value == "auto" and stored is None:
        raise CheckpointError(f"{flag} auto: {path} holds no {kind} threshold (it is stored when training scores a "
                              f"labelled test set); score a labelled test set first and pass its threshold from "
                              f"results.json, or give a number")
    return stored


def output_stem(args, path: Path) -> Path:
    return path.relative_to(args.images).with_suffix("") if args.images.is_dir() else Path(path.stem)


def score_images(args, device: torch.device) -> None:
    """Unlabelled images, streamed in chunks of --batch_size: scores.csv and regions.csv grow as it goes;
    per image a labelled panel and, with a pixel threshold, a defect mask, at the image's own resolution."""
    if len(args.checkpoint) != 1:
        raise CheckpointError("--images takes exactly one --checkpoint")
    path = checkpoint_files(args.checkpoint)[0]
    model, state = load_model(path, device, args.image_size)
    config = state["config"]
    image_threshold = chosen_threshold(args.threshold, state, "image", "--threshold", path)
    pixel_threshold = chosen_threshold(args.pixel_threshold, state, "pixel", "--pixel_threshold", path)
    if args.images.is_dir():
        paths = list_images(args.images, recursive=True)
    elif args.images.is_file():
        paths = [args.images]
    else:
        raise DataError(f"--images {args.images} does not exist")
    if not paths:
        raise DataError(f"--images {args.images} holds no images")
    print(f"image threshold: {'none (scores only; --threshold)' if image_threshold is None else image_threshold}; "
          f"pixel threshold: {'none (no masks; --pixel_threshold)' if pixel_threshold is None else pixel_threshold}")
    size, workers = args.image_size or height_width(config["image_size"]), args.workers or default_workers()
    scored, errors, started = 0, [], time.perf_counter()
    with open(args.out / "scores.csv", "w", newline="") as scores_file, \
            open(args.out / "regions.csv", "w", newline="") as regions_file, \
            tqdm(total=len(paths), unit="img", disable=not sys.stderr.isatty()) as bar:
        scores_csv = csv.DictWriter(scores_file, ["path", "score", "verdict", "regions", "panel", "mask", "error"])
        regions_csv = csv.DictWriter(regions_file, ["path", "region", "x", "y", "width", "height", "area",
                                                    "max_score", "mean_score"])
        scores_csv.writeheader()
        regions_csv.writeheader()
        for start in range(0, len(paths), args.batch_size):
            chunk = paths[start:start + args.batch_size]
            decoded = read_each(lambda p, _: decode(p), chunk, 0, workers)
            for image_path, error in ((p, d) for p, d in zip(chunk, decoded) if isinstance(d, str)):
                warn(f"skipped: {error}")
                errors.append(error)
                scores_csv.writerow({"path": str(image_path), "error": error})
            readable = [(p, d) for p, d in zip(chunk, decoded) if not isinstance(d, str)]
            if readable:
                batch = to_tensor([resize(image, size) for _, image in readable])
                maps, recs = predict(model, batch, device, config["channel_order"], len(batch), keep_reconstructions=True)
                for (image_path, image), score, rec, amap in zip(readable, image_scores(maps).tolist(), recs, maps):
                    row, regions = image_outputs(args, image_path, image, rec, amap, score, image_threshold, pixel_threshold)
                    scores_csv.writerow(row)
                    regions_csv.writerows(regions)
                    if row["verdict"]:
                        tqdm.write(f"{row['verdict']:7} {score:.4f} {image_path}", file=sys.stdout)
                scored += len(readable)
            scores_file.flush()
            regions_file.flush()
            bar.update(len(chunk))
    if scored == 0:
        raise DataError(f"--images {args.images}: none of the {len(paths)} image(s) could be read ({errors[0]})")
    seconds = time.perf_counter() - started
    print(f"scored {scored} image(s) in {seconds:.1f} s ({scored / seconds:.1f} images/s)"
          + (f", skipped {len(errors)} unreadable" if errors else "")
          + f": {args.out / 'scores.csv'}, {args.out / 'regions.csv'}, panels and masks under {args.out}")


def image_outputs(args, image_path: Path, image: np.ndarray, rec: torch.Tensor, amap: torch.Tensor, score: float,
                  image_threshold: float | None, pixel_threshold: float | None) -> tuple[dict, list[dict]]:
    """Write one image's panel and defect mask; return its scores.csv row and regions.csv rows."""
    stem = output_stem(args, image_path)
    height, width = image.shape[:2]
    big_map = resize_map(amap.cpu().numpy(), height, width)
    decision = verdict(score, image_threshold)
    row = {"path": str(image_path), "score": f"{score:.9g}", "verdict": decision, "regions": "", "panel": "",
           "mask": "", "error": ""}
    mask, regions = (None, [])
    if pixel_threshold is not None:
        mask, regions = defect_regions(big_map, pixel_threshold)
        row["mask"], row["regions"] = str(args.out / f"{stem}_mask.png"), len(regions)
        write_png(args.out / f"{stem}_mask.png", mask)
    if args.save_images:
        caption = f"score {score:.3f}" + (f" | {decision} at threshold {image_threshold:.3f}" if decision else "") + (
            f" | {len(regions)} region(s)" if pixel_threshold is not None else "")
        row["panel"] = str(args.out / f"{stem}.png")
        write_png(args.out / f"{stem}.png", panel(image, rec, big_map, caption=caption, defect_mask=mask))
    return row, [{"path": str(image_path), "region": i + 1, **{k: f"{v:.6f}" if isinstance(v, float) else v
                                                                for k, v in region.items()}}
                 for i, region in enumerate(regions)]


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    with one_line_errors(args.debug):
        device = pick_device(args.device)
        args.out.mkdir(parents=True, exist_ok=True)
        if args.images is not None:
            score_images(args, device)
        else:
            score_test_sets(args, device)


if __name__ == "__main__":
    main()
