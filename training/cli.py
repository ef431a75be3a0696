"""What the scripts share: device choice, the false-alarm rate flag, what the CPU computes natively, and one-line
errors."""
import argparse
import functools
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from data_loader import BIT_DEPTHS, DataError, parse_bit_depth
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
        raise UsageError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is available (use --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


class UsageError(ValueError):
    """A flag's value that cannot be used here (a device, a folder, a precision this machine lacks): one line."""


# The flags the scripts share, spelled, parsed and defaulted alike wherever they appear.
SHARED_FLAGS = {
    "--device": {"default": "auto", "help": "auto (cuda when available, else cpu), cpu, cuda or cuda:N (default auto)"},
    "--workers": {"type": int, "default": 0, "help": "threads that decode images (default: up to 8)"},
    "--bit_depth": {"type": parse_bit_depth, "default": "auto",
                    "help": f"bits per sample of 16-bit images ({', '.join(map(str, BIT_DEPTHS))}): the top 8 bits are "
                            "kept (8-bit files are read as they are); auto = in training, from the largest value in "
                            "train/good, recorded in the checkpoint; in scoring, the depth the checkpoint records "
                            "(full range when it has none) (default auto)"},
    "--debug": {"action": "store_true", "help": "show tracebacks instead of one-line errors"},
}


def add_shared_flags(parser: argparse.ArgumentParser, *names: str) -> None:
    for name in names:
        parser.add_argument(name, **SHARED_FLAGS[name])


def false_alarm_rate(text: str) -> float:
    """The type of --false_alarm_rate (train_draem.py and test_draem.py): a share in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if 0 < value < 1:
        return value
    raise argparse.ArgumentTypeError(f"expected a share of good images in (0, 1) such as 0.01 for 1 %, not {text!r}")


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}  # --amp: the autocast dtype


# The names Linux's /proc/cpuinfo gives what decides int8 and bf16 speed.
CPUINFO_FLAGS = {"VNNI": ("avx512_vnni", "avx_vnni"), "bf16": ("avx512_bf16", "amx_bf16"), "AMX": ("amx_int8", "amx_tile")}


@functools.cache
def cpu_capabilities() -> dict[str, bool | None]:
    """What this CPU computes natively, on any OS: AVX2 and AVX-512 from torch's CPU capability (the kernels ATen
    dispatches to); VNNI, bf16 (AVX512_BF16 or AMX) and AMX from the kernel's flags where /proc/cpuinfo exists,
    else bf16 from OpenVINO's OPTIMIZATION_CAPABILITIES where OpenVINO is installed. None: not known here."""
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX2", "AVX512", "DEFAULT", ... on x86
    found = {"AVX2": capability in ("AVX2", "AVX512"), "AVX-512": capability == "AVX512"}
    try:
        flags = set(next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith("flags")), []))
    except OSError:  # Windows, macOS
        flags = None
    found |= {name: None if flags is None else any(f in flags for f in names) for name, names in CPUINFO_FLAGS.items()}
    if flags is None:
        try:
            import openvino
            found["bf16"] = "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        except Exception:  # not installed, or no CPU plugin: unknown
            pass
    return found


def cpu_has_bf16() -> bool:
    """Whether this CPU is known to compute bf16 natively (AVX512_BF16 or AMX)."""
    return cpu_capabilities()["bf16"] is True


def resolve_amp(amp: str, device: torch.device) -> str:
    """--amp auto as what it means on this device: bf16 on a GPU that supports it and on a CPU with bf16
    instructions (AVX512_BF16 or AMX: about twice the fp32 step rate, docs/training.md), else off."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "off"
    return "bf16" if device.type == "cpu" and cpu_capabilities()["bf16"] else "off"


def check_amp(amp: str, device: torch.device) -> None:
    """--amp for scoring: bf16 where the device computes it natively, fp16 on GPUs only."""
    if device.type == "cpu" and amp == "fp16":
        raise UsageError("--amp fp16 is for GPUs; on the CPU use --amp bf16 (where the CPU has it) or off")
    if device.type == "cpu" and amp == "bf16" and cpu_capabilities()["bf16"] is False:
        raise UsageError("--amp bf16: this CPU has no bf16 instructions (avx512_bf16 or amx_bf16); bf16 would be "
                        "emulated, slower than fp32: use --amp off")


@contextmanager
def one_line_errors(debug: bool = False) -> Iterator[None]:
    """Known problems (bad data, flags, checkpoints or a non-finite loss) become one line on stderr and exit status 2;
    with debug (the parsed --debug), the traceback instead."""
    try:
        yield
    except (DataError, UsageError, CheckpointError, FloatingPointError) as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
