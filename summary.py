"""Runs grouped by what they are: per-configuration means over categories, and seed summaries.

A configuration is a TrainConfig's identity (config.py); the means average the categories of one
configuration, never different variants, and a seed summary takes the runs of one category and
configuration that differ only in --seed. Official and anomalib weights record no seed: each kind is a
configuration of its own and takes no part in seed summaries.
"""
import math
import statistics

from config import TrainConfig
from data_loader import height_width
from metrics import METRICS


def configuration(result: dict, leave_out: tuple[str, ...]) -> str:
    """A label equal for two runs exactly when their settings agree apart from leave_out."""
    config = result["config"]
    if "seed" in config:
        return TrainConfig.from_dict(config).variant(leave_out=leave_out)
    h, w = height_width(config["image_size"])
    label = f"{result['source']}_{h}x{w}_w{config['base_width']}-{config['seg_base_width']}"
    return label + ("_sspcab" if config.get("sspcab") else "")


def mean_std(values: list[float]) -> dict[str, float]:
    values = [v for v in values if not math.isnan(v)]
    return {"mean": statistics.fmean(values) if values else float("nan"),
            "std": statistics.stdev(values) if len(values) > 1 else float("nan")}


def configuration_means(results: dict[str, dict]) -> list[dict]:
    """Per configuration: the mean of each metric over its runs (its categories; every seed counts as a run)."""
    groups: dict[str, list[str]] = {}
    for run, result in results.items():
        groups.setdefault(configuration(result, ("category",)), []).append(run)
    return [{"configuration": label, "runs": runs, "categories": sorted({results[r]["category"] for r in runs}),
             **{m: mean_std([results[r][m] for r in runs])["mean"] for m in METRICS}}
            for label, runs in groups.items()]


def seed_summaries(results: dict[str, dict]) -> list[dict]:
    """Mean and sample standard deviation of each metric over runs that differ only in --seed (2 or more)."""
    groups: dict[str, list[str]] = {}
    for run, result in results.items():
        if "seed" in result["config"]:
            groups.setdefault(configuration(result, ("seed",)), []).append(run)
    return [{"category": results[runs[0]]["category"], "configuration": label, "runs": runs,
             "seeds": [results[r]["config"]["seed"] for r in runs],
             **{m: mean_std([results[r][m] for r in runs]) for m in METRICS}}
            for label, runs in groups.items() if len(runs) > 1]
