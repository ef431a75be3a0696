"""The processes of a training run: this process's place under torchrun, stopping on a signal, and the
output folders it must be able to write."""
import argparse
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from training.cli import UsageError


@dataclass(frozen=True)
class Launch:
    """This process's place under torchrun (process 0 of 1 without it)."""
    rank: int = 0  # torchrun's global rank
    world_size: int = 1
    data_parallel: bool = False  # --ddp: the processes train one model; otherwise each trains its own categories
    device: str | None = None  # cuda:LOCAL_RANK on a multi-GPU launch

    @property
    def dp_rank(self) -> int:  # which slice of the global batch this process trains on
        return self.rank if self.data_parallel else 0

    @property
    def dp_size(self) -> int:  # how many processes share one model's batch
        return self.world_size if self.data_parallel else 1

    @property
    def writes_outputs(self) -> bool:  # checkpoints, logs and progress come from one process per model
        return not self.data_parallel or self.rank == 0


def start_processes(args: argparse.Namespace) -> Launch:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        if args.ddp:
            print("note: --ddp without torchrun: training on one process", file=sys.stderr)
        return Launch()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and args.device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return Launch(rank, world_size, args.ddp, f"cuda:{local_rank}" if use_cuda else None)


class TrainingStopped(Exception):
    """Raised after the checkpoint of a run stopped by SIGINT / SIGTERM was written."""


class StopRequest:
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint after the current step and stops."""

    def __init__(self):
        self.requested = False

    def handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step", file=sys.stderr)

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank was asked to stop (one all-reduce, at log points only)."""
        flag = torch.tensor(float(self.requested), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Install the SIGINT / SIGTERM handlers for the training run; put the previous ones back after it."""
    stop = StopRequest()
    previous = {sig: signal.signal(sig, stop.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def ensure_writable(folder: Path, flag: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test{id(folder)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"{flag} {folder} cannot be written ({exc.strerror or exc})")
