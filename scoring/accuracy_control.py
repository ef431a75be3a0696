"""int8 with accuracy control: convolutions go back to float, the most sensitive first, until the gate passes.

The fallback that needs no fine-tuning. Each round judges this project's own int8 graph (deploy/qat.py) in
PyTorch with the accuracy gate's own checks: the file computes what that graph computes (both runtimes within
1e-3, tests/integration/test_qat.py), so a round needs no export. It starts from the convolutions the float
budget keeps (deploy/int8.py) and returns one more a round, the most sensitive of the rest, until the gate
passes or the next one would put more than MAX_FLOAT_SHARE of the multiply-adds in float.
"""
from itertools import count
from pathlib import Path

import torch

from deploy import int8, qat
from deploy.export import Int8Options, float_share, int8_calibration, scoring_graph
from scoring.accuracy_gate import Reference, judge, passes

MAX_FLOAT_SHARE = 50.0  # percent of the multiply-adds: beyond it int8 would buy little over bf16 or fp32


def float_layers_until_pass(checkpoint: Path, ref: Reference, options: Int8Options, device: torch.device,
                            batch_size: int = 16, say=print) -> tuple[list[str], str]:
    """The convolutions to keep in float, and in words how they were found (for the console and metadata)."""
    info = ref.info
    calibration = int8_calibration(checkpoint, tuple(ref.images.shape[-2:]), info.bit_depth,
                                   info.config.get("recipe", "official"), options, say)
    teacher = scoring_graph(checkpoint)
    ranges, macs = int8.input_ranges(teacher, torch.from_numpy(calibration.images))
    ranked = sorted(int8.measure_layers(teacher, calibration), key=lambda layer: -layer.sensitivity)
    kept = [layer.name for layer in int8.choose_float_layers(ranked, options.float_budget)] \
        if options.float_layers is None else list(options.float_layers)
    rest = [layer.name for layer in ranked if layer.name not in kept]
    for round in count(1):
        student = qat.int8_graph(teacher, ranges, kept)
        result = judge(ref, student.model, "int8", device, batch_size, info.channel_order)
        passed = passes(result)
        say(f"accuracy control, round {round}: {len(kept)} convolutions in float ({float_share(macs, kept):.2f} % of "
            f"the multiply-adds): " + ("passes" if passed else "fails: " + "; ".join(result["failures"])))
        if passed or not rest or float_share(macs, kept + rest[:1]) > MAX_FLOAT_SHARE:
            break
        kept.append(rest.pop(0))
    outcome = "passed" if passed else f"still failed (at most {MAX_FLOAT_SHARE:g} % in float)"
    return kept, f"accuracy control: the gate {outcome} in PyTorch after {round} round(s)"
