"""Export a DRAEM checkpoint for inference without PyTorch: ONNX or OpenVINO IR, fp32, bf16 or int8.

    python export_draem.py --checkpoint checkpoints/DRAEM_bottle_....pt --out bottle.onnx
    python export_draem.py --checkpoint DRAEM_seg_large_ae_large_0.0001_800_bs8_bottle_.pckl --out bottle.onnx
    python export_draem.py --checkpoint ckpt.pt --format openvino --precision int8 --out bottle.xml --check ./datasets/mvtec
    python export_draem.py --checkpoint ckpt.pt --check ./datasets/mvtec --compare bottle.xml   # gate an earlier export
    python export_draem.py --checkpoint ckpt.pt --format openvino --precision auto --out bottle.xml --check ./datasets/mvtec

The graph takes a batch of BGR images `images` (N, 3, H, W), float32 in [0, 1], N free, and returns
`anomaly_map` (N, H, W), `image_score` (N) by the official protocol and `reconstruction` (N, 3, H, W, BGR).
The file's metadata holds the category, image size, channel order, bit depth, precision, training
configuration and, when the checkpoint has them, the thresholds; an int8 file also records its calibration and
the convolutions it keeps in float. --check scores the export and the checkpoint side by side (the labelled
test set when it has defects; good images plus simulated anomalies always) and exits with status 1 when the
export fails the accuracy gate. --precision auto keeps the fastest precision that passes it.
ONNX needs requirements-export.txt; OpenVINO and int8 for it requirements-deploy.txt.
"""
import argparse
import sys
from pathlib import Path

