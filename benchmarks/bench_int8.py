"""What each int8 setting does to the accuracy gate, for one trained checkpoint: the table of docs/int8.md.

    python benchmarks/bench_int8.py --checkpoint CKPT --data_path ./datasets --obj_id mtd \
        --anomaly_source_path ./datasets/dtd10/images --seed_spread CKPT_OF_ANOTHER_SEED --json int8.json

Rows: naive int8 (calibrated on good images, the discriminator's last convolution in float), then one change
at a time: simulated anomalies in the calibration, float layers chosen by measurement (the default), then the
quantizers' own settings on top of the default. Each row is exported and judged against one PyTorch reference
(deploy/accuracy_gate.py). --seed_spread scores a second checkpoint, trained with another seed, against the
first on the same images: how far fp32 itself moves, the scale the gate's tolerances are set against.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploy.accuracy_gate import judge, mask_iou, passes, reference, scored  # noqa: E402
from deploy.export import export_model, export_settings  # noqa: E402
from scoring.evaluate import evaluate  # noqa: E402
from scoring.metrics import auroc  # noqa: E402
from scoring.model_files import load_model  # noqa: E402
from scoring.model_files import require  # noqa: E402
from training.checkpoint import model_from_checkpoint  # noqa: E402

LAST = "discriminative_subnetwork.decoder_segment.fin_out.0"
CPU = torch.device("cpu")


def variants(measured: list[str]) -> list[tuple[str, str, dict, dict]]:
    """(format, setting, int8 settings (deploy/export.py's EXPORT_DEFAULTS for the rest), quantizer options) of
    each row."""
    ort = require("onnxruntime.quantization")
    nncf = require("nncf")
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet
    chosen = {"float_layers": measured}
    rows = []
    for fmt in ("onnx", "openvino"):
        rows += [(fmt, "naive: good images only, last conv float",
                  {"calibration_anomalies": 0.0, "float_layers": [LAST]}, {}),
                 (fmt, "+ simulated anomalies (half)", {"float_layers": [LAST]}, {}),
                 (fmt, "+ measured float layers (default)", chosen, {})]
    rows += [("onnx", "default + symmetric activations", chosen,
              {"extra_options": {"ActivationSymmetric": True}}),
             ("onnx", "default + per-tensor weights", chosen, {"per_channel": False}),
             ("onnx", "default + percentile ranges (99.999)", chosen,
              {"calibrate_method": ort.CalibrationMethod.Percentile}),
             ("openvino", "default + preset mixed (asymmetric activations)", chosen,
              {"preset": nncf.QuantizationPreset.MIXED}),
             ("openvino", "default + full bias correction", chosen, {"fast_bias_correction": False}),
             ("openvino", "default + overflow fix off", chosen, {
                 "advanced_parameters": AdvancedQuantizationParameters(overflow_fix=OverflowFix.DISABLE)}),
             ("openvino", "default + min-max activation ranges", chosen, {
                 "advanced_parameters": AdvancedQuantizationParameters(
                     activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX)}),
             ("openvino", "default + no bias correction", chosen, {
                 "advanced_parameters": AdvancedQuantizationParameters(disable_bias_correction=True)})]
    return rows


def numbers(result: dict) -> dict:
    checks = {c["name"]: c for c in result["checks"]}
    labelled = result["labelled"] or {}
    exported = labelled.get("exported", {})
    return {**{m: exported.get(m) for m in ("image_auroc", "pixel_ap", "aupro")},
            **{name: checks[name]["value"] for name in checks},
            "passes": passes(result), "failures": result["failures"]}


def seed_spread(ref, other: Path) -> dict:
    """How a second fp32 model (another seed) differs from the reference, each at its own thresholds."""
    model, info = model_from_checkpoint(other)
    out = {}
    labelled = evaluate(model, ref["test_set"], CPU, info.channel_order) if ref["test_set"] is not None else None
    simulated = scored(model, ref["images"], CPU, info.channel_order)
    for name, ours, theirs in (("labelled", ref["labelled"], labelled),
                               ("good + simulated", ref["simulated"], simulated)):
        if theirs is None:
            continue
        a, b = ref["info"].threshold("image"), info.threshold("image")
        both = a is not None and b is not None
        changed = int(((ours["scores"] >= a) != (theirs["scores"] >= b)).sum()) if both else None
        pa, pb = ref["info"].threshold("pixel"), info.threshold("pixel")
        iou = mask_iou(ours["maps"] >= pa, theirs["maps"] >= pb) if pa is not None and pb is not None else None
        out[name] = {"images": len(ours["scores"]), "verdicts_changed": changed, "mask_iou": iou}
        if name == "labelled":
            out[name] |= {m: (ours["metrics"][m], theirs["metrics"][m]) for m in ("image_auroc", "pixel_ap")}
        else:
            labels = torch.cat((torch.zeros(ref["good"]), torch.ones(len(ref["images"]) - ref["good"])))
            out[name]["simulated_auroc"] = (auroc(ours["scores"], labels), auroc(theirs["scores"], labels))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data_path", type=Path, required=True)
    p.add_argument("--obj_id")
    p.add_argument("--anomaly_source_path", type=Path)
    p.add_argument("--calibration_images", type=Path)
    p.add_argument("--seed_spread", type=Path, help="a checkpoint of the same configuration, another seed")
    p.add_argument("--only", help="run only the rows whose name contains this")
    p.add_argument("--format", choices=("onnx", "openvino"), help="run only this format's rows")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    ref = reference(args.checkpoint, args.data_path, CPU, args.obj_id, sources=args.anomaly_source_path)
    report = {"checkpoint": args.checkpoint.name, "rows": []}
    if args.seed_spread:
        report["seed_spread"] = seed_spread(ref, args.seed_spread)
        print(json.dumps({"seed_spread": report["seed_spread"]}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.onnx"
        given = {"calibration_images": args.calibration_images, "anomaly_source_path": args.anomaly_source_path}
        measured = export_model(export_settings(args.checkpoint, **given), probe, "int8")
        for fmt, name, settings, quantizer in variants([n for n in measured["float_layers"].split(",") if n]):
            if (args.only and args.only not in name) or (args.format and args.format != fmt):
                continue
            out = Path(tmp) / f"model{'.onnx' if fmt == 'onnx' else '.xml'}"
            try:
                props = export_model(export_settings(args.checkpoint, format=fmt, **given, **settings), out, "int8",
                                     **quantizer)
            except Exception as exc:  # a setting the quantizer cannot apply to this graph is a row too
                row = {"format": fmt, "setting": name, "error": f"{type(exc).__name__}: {exc}"[:200]}
            else:
                row = {"format": fmt, "setting": name, "float_layers": props["float_layers"],
                       **numbers(judge(ref, load_model(out, CPU)[0], "int8", CPU))}
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
