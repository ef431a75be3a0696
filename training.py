"""The pieces of a training run that the loop in train_draem.py uses: processes under torchrun, stopping on
a signal, the model and optimiser, the step-derived random streams, and the optimisation step itself."""
import argparse
import hashlib
import math
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from config import TrainConfig
from data_loader import DataError
from loss import FocalLoss, draem_loss
from model_unet import DraemModel, DraemOutput, init_weights
from perlin import SyntheticBatch, random_crops, simulate_anomalies
from recipe import RECIPES, Recipe

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


# ---- processes: torchrun, and stopping on a signal ----------------------------------------------------

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
        raise DataError(f"{flag} {folder} cannot be written ({exc.strerror or exc})")


# ---- model and optimiser, random streams --------------------------------------------------------------

def resolve_amp(amp: str, device: torch.device) -> str:
    """--amp auto as what it means on this device: bf16 on a GPU that supports it, else off."""
    if amp != "auto":
        return amp
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"


@dataclass
class Training:
    """What the optimisation updates and a checkpoint restores."""
    model: DraemModel
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler


def build_training(config: TrainConfig, device: torch.device) -> Training:
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's global RNG
        torch.manual_seed(config.seed)
        model = DraemModel(config.base_width, config.seg_base_width, config.sspcab)
        init_weights(model)
    model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    return Training(model, optimizer, scaler)


def stream_seed(seed: int, *place: object) -> int:
    """The seed of one random stream (an epoch's batch order, a step's simulation on one rank): a function
    of the run's seed and the place alone, so a checkpoint needs only its step to resume exactly."""
    return int.from_bytes(hashlib.sha256(repr((seed, *place)).encode()).digest()[:8], "little") >> 1


def epoch_order(n: int, batch_size: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """(steps, batch_size) image indices: a random permutation, the last batch topped up with random images."""
    g = torch.Generator(device).manual_seed(stream_seed(seed, "order", epoch))
    steps = math.ceil(n / batch_size)
    order = torch.randperm(n, generator=g, device=device)
    extra = torch.randint(0, n, (steps * batch_size - n,), generator=g, device=device)
    return torch.cat((order, extra)).view(steps, batch_size)


def calibration_holdout(n: int, share: float, seed: int) -> tuple[list[int], list[int]]:
    """--calibration_split: (training, held-out) indices into the sorted train/good files; which ones are
    held out depends on the seed alone, so a resumed or repeated run holds out the same images."""
    if share == 0:
        return list(range(n)), []
    held = round(share * n)
    if not 0 < held < n:
        raise DataError(f"--calibration_split {share:g} of {n} training images holds out {held}: it must leave at "
                        f"least one image for each of training and calibration")
    g = torch.Generator().manual_seed(stream_seed(seed, "calibration"))
    order = torch.randperm(n, generator=g)
    return sorted(order[held:].tolist()), sorted(order[:held].tolist())


def step_batch(images: torch.Tensor, order: torch.Tensor, step: int, steps_per_epoch: int,
               sources: torch.Tensor | None, config: TrainConfig, recipe: Recipe, launch: Launch,
               generator: torch.Generator) -> SyntheticBatch:
    """What step trains on: this rank's slice of its batch in the epoch's order (epoch_order), cropped when
    the run crops, with anomalies simulated from the step's own random stream."""
    normal = images[order[step % steps_per_epoch].view(launch.dp_size, config.bs)[launch.dp_rank]]
    generator.manual_seed(stream_seed(config.seed, "simulation", launch.dp_rank, step))
    if config.train_crop:
        normal = random_crops(normal, config.train_crop, generator)
    return simulate_anomalies(normal, sources, recipe, generator)


def first_samples(images: torch.Tensor, sources: torch.Tensor | None, config: TrainConfig, count: int,
                  steps_per_epoch: int, launch: Launch = Launch()) -> SyntheticBatch:
    """The first count samples the first steps train on (--preview), drawn exactly as the loop draws them."""
    recipe, generator, parts = RECIPES[config.recipe], torch.Generator(images.device), []
    for step in range(math.ceil(count / config.bs)):
        order = epoch_order(len(images), config.bs * launch.dp_size, config.seed, step // steps_per_epoch, images.device)
        parts.append(step_batch(images, order, step, steps_per_epoch, sources, config, recipe, launch, generator))
    return SyntheticBatch(*(torch.cat([getattr(b, f.name) for b in parts])[:count] for f in fields(SyntheticBatch)))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def prepare_network(model: DraemModel, config: TrainConfig, compile: bool, launch: Launch,
                    device: torch.device) -> nn.Module:
    """What the step calls: the model, maybe with SyncBatchNorm, compiled and wrapped for DDP."""
    if launch.data_parallel and config.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = torch.compile(model) if compile else model
    if launch.data_parallel:
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    return net


def parameter_fingerprint(model: nn.Module) -> str:
    """A digest of every parameter's bytes: equal on all DDP ranks when they stayed in step."""
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# ---- the step ---------------------------------------------------------------------------------------

def train_step(net, batch: SyntheticBatch, optimizer, scaler, autocast, focal: FocalLoss,
               sspcab: bool) -> tuple[DraemOutput, torch.Tensor, dict]:
    """One optimisation step on both sub-networks; the loss is computed in fp32 outside autocast."""
    with autocast:
        # channels_last (NHWC) is faster for these convolutions on GPUs (tensor cores) and on the CPU (oneDNN)
        out = net(batch.augmented.contiguous(memory_format=torch.channels_last))
    total, parts = draem_loss(out.reconstruction.float(), batch.image, out.logits.float(), batch.mask,
                              *((out.block5_input.float(), out.block5_output.float()) if sspcab else ()), focal=focal)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    scaler.step(optimizer)
    scaler.update()
    return out, total, parts
