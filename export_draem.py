"""Export a DRAEM checkpoint to one ONNX file with the whole scoring inside.

    python export_draem.py --checkpoint checkpoints/DRAEM_bottle_....pt --out bottle.onnx
    python export_draem.py --checkpoint DRAEM_seg_large_ae_large_0.0001_800_bs8_bottle_.pckl --out bottle.onnx
    python test_draem.py --checkpoint bottle.onnx --images photos/ --out heatmaps/     # check it before shipping

The graph takes a batch of BGR images `images` (N, 3, H, W), float32 in [0, 1], N free, and returns
`anomaly_map` (N, H, W), `image_score` (N) by the official protocol and `reconstruction` (N, 3, H, W, BGR).
The file's metadata holds the category, image size, channel order, training configuration and, when the
checkpoint has them, the operating thresholds. Needs the packages in requirements-export.txt.
"""
import argparse
from pathlib import Path

from cli import one_line_errors
from data_loader import parse_size
from onnx_model import OUTPUTS, export


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="this project's .pt, an official .pckl (either of the pair) or an anomalib checkpoint")
    p.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    p.add_argument("--image_size", type=parse_size,
                   help="N or HxW the graph takes, sides multiples of 32 (default: the checkpoint's; 256 for "
                        "official and anomalib checkpoints)")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    with one_line_errors(args.debug):
        props = export(args.checkpoint, args.out, args.image_size)
        size_mib = args.out.stat().st_size / 2 ** 20
        print(f"wrote {args.out} ({size_mib:.1f} MiB): images (N, 3, {props['image_size'].replace('x', ', ')}) BGR "
              f"in [0, 1] -> {', '.join(OUTPUTS)}; category {props['category'] or '-'}; thresholds: "
              f"image {props.get('image_threshold', 'none')}, pixel {props.get('pixel_threshold', 'none')}")


if __name__ == "__main__":
    main()
