"""What the two scripts share on the command line: device choice and one-line errors."""
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from data_loader import DataError
from training.checkpoint import CheckpointError


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


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX), as Linux reports them."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_amp(amp: str, device: torch.device) -> None:
    """--amp for scoring: bf16 where the device computes it natively, fp16 on GPUs only."""
    if device.type == "cpu" and amp == "fp16":
        raise DataError("--amp fp16 is for GPUs; on the CPU use --amp bf16 (where the CPU has it) or off")
    if device.type == "cpu" and amp == "bf16" and not cpu_has_bf16():
        raise DataError("--amp bf16: this CPU has no bf16 instructions (avx512_bf16 or amx_bf16); bf16 would be "
                        "emulated, slower than fp32: use --amp off")


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
