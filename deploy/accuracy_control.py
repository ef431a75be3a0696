"""int8 with accuracy control: convolutions go back to float, the most sensitive first, until the file passes.

The fallback that needs no fine-tuning. Each round writes this project's own int8 graph (deploy/qat.py) in
the format asked for and judges that file, in its runtime, with the accuracy gate's own checks: the runtimes
compute the graph's arithmetic but not bit for bit (an activation rounded to the neighbouring level now and
then moves everything after it), so a verdict on the PyTorch simulation does not carry over to a file
(docs/int8.md). It starts from the convolutions the float budget keeps (deploy/int8.py) and returns one more a
round, the most sensitive of the rest, until the gate passes or the next one would put more than
MAX_FLOAT_SHARE of the multiply-adds in float.
"""
import dataclasses
import io
import tempfile
from contextlib import redirect_stdout
from itertools import count
from pathlib import Path

import torch

from deploy import int8
from deploy.accuracy_gate import judge, passes
from deploy.export import Int8Options, export_model, float_share, int8_calibration, scoring_graph
from scoring.model_files import load_model, move_model_file

MAX_FLOAT_SHARE = 50.0  # percent of the multiply-adds: beyond it int8 would buy little over bf16 or fp32


def ranked_layers(checkpoint: Path, ref: dict, options: Int8Options
                  ) -> tuple[list[str], list[str], dict[str, int]]:
    """The convolutions to start with in float, the rest from the most sensitive down, and each one's
    multiply-adds."""
    info = ref["info"]
    calibration, recorded = int8_calibration(checkpoint, tuple(ref["images"].shape[-2:]), info.bit_depth,
                                             info.config["recipe"], options)
    sensitivity, macs = int8.measure_layers(scoring_graph(checkpoint), calibration, int(recorded["calibration_good"]))
    start = int8.choose_float_layers(sensitivity, macs, options.float_budget) \
        if options.float_layers is None else list(options.float_layers)
    return start, [name for name in int8.by_sensitivity(sensitivity) if name not in start], macs


def until_pass(checkpoint: Path, out: Path, format: str, ref: dict, options: Int8Options, device: torch.device,
               image_size: tuple[int, int] | None = None, batch_size: int = 16) -> tuple[dict, dict]:
    """Write out (this project's int8 graph, options.finetune steps of fine-tuning each round, 0 by default) with
    convolutions returned to float until it passes the gate; return its metadata and its gate result."""
    kept, rest, macs = ranked_layers(checkpoint, ref, options)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.is_dir() else None) as tmp:
        for round in count(1):
            path = Path(tmp) / f"round{round}{out.suffix}"
            settings = dataclasses.replace(options, float_layers=list(kept), finetune=options.finetune or 0,
                                           float_layers_by=f"accuracy control, round {round}")
            with redirect_stdout(io.StringIO()):  # a round's export says what the round's line below sums up
                props = export_model(checkpoint, path, format, "int8", image_size, settings)
            model, info = load_model(path, device)
            result = judge(ref, model, "int8", device, batch_size)
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
