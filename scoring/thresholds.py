"""Thresholds: which one a verdict (image score) or a defect mask (anomaly map) is judged at, where it comes from
in words, and storing calibrated ones in any model file.

Verdicts need an image threshold and defect masks a pixel threshold. A model file stores them from good images
alone for a false-alarm budget (calibration.py computes them: at training with --calibration_split or on the
validation images, or test_draem.py --calibrate) and from the labelled test set scored at the end of training
(max F1). Every model file reads back as a ModelInfo, whose ``threshold`` is the deployed one (calibrated first,
else the test set's max F1: verdicts on the line, exports' metadata and the examples use it). --threshold /
--pixel_threshold choose: auto (the deployed one), calibrated, max_f1 (a test set's own: the one scored, else the
one stored at training), or a number.
"""
import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from scoring import model_files
from scoring.metrics import percent
from training import checkpoint
from training.checkpoint import CheckpointError, ModelInfo

CHOICES = ("auto", "calibrated", "max_f1")
FLAGS = {"image": "--threshold", "pixel": "--pixel_threshold"}


@dataclass(frozen=True)
class Threshold:
    value: float | None  # None: no verdicts (image) or no defect masks (pixel)
    source: str  # where the value comes from, in words
    optimistic: bool = False  # tuned on the very images it judges (a test set's own max F1)


def threshold_value(text: str) -> str | float:
    """The flags' type: auto, calibrated, max_f1 or a number."""
    if text in CHOICES:
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {', '.join(CHOICES)} or a number, not {text!r}")


def choose(given: str | float | None, info: ModelInfo, kind: str, own_max_f1: float | None = None) -> Threshold:
    """The threshold for kind ("image" or "pixel"). own_max_f1: the max-F1 threshold of the labelled test set
    being scored, when one is; None for unlabelled images."""
    flag = FLAGS[kind]
    if isinstance(given, float):
        return Threshold(given, f"{flag} {given:g}")
    calibrated = info.calibrated_threshold(kind)
    own = None if own_max_f1 is None or math.isnan(own_max_f1) else own_max_f1
    if given == "calibrated" and calibrated is None:
        raise CheckpointError(f"{flag} calibrated: {info.run} holds no calibrated {kind} threshold: run "
                              f"test_draem.py --calibrate GOOD_DIR first")
    if given in (None, "auto", "calibrated") and calibrated is not None:
        return Threshold(calibrated, calibration_source(info.calibration))
    if given == "max_f1" and own is not None:
        return Threshold(own, "max F1 on this test set", optimistic=True)
    stored = info.test_set_threshold(kind)
    if stored is not None:
        # a test-set threshold stored at training judges the category's own test set: the images it was tuned on
        return Threshold(stored, "max F1 on the labelled test set", optimistic=own is not None)
    if own is not None:
        return Threshold(own, "max F1 on this test set (the model stores none)", optimistic=True)
    if given is not None:
        stored_kind = f"max-F1 {kind}" if given == "max_f1" else kind
        raise CheckpointError(f"{flag} {given}: {info.run} holds no {stored_kind} threshold: calibrate one on good "
                              f"images (test_draem.py --calibrate GOOD_DIR), or give a number")
    return Threshold(None, f"none stored ({flag} sets one)")


def calibration_source(calibration: dict) -> str:
    return (f"calibrated for {percent(calibration['false_alarm_rate'], '.3g')} % false alarms on "
            f"{calibration['images']} good images ({calibration['source']})")


def store_calibration(path: Path, calibration: dict) -> None:
    """Calibrated thresholds into the model file itself (.pt, .onnx or .xml, rewritten atomically by the module
    that owns the format): from then on the deployed ones."""
    if path.suffix in (".onnx", ".xml"):
        return model_files.store_calibration(path, calibration)
    checkpoint.store_calibration(path, calibration)


def describe(threshold: Threshold, info: ModelInfo, kind: str) -> str:
    """One line for the console: the value, its source, and the other stored threshold when there is one."""
    if threshold.value is None:
        return f"{kind} threshold: {threshold.source}"
    line = f"{kind} threshold: {threshold.value} ({threshold.source})"
    if threshold.optimistic:
        line += "; optimistic: tuned on these test images"
    calibrated, tested = info.calibrated_threshold(kind), info.test_set_threshold(kind)
    if calibrated is not None and f"{calibrated:.6g}" != f"{threshold.value:.6g}":
        line += f"; the calibrated one, {calibrated:.6g}, is the deployed one: {FLAGS[kind]} auto uses it"
    elif calibrated is not None and tested is not None:
        line += f"; the test set's max-F1 one, {tested:.6g}, is also stored: {FLAGS[kind]} max_f1 uses it"
    return line
