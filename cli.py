"""What the two scripts share on the command line: device choice and one-line errors."""
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from checkpoint import CheckpointError
from data_loader import DataError


def pick_device(name: str = "auto", gpu_id: int | None = None) -> torch.device:
    """auto: cuda when available, else cpu (with a visible note); cuda without a GPU is an error."""
    name = f"cuda:{gpu_id}" if gpu_id is not None else name
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        print("note: no CUDA GPU found, running on the CPU", file=sys.stderr)
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DataError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {name}: no CUDA GPU is available (use --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DataError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


@contextmanager
def one_line_errors(debug: bool = False) -> Iterator[None]:
    """Known problems (bad data, flags or checkpoints) become one line on stderr and exit status 2;
    with debug (the parsed --debug), the traceback instead."""
    try:
        yield
    except (DataError, CheckpointError, FloatingPointError) as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
