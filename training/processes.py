"""The processes of a training run: this process's place under torchrun, stopping on a signal, and the
output folders it must be able to write."""
import argparse
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from training.cli import UsageError


PLACE = ("rank", "world_size", "process_device")  # what start_processes sets on args


def start_processes(args: argparse.Namespace) -> None:
    """This process's place under torchrun, set on args as DETR's init_distributed_mode does: rank, world_size
    (0 of 1 without torchrun) and process_device (cuda:LOCAL_RANK on a multi-GPU launch, else None). --ddp (the
    processes train one model; without it each trains its own categories) stays on only under torchrun."""
    args.rank, args.world_size, args.process_device = 0, int(os.environ.get("WORLD_SIZE", "1")), None
    if args.world_size == 1:
        if args.ddp:
            print("note: --ddp without torchrun: training on one process", file=sys.stderr)
        args.ddp = False
        return
    args.rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and args.device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        args.process_device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if use_cuda else "gloo")


def batch_slice(args: argparse.Namespace) -> tuple[int, int]:
    """(how many processes share one model's batch, which slice of it this process trains on)."""
    return (args.world_size, args.rank) if args.ddp else (1, 0)


def writes_outputs(args: argparse.Namespace) -> bool:
    """Checkpoints, logs and progress come from one process per model."""
    return not args.ddp or args.rank == 0


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
