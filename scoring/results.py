"""Scoring checkpoints on labelled test sets and writing the results folder.

Per run: scores_<run>.csv (every test image's score and verdict), a labelled panel per image, TensorBoard
scalars and PR curves; for all runs together: results.json, results.md and report.html, with the
per-configuration means and seed summaries.

A configuration is a run's settings (training/settings.py); the means average the categories of one
configuration, never different variants, and a seed summary takes the runs of one category and
configuration that differ only in --seed. Official and anomalib weights record no seed: each kind is a
configuration of its own and takes no part in seed summaries.
"""
import csv
import json
import math
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from data_loader import DataError, TestSet, category_layout, decode, height_width, load_test_set, one_category
from scoring import thresholds
from scoring.detector import Scoring, images_per_pass, resize_map, scoring_model, validation_maps
from scoring.evaluate import measure, predict
from scoring.map_files import write_test_maps
from scoring.metrics import METRICS, percent, verdict
from scoring.model_files import checkpoint_files
from scoring.protocols import BENCHMARK_NAMES, PROTOCOLS, protocol_for, protocol_metrics
from scoring.report import coverage_text, write_report
from scoring.tiling import check_tiling
from scoring.visualize import panel, write_png
from training.checkpoint import CheckpointError
from training.settings import variant


# ---- runs grouped by what they are: means per configuration, seed summaries ---------------------------

def configuration(result: dict, leave_out: tuple[str, ...]) -> str:
    """A label equal for two runs exactly when their settings agree apart from leave_out."""
    config = result["config"]
    if "seed" in config:
        return variant(config, leave_out)
    h, w = height_width(config["image_size"])
    label = f"{result['source']}_{h}x{w}_w{config['base_width']}-{config['seg_base_width']}"
    return label + ("_sspcab" if config["sspcab"] else "")


def mean_std(values: list[float]) -> dict[str, float]:
    values = [v for v in values if not math.isnan(v)]
    return {"mean": statistics.fmean(values) if values else float("nan"),
            "std": statistics.stdev(values) if len(values) > 1 else float("nan")}


def data_set_name(data_path: Path) -> str:
    """A data set is named by its folder: datasets/visa is "visa"."""
    return Path(data_path).resolve().name


def configuration_means(results: dict[str, dict]) -> list[dict]:
    """Per data set and configuration: the mean of each metric over its runs (its categories; every seed counts
    as a run)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for run, result in results.items():
        groups.setdefault((result.get("data_set", ""), configuration(result, ("category",))), []).append(run)
    return [{"data_set": data_set, "configuration": label, "runs": runs,
             "categories": sorted({results[r]["category"] for r in runs}),
             **{m: mean_std([results[r][m] for r in runs])["mean"] for m in METRICS},
             "protocol_metrics": protocol_means([results[r] for r in runs])}
            for (data_set, label), runs in groups.items()]


def protocol_means(runs: list[dict]) -> dict[str, float]:
    """The mean over runs (the categories of one configuration) of each benchmark column they report."""
    keys = dict.fromkeys(k for r in runs for k in r.get("protocol_metrics", {}))
    return {k: mean_std([r["protocol_metrics"][k] for r in runs if k in r.get("protocol_metrics", {})])["mean"]
            for k in keys}


def seed_summaries(results: dict[str, dict]) -> list[dict]:
    """Mean and sample standard deviation of each metric over runs that differ only in --seed (2 or more)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for run, result in results.items():
        if "seed" in result["config"]:
            groups.setdefault((result.get("data_set", ""), configuration(result, ("seed",))), []).append(run)
    return [{"category": results[runs[0]]["category"], "configuration": label, "runs": runs,
             "seeds": [results[r]["config"]["seed"] for r in runs],
             **{m: mean_std([results[r][m] for r in runs]) for m in METRICS}}
            for (_, label), runs in groups.items() if len(runs) > 1]


# ---- scoring test sets ----------------------------------------------------------------------------------

