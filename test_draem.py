"""Score DRAEM checkpoints on MVTec-layout test sets, or find anomalies in your own images.

    python test_draem.py --checkpoint checkpoints/DRAEM_bottle_....pt --data_path ./datasets/mvtec
    python test_draem.py --checkpoint checkpoints/ --data_path ./datasets/mvtec      # every checkpoint in a folder
    python test_draem.py --checkpoint checkpoints/      # each on the data set it was trained on; results by data set
    python test_draem.py --checkpoint ckpt.pt --images my_photos/ --out heatmaps/ --threshold 0.5
    python test_draem.py --checkpoint ckpt.pt --data_path ./datasets/mvtec --threshold calibrated   # the line's threshold
    python test_draem.py --checkpoint ckpt.pt --calibrate good_parts/ --false_alarm_rate 0.01   # thresholds
    python test_draem.py --checkpoint ckpt.pt --images big/ --tile 256 --tile_overlap 32          # large images
    python test_draem.py --checkpoint ad2_checkpoints/ --submission upload/    # MVTec AD 2's evaluation server

Checkpoints: this project's .pt files, the official pair X_<category>_.pckl + X_<category>__seg.pckl (name
either), anomalib checkpoints, or files from export_draem.py: .onnx (run by ONNX Runtime) and .xml (OpenVINO). Protocol
(official): image score = max of the 21x21 mean-filtered anomaly map; image AUROC / AP; pixel AUROC / AP
over all test pixels pooled; AUPRO up to FPR 0.3. A folder of runs gets a mean per configuration and, for
runs that differ only in --seed, a seed summary. Of a folder of checkpoints, one that cannot be scored (its
category has no test set, a damaged file) is skipped with a line naming it, the others'
results are written, and the exit status is 1.
"""
import argparse
import sys
from pathlib import Path

