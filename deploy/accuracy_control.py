"""int8 with accuracy control: convolutions go back to float, the most sensitive first, until the file passes.

The fallback that needs no fine-tuning. Each round writes this project's own int8 graph (deploy/qat.py) in
the format asked for and judges that file, in its runtime, with the accuracy gate's own checks: the runtimes
compute the graph's arithmetic but not bit for bit (an activation rounded to the neighbouring level now and
then moves everything after it), so a verdict on the PyTorch simulation does not carry over to a file
(docs/int8.md). It starts from the convolutions the float budget keeps (deploy/int8.py) and returns one more a
round, the most sensitive of the rest, until the gate passes or the next one would put more than
MAX_FLOAT_SHARE of the multiply-adds in float.
"""
import argparse
import io
import tempfile
from contextlib import redirect_stdout
from itertools import count
from pathlib import Path

import torch

from deploy import int8
from deploy.accuracy_gate import judge, passes
from deploy.export import export_model, float_share, int8_calibration, measured_layers
from scoring.model_files import load_model, move_model_file

MAX_FLOAT_SHARE = 50.0  # percent of the multiply-adds: beyond it int8 would buy little over bf16 or fp32


def ranked_layers(args: argparse.Namespace, ref: dict) -> tuple[list[str], list[str], dict[str, int]]:
    """The convolutions to start with in float, the rest from the most sensitive down, and each one's
    multiply-adds."""
    info = ref["info"]
    calibration, recorded = int8_calibration(args, tuple(ref["images"].shape[-2:]), info.bit_depth,
                                             info.config["recipe"])
    sensitivity, macs = measured_layers(args.checkpoint, calibration, int(recorded["calibration_good"]))
    start = int8.choose_float_layers(sensitivity, macs, args.float_budget) \
        if args.float_layers is None else list(args.float_layers)
    return start, [name for name in int8.by_sensitivity(sensitivity) if name not in start], macs


def until_pass(args: argparse.Namespace, out: Path, ref: dict, device: torch.device) -> tuple[dict, dict]:
    """Write out (this project's int8 graph of args.checkpoint in args.format, args.finetune steps of fine-tuning
    each round, 0 by default) with convolutions returned to float until it passes the gate; return its metadata
    and its gate result."""
    kept, rest, macs = ranked_layers(args, ref)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.is_dir() else None) as tmp:
        for round in count(1):
            path = Path(tmp) / f"round{round}{out.suffix}"
            this_round = argparse.Namespace(**vars(args) | {
                "float_layers": list(kept), "finetune": args.finetune or 0,
                "float_layers_by": f"accuracy control, round {round}"})
            with redirect_stdout(io.StringIO()):  # a round's export says what the round's line below sums up
                props = export_model(this_round, path, "int8")
            model, info = load_model(path, device)
            result = judge(ref, model, "int8", device, args.batch_size)
            passed = passes(result)
            print(f"accuracy control, round {round}: {len(kept)} convolutions in float ({float_share(macs, kept):.2f} "
                  f"% of the multiply-adds): " + ("passes" if passed else "fails: " + "; ".join(result["failures"])))
            if passed or not rest or float_share(macs, kept + rest[:1]) > MAX_FLOAT_SHARE:
                break
            kept.append(rest.pop(0))
        move_model_file(path, out)
    if not passed:
        print(f"accuracy control: still failing with {float_share(macs, kept):.2f} % in float (at most "
              f"{MAX_FLOAT_SHARE:g} %)")
    return props, result