def write_scores_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def results_markdown(results: dict[str, dict], means: list[dict], seeds: list[dict]) -> str:
    names = list(METRICS.values())
    lines = []
    for data_set in sorted({r["data_set"] for r in results.values()}):
        lines += [f"## DRAEM on {data_set}", "", "| run | category | " + " | ".join(names) + " | defect images with masks |",
                  "|---|---|" + "---|" * (len(names) + 1)]
        lines += [f"| {run} | {r['category']} | " + " | ".join(percent(r[m]) for m in METRICS)
                  + f" | {coverage_text(r['mask_coverage'])} |" for run, r in results.items() if r["data_set"] == data_set]
        lines += [""] + [f"{run}: {r['left_out_text']} (the files are listed in results.json)"
                         for run, r in results.items() if r["data_set"] == data_set and r.get("left_out")]
        lines += ["", f"Mean per configuration on {data_set} (runs whose settings differ only in the category).", "",
                  "| configuration | runs | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        lines += [f"| {row['configuration']} | {len(row['runs'])} | " + " | ".join(percent(row[m]) for m in METRICS)
                  + " |" for row in means if row["data_set"] == data_set]
        lines += protocol_tables(data_set, results, means)
        lines.append("")
    lines.append("## Every run")
    if seeds:
        lines += ["", "Runs that differ only in --seed: mean ± sample standard deviation.", "",
                  "| category | configuration | seeds | " + " | ".join(names) + " |",
                  "|---|---|---|" + "---|" * len(names)]
        lines += [f"| {row['category']} | {row['configuration']} | {', '.join(map(str, row['seeds']))} | "
                  + " | ".join(f"{percent(row[m]['mean'])} ± {percent(row[m]['std'])}" for m in METRICS) + " |"
                  for row in seeds]
    lines += ["", "Thresholds the verdicts, missed defects, false alarms and defect masks were judged at.", "",
              "| run | image threshold | from | pixel threshold | from |", "|---|---|---|---|---|"]
    lines += [f"| {run} | " + " | ".join(threshold_cells(r["thresholds"][kind]) for kind in ("image", "pixel")) + " |"
              for run, r in results.items()]
    lines += ["", "Operating points (image: anomalous when score >= threshold; rates on this test set).", "",
              "| run | max-F1 threshold | precision | recall | no-escape threshold | false alarms | "
              "no-false-alarm threshold | escapes | pixel max-F1 threshold |", "|---|---|---|---|---|---|---|---|---|"]
    for run, r in results.items():
        image, pixel = r["operating_points"]["image"], r["operating_points"]["pixel"]
        lines.append(f"| {run} | {image['threshold']:.6g} | {percent(image['precision'])} | {percent(image['recall'])} | "
                     f"{image['threshold_no_escape']:.6g} | {percent(image['false_alarm_rate'])} | "
                     f"{image['threshold_no_false_alarm']:.6g} | {percent(image['escape_rate'])} | "
                     f"{pixel['threshold']:.6g} |")
    lines += ["", "Per defect type (each against the good images; pixel AP over its images that have masks).", "",
              "| run | defect type | images | with masks | image AUROC | pixel AP |", "|---|---|---|---|---|---|"]
    lines += [f"| {run} | {defect} | {row['images']} | {row['images_with_mask']} | {percent(row['image_auroc'])} | "
              f"{percent(row['pixel_ap'])} |" for run, r in results.items() for defect, row in r["per_defect_type"].items()]
    return "\n".join(lines) + "\n"


def protocol_tables(data_set: str, results: dict[str, dict], means: list[dict]) -> list[str]:
    """Per benchmark protocol of this data set's runs: its own columns, named as its authors name them, per run
    and as the mean per configuration."""
    lines = []
    for protocol in sorted({r.get("protocol", "mvtec_ad") for r in results.values() if r["data_set"] == data_set}):
        columns = PROTOCOLS[protocol]
        if not columns:
            continue
        runs = {run: r for run, r in results.items() if r["data_set"] == data_set and r.get("protocol") == protocol}
        lines += ["", f"{BENCHMARK_NAMES[protocol]}: the benchmark's own metrics (--protocol {protocol}; "
                      f"docs/evaluation.md#benchmark-protocols).", "",
                  "| run | category | " + " | ".join(columns.values()) + " |", "|---|---|" + "---|" * len(columns)]
        lines += [f"| {run} | {r['category']} | " + " | ".join(percent(r["protocol_metrics"].get(m)) for m in columns)
                  + " |" for run, r in runs.items()]
        lines += [f"| mean of {row['configuration']} | {len(row['runs'])} categor{'y' if len(row['runs']) == 1 else 'ies'} | "
                  + " | ".join(percent(row["protocol_metrics"].get(m)) for m in columns) + " |"
                  for row in means if row["data_set"] == data_set and set(row["runs"]) <= set(runs)]
    return lines