from data_loader import parse_size
from scoring.detector import Scoring
from scoring.evaluate import MASK_PROTOCOLS
from scoring.inference import calibrate_on_folder, score_images
from scoring.map_files import write_submission
from scoring.protocols import PROTOCOLS
from scoring.results import score_test_sets
from scoring.thresholds import threshold_value
from scoring.tiling import parse_overlap
from training.cli import add_shared_flags, check_amp, false_alarm_rate, one_line_errors, pick_device


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--checkpoint", type=Path, nargs="+", required=True, help="checkpoint file(s) or folder(s) of them")
    a("--data_path", type=Path, help="folder holding <category>/test/ and <category>/ground_truth/, or <category>.json "
                                     "(default: the data set each checkpoint was trained on, as it records it)")
    a("--obj_id", help="category to score: 0..14 or a folder name (default: the checkpoint's own)")
    a("--image_size", type=parse_size, help="N or HxW the images are resized to (default: the checkpoint's; 256 for official "
                                     "and anomalib checkpoints)")
    a("--images", type=Path, help="an image or a folder of images to score instead of a test set (no labels)")
    a("--calibrate", type=Path, metavar="GOOD_DIR",
      help="set the image and pixel thresholds on a folder of good images alone (see --false_alarm_rate) and store "
           "them in the checkpoint (.pt or .onnx, rewritten atomically in place)")
    a("--false_alarm_rate", type=false_alarm_rate, default=0.01,
      help="with --calibrate: the share of good images that may be flagged (default 0.01)")
    add_shared_flags(p, "--bit_depth")
    a("--tile", type=parse_size, metavar="HxW",
      help="score each image (at its own size, or at --image_size) in tiles of this size, blended where they "
           "overlap; --batch_size then counts tiles per pass. For .onnx files: the size they were exported for")
    a("--tile_overlap", type=parse_overlap, default=0, metavar="P",
      help="with --tile: overlap of neighbouring tiles in pixels (32) or as a fraction of the tile (0.125) (default 0)")
    a("--out", type=Path, default=Path("results"), help="output folder (default ./results)")
    a("--threshold", type=threshold_value,
      help="image score at or above which an image is ANOMALY (verdicts; on a test set also the missed defects and "
           "false alarms): auto = the deployed one the model stores (calibrated on good images, else its test set's "
           "max F1), calibrated, "
           "max_f1 (a test set's own: optimistic) or a number (default: auto; on a test set without a stored one, "
           "its own max F1)")
    a("--pixel_threshold", type=threshold_value,
      help="anomaly-map value at or above which a pixel is defective (defect masks and regions); the same choices "
           "(default: auto)")
    a("--save_images", action=argparse.BooleanOptionalAction, default=True,
      help="write a labelled panel per image: input, reconstruction, heatmap (default on; --no-save_images skips "
           "them, and the report then shows no pictures)")
    a("--mask_protocol", choices=sorted(MASK_PROTOCOLS), default="standard",
      help="standard: masks binarised at 0.5; official: only pixels exactly 255 after resizing (default standard)")
    a("--protocol", choices=("auto", *PROTOCOLS), default="auto",
      help="also report this benchmark's own metrics, as its authors compute them (docs/evaluation.md): mvtec_ad2 "
           "(AU-PRO0.05, SegF1), loco (AU-sPRO0.05 structural/logical), ksdd2 (AP_det), visa (pixel AU-PR) (default "
           "auto: the data set's, by its folder name)")
    a("--tiff_maps", type=Path, metavar="DIR",
      help="also write every test image's anomaly map as DIR/<category>/test/<type>/<stem>.tiff (float32, the image's "
           "size): the input of MVTec LOCO AD's evaluation script")
    a("--submission", type=Path, metavar="DIR",
      help="MVTec AD 2: score each checkpoint's object's test_private and test_private_mixed images and write the "
           "upload folder (float16 TIFFs, PNGs at the validation mean + 3 sigma), checked before it says ready")
    a("--batch_size", type=int, default=16, help="images per forward pass, and per chunk with --images (default 16)")
    add_shared_flags(p, "--device")
    a("--amp", choices=("off", "bf16", "fp16"), default="off",
      help="PyTorch checkpoints under autocast: bf16 on CPUs with bf16 instructions and GPUs, fp16 on GPUs; "
           "exported files run at their own precision (default off: fp32)")
    add_shared_flags(p, "--workers", "--debug")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, checked."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    for flag in ("images", "calibrate"):
        if getattr(args, flag) is not None and len(args.checkpoint) != 1:
            parser.error(f"--{flag} takes exactly one --checkpoint")
    if sum(getattr(args, flag) is not None for flag in ("images", "calibrate", "submission")) > 1:
        parser.error("--images, --calibrate and --submission are separate runs: one at a time")
    if args.tile_overlap and not args.tile:
        parser.error("--tile_overlap needs --tile")
    return args


def main(args: argparse.Namespace) -> None:
    scoring = Scoring(args.image_size, None if args.bit_depth == "auto" else args.bit_depth, args.tile, args.tile_overlap, args.batch_size,
                      args.workers or None, args.amp, args.threshold, args.pixel_threshold, args.mask_protocol,
                      args.save_images, args.protocol, args.tiff_maps)
    with one_line_errors(args.debug):
        device = pick_device(args.device)
        check_amp(args.amp, device)
        if args.calibrate is not None:
            calibrate_on_folder(args.checkpoint[0], args.calibrate, args.false_alarm_rate, device, scoring)
        elif args.submission is not None:
            if not write_submission(args.checkpoint, args.data_path, args.submission, device, scoring):
                sys.exit(1)
        elif args.images is not None:
            score_images(args.checkpoint[0], args.images, args.out, device, scoring)
        else:
            summary = score_test_sets(args.checkpoint, args.data_path, args.out, device, args.obj_id, scoring)
            if summary["skipped"]:
                sys.exit(1)  # the results of the others are written; the skipped ones are named above


if __name__ == "__main__":
    main(parse_args())