from data_loader import parse_size
from deploy.accuracy_control import until_pass
from deploy.accuracy_gate import compare, gate_lines, passes, reference
from deploy.export import FINETUNE_BUDGET, MAX_CALIBRATION_IMAGES, PRECISIONS, export_model
from deploy.int8 import ANOMALY_SHARE, FLOAT_BUDGET
from deploy.precision_choice import choose
from scoring.model_files import OUTPUTS
from training.cli import add_shared_flags, one_line_errors, pick_device


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--checkpoint", type=Path, required=True,
      help="this project's .pt, an official .pckl (either of the pair) or an anomalib checkpoint")
    a("--out", type=Path, help="the file to write: .onnx, or .xml for OpenVINO (its .bin is written beside it)")
    a("--format", choices=sorted(PRECISIONS), default="onnx", help="onnx (ONNX Runtime) or openvino (default onnx)")
    a("--precision", choices=("fp32", "bf16", "int8", "auto"), default="fp32",
      help="fp32; bf16 (openvino, on CPUs with bf16 instructions); int8 (post-training quantization); auto (with "
           "--check: the fastest that passes the accuracy gate on this CPU) (default fp32)")
    a("--calibration_images", type=Path,
      help="with --precision int8: good images to calibrate the quantization on (default: the checkpoint's "
           "train/good, when reachable)")
    a("--calibration_count", type=int, default=MAX_CALIBRATION_IMAGES,
      help=f"with --precision int8: calibrate on this many images in all, good and simulated (default "
           f"{MAX_CALIBRATION_IMAGES})")
    a("--calibration_anomalies", type=float, default=ANOMALY_SHARE, metavar="SHARE",
      help=f"with --precision int8: this share of the calibration images are simulated anomalies made from good "
           f"ones with the checkpoint's recipe (default {ANOMALY_SHARE:g}, training's own mix)")
    a("--anomaly_source_path", type=Path,
      help="textures for the simulated anomalies of int8 calibration and --check (default: the checkpoint's "
           "recorded ones when reachable, else Perlin noise)")
    a("--float_layers", default="auto",
      help="with --precision int8: auto (the convolutions int8 hurts most, measured, under --float_budget), none, "
           "until_pass (with --check: auto's, then one more at a time, the most sensitive first, until the file of "
           "this project's int8 graph passes the accuracy gate), or comma-separated convolution names "
           "as an int8 file's metadata lists them (default auto)")
    a("--float_budget", type=float, default=FLOAT_BUDGET, metavar="SHARE",
      help=f"with --float_layers auto: at most this share of the multiply-adds stays in float (default "
           f"{FLOAT_BUDGET:g})")
    a("--finetune", type=int, metavar="STEPS",
      help="with --precision int8: write this project's own int8 graph (the simulated int8 that chooses the float "
           "layers, as QDQ pairs both runtimes read) after STEPS steps of quantization-aware fine-tuning "
           "against the fp32 model on the checkpoint's good images with fresh simulated anomalies; 0: as "
           "calibrated (default: the runtime's own post-training quantizer, no fine-tuning). With --precision auto: "
           "the steps of the fine-tuned candidate tried when post-training int8 and accuracy control both fail "
           "(default 300)")
    a("--finetune_budget", type=float, default=FINETUNE_BUDGET, metavar="MINUTES",
      help=f"with --precision auto: fine-tune only when its time, measured on this machine before it starts, is at "
           f"most this; else print the command that runs it (default {FINETUNE_BUDGET:g})")
    a("--image_size", type=parse_size,
      help="N or HxW the graph takes, sides multiples of 32 (default: the checkpoint's; 256 for official and "
           "anomalib checkpoints)")
    a("--check", type=Path, metavar="DATA",
      help="then score the export and the checkpoint side by side on DATA's test set (when it has defect images) "
           "and on good images (test/good, the held-out calibration images, or DATA itself when it is a folder of "
           "good images) plus simulated anomalies; exit status 1 when the export fails the accuracy gate")
    a("--compare", type=Path, metavar="FILE", help="with --check: gate this earlier export instead of exporting")
    a("--obj_id", help="with --check: the category to score (default: the checkpoint's)")
    a("--batch_size", type=int, default=16, help="with --check: images per forward pass (default 16)")
    add_shared_flags(p, "--device", "--debug")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, checked."""
    p = get_args_parser()
    args = p.parse_args(argv)
    if args.compare is not None and args.check is None:
        p.error("--compare FILE needs --check DATA")
    if args.compare is None and args.out is None:
        p.error("--out is required (or --check DATA --compare FILE to gate an earlier export)")
    if args.calibration_count < 1:
        p.error("--calibration_count must be at least 1")
    if not 0 <= args.calibration_anomalies < 1:
        p.error("--calibration_anomalies must be at least 0 and below 1 (good images are needed too)")
    if not 0 <= args.float_budget <= 1:
        p.error("--float_budget must be between 0 and 1")
    if args.finetune is not None and (args.finetune < 0 or args.precision not in ("int8", "auto")):
        p.error("--finetune STEPS takes a count of 0 or more, with --precision int8 or auto")
    if args.precision == "auto" and args.check is None:
        p.error("--precision auto needs --check DATA: every candidate is gated")
    args.until_pass = args.float_layers == "until_pass"
    if args.until_pass and (args.precision != "int8" or args.check is None or args.compare is not None):
        p.error("--float_layers until_pass needs --precision int8 and --check DATA (the gate decides)")
    # as deploy/ takes them: None when measured, else the names, and who chose them
    args.float_layers = {"auto": None, "none": [], "until_pass": None}.get(
        args.float_layers, [name for name in args.float_layers.split(",") if name])
    args.float_layers_by = "as asked"
    return args


def main(args: argparse.Namespace) -> None:
    with one_line_errors(args.debug):
        device = pick_device(args.device)
        if args.precision == "auto" or args.until_pass:  # the gate's reference numbers, once
            ref = reference(args.checkpoint, args.check, device, args.obj_id, args.batch_size,
                            sources=args.anomaly_source_path, size=args.image_size)
        if args.precision == "auto":
            sys.exit(0 if choose(args, ref, device) else 1)
        exported, result = args.compare, None
        if args.until_pass:
            props, result = until_pass(args, args.out, ref, device)
        elif exported is None:
            props = export_model(args, args.out, args.precision)
        if exported is None:
            exported = args.out
            size_mib = sum(f.stat().st_size for f in (args.out, args.out.with_suffix(".bin")) if f.is_file()) / 2 ** 20
            print(f"wrote {args.out} ({size_mib:.1f} MiB, {args.format} {args.precision}): images (N, 3, "
                  f"{props['image_size'].replace('x', ', ')}) BGR in [0, 1] -> {', '.join(OUTPUTS)}; category "
                  f"{props['category'] or '-'}; thresholds: image {props.get('image_threshold', 'none')}, pixel "
                  f"{props.get('pixel_threshold', 'none')}")
        if args.check is not None:
            if result is None:
                result = compare(args.checkpoint, exported, args.check, device, args.obj_id, args.batch_size,
                                 sources=args.anomaly_source_path)
            for line in gate_lines(result, exported.name):
                print(line)
            if not passes(result):
                sys.exit(1)

if __name__ == "__main__":
    main(parse_args())