def threshold_cells(threshold: dict) -> str:
    value = "none" if threshold["value"] is None else f"{threshold['value']:.6g}"
    return f"{value} | {threshold['source']}" + (" (optimistic: tuned on this test set)" if threshold["optimistic"] else "")


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


def write_test_panels(out_dir: Path, test_set: TestSet, out: dict, cases: list[dict], image_threshold: thresholds.Threshold,
                      pixel_threshold: thresholds.Threshold, bit_depth: int) -> None:
    """A labelled panel per test image: the verdict at the image threshold, the defect mask at the pixel threshold
    (white) and the ground truth (green)."""
    for i, case in enumerate(cases):
        original = decode(test_set.paths[i], bit_depth)
        big_map = resize_map(out["maps"][i].cpu().numpy(), *original.shape[:2])
        defects = None if pixel_threshold.value is None else (big_map >= pixel_threshold.value).astype(np.uint8)
        at = "no image threshold" if image_threshold.value is None else \
            f"{case['verdict']} at threshold {image_threshold.value:.3f}"
        caption = (f"{case['defect_type']} | score {case['score']:.3f} | {at}"
                   + (f" | {case['error'].upper()}" if case["error"] else "")
                   + ("" if test_set.has_mask[i] else " | no mask"))
        picture = panel(original, out["reconstructions"][i], big_map, out["masks"][i], caption, defect_mask=defects)
        write_png(out_dir / case["panel"], picture)


def unique_name(name: str, taken: dict) -> str:
    """name, or name~2, name~3 ... when two checkpoint files share a name (in different folders)."""
    if name not in taken:
        return name
    suffix = 2
    while f"{name}~{suffix}" in taken:
        suffix += 1
    return f"{name}~{suffix}"


def score_test_sets(checkpoints: list[Path], data_path: Path | None, out_dir: Path, device: torch.device,
                    obj_id: str | None = None, scoring: Scoring = Scoring()) -> dict:
    """Score every checkpoint (files or folders of them) on its category's test set; write the results folder.
    Verdicts, missed defects and false alarms are judged at the threshold chosen by thresholds.choose.

    Without data_path, each checkpoint is scored on the data set its training recorded. Of several checkpoints,
    one that cannot be scored (a damaged file, no test set for its category) is skipped with one line naming it;
    whatever stops the loop, the runs scored so far are written. results.md groups the runs by data set.

    Returns what results.json holds: {"runs", "means", "seeds", "mask_protocol", "skipped"}.
    """
    files = checkpoint_files(checkpoints)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, details, skipped = {}, {}, {}
    summary = None
    try:
        for path in files:
            try:
                run, results[run], details[run] = score_run(path, data_path, obj_id, device, scoring, out_dir, results)
            except (DataError, CheckpointError) as exc:
                if len(files) == 1:
                    raise
                skipped[str(path)] = str(exc)
                print(f"skipped {path}: {exc}", file=sys.stderr)
    finally:
        if results:
            summary = write_summary(out_dir, results, details, scoring.mask_protocol, skipped, scoring.save_images)
    if summary is None:
        raise DataError(f"none of the {len(files)} checkpoints could be scored: " + "; ".join(
            f"{Path(p).name}: {why}" for p, why in skipped.items())[:600])
    return summary


def score_run(path: Path, data_path: Path, obj_id: str | None, device: torch.device, scoring: Scoring, out_dir: Path,
              taken: dict) -> tuple[str, dict, dict]:
    """One checkpoint on its category's test set: its name in the results (not one of taken), its row, and its
    curves and cases; its CSV, TensorBoard scalars and panels written under out_dir."""
    given = {"image": scoring.threshold, "pixel": scoring.pixel_threshold}
    model, info = scoring_model(path, device, scoring)
    data_path = data_path or info.config.get("data_path")
    if not data_path:
        raise DataError(f"{path} records no data set: pass --data_path (the folder holding <category>/test/)")
    category = one_category(obj_id, data_path) if obj_id else info.category
    if not category:
        raise CheckpointError(f"{path}: the category is not recorded in the checkpoint; pass --obj_id")
    for kind in given:
        if given[kind] == "calibrated":  # decided by the file alone: fail before the evaluation, not after it
            thresholds.choose(given[kind], info, kind)
    started = time.perf_counter()
    test_set = load_test_set(data_path, category, scoring.size_for(info), scoring.workers, scoring.depth_for(info),
                             info.trained_digests)
    if scoring.tile:
        check_tiling(*test_set.images.shape[-2:], scoring.tile, scoring.tile_overlap, "the test images")
    maps, reconstructions = predict(model, test_set.images, device, info.channel_order, images_per_pass(scoring),
                                    scoring.save_images, scoring.amp)
    out = measure(maps, test_set, scoring.mask_protocol) | {"reconstructions": reconstructions}
    protocol = protocol_for(data_set_name(data_path), scoring.protocol)
    validation = validation_maps(model, info, category_layout(data_path, category).validation, device, scoring) \
        if protocol == "mvtec_ad2" else None
    columns = protocol_metrics(protocol, out["maps"], out["masks"], test_set, out["metrics"], validation)
    run = unique_name(info.run, taken)
    image_t, pixel_t = (thresholds.choose(given[kind], info, kind, out["operating_points"][kind]["threshold"])
                        for kind in ("image", "pixel"))
    cases = test_cases(test_set, out["scores"].tolist(), image_t.value, run, scoring.save_images)
    result = {"data_set": data_set_name(data_path), "category": category, "checkpoint": str(path),
              "source": info.source, **out["metrics"],
              "thresholds": {"image": asdict(image_t), "pixel": asdict(pixel_t)},
              "operating_points": out["operating_points"], "per_defect_type": out["per_defect_type"],
              "mask_coverage": out["mask_coverage"], "config": info.config, "images": len(test_set.paths),
              "left_out": [str(p) for p in test_set.left_out], "left_out_text": test_set.left_out_text(),
              "protocol": protocol, "protocol_metrics": columns,
              "seconds": round(time.perf_counter() - started, 2)}
    print(f"{run} [{category}] " + " ".join(f"{m}={percent(out['metrics'][m])}" for m in METRICS)
          + f" ({len(test_set.paths)} images, masks for {coverage_text(out['mask_coverage'])} defect images, "
            f"{result['seconds']} s)\n  " + (f"{test_set.left_out_text()}\n  " if test_set.left_out else "")
          + thresholds.describe(image_t, info, "image") + "\n  "
          + thresholds.describe(pixel_t, info, "pixel")
          + (f"\n  {protocol}: " + " ".join(f"{PROTOCOLS[protocol][m]}={percent(v)}" for m, v in columns.items())
             if columns else ""))
    if scoring.tiff_maps:
        count = write_test_maps(out["maps"], test_set.paths, test_set.defect_types, scoring.tiff_maps, category,
                                scoring.depth_for(info))
        print(f"  {count} anomaly maps (float32 TIFF, each image's size) under {scoring.tiff_maps / category}")
    write_scores_csv(out_dir / f"scores_{run}.csv", [
        {"path": c["path"], "defect_type": c["defect_type"], "label": c["label"], "score": f"{c['score']:.9g}",
         "verdict": c["verdict"]} for c in cases])
    with SummaryWriter(out_dir / "tensorboard", filename_suffix=f".{run}") as writer:  # one events file per run
        log_to_tensorboard(writer, run, out, test_set.labels)
    if scoring.save_images:
        write_test_panels(out_dir, test_set, out, cases, image_t, pixel_t, scoring.depth_for(info))
    return run, result, {"curves": out["curves"], "cases": cases}


def write_summary(out_dir: Path, results: dict, details: dict, mask_protocol: str, skipped: dict,
                  save_images: bool) -> dict:
    """results.json, results.md and report.html for the runs scored; the means and seed summaries printed."""
    summary = {"runs": results, "means": configuration_means(results), "seeds": seed_summaries(results),
               "mask_protocol": mask_protocol, "skipped": skipped}
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "results.md").write_text(results_markdown(results, summary["means"], summary["seeds"]))
    write_report(out_dir, results, details, summary["means"], summary["seeds"])
    for row in summary["means"]:
        print(f"mean of {row['configuration']} on {row['data_set']} ({len(row['runs'])} run(s)) "
              + " ".join(f"{m}={percent(row[m])}" for m in METRICS))
    for row in summary["seeds"]:
        print(f"seeds {', '.join(map(str, row['seeds']))} of {row['configuration']}: "
              + " ".join(f"{m}={percent(row[m]['mean'])}±{percent(row[m]['std'])}" for m in METRICS))
    print(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.md'}, {out_dir / 'report.html'} and per-image "
          f"scores_*.csv" + (f"; panels under {out_dir / 'images'}" if save_images else "")
          + (f"; {len(skipped)} checkpoint(s) skipped (above)" if skipped else ""))
    return summary
