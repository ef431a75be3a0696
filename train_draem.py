"""Train DRAEM on one category, a list of them, or every category under --data_path.

    python train_draem.py --obj_id 1 --data_path ./datasets/mvtec --anomaly_source_path ./datasets/dtd/images
    python train_draem.py --demo      # builds a small synthetic dataset, trains and scores it on the CPU

Each step takes a batch of the cached normal images (uint8, on the training device), simulates
anomalies on the device (perlin.py), runs both sub-networks and steps Adam on L2 + SSIM + focal loss.
One checkpoint per category and run, written atomically; TensorBoard logs under --log_path/<run>.
"""
import argparse
import hashlib
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from checkpoint import FORMAT, CheckpointError, load_state, load_weights, save_checkpoint
from cli import one_line_errors, pick_device
from data_loader import (CHANNEL_ORDER, DataError, load_anomaly_sources, load_test_set, load_train_images,
                         parse_size, resolve_categories)
from demo import DEMO_DEFAULTS, finish_demo, make_demo_dataset
from loss import FocalLoss, draem_loss
from model_unet import DraemModel, DraemOutput, init_weights
from perlin import SyntheticBatch, random_crops, simulate_anomalies
from recipe import RECIPES
from test_draem import METRICS, evaluate


# ---- configuration ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--obj_id", default="-1", help="category: 0..14 (official MVTec order), -1 for every category under "
                                     "--data_path, or a folder name such as my_part (default -1)")
    a("--data_path", type=Path, help="folder holding <category>/train/good/ (MVTec AD layout)")
    a("--anomaly_source_path", type=Path, help="folder of anomaly-source images, searched recursively (DTD's "
                                               "images/); without it the Perlin noise itself is the source")
    a("--bs", type=int, default=8, help="batch size (default 8)")
    a("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4)")
    a("--epochs", type=int, default=700, help="passes over the training images (default 700)")
    a("--checkpoint_path", type=Path, default=Path("checkpoints"), help="folder for checkpoints (default ./checkpoints)")
    a("--log_path", type=Path, default=Path("logs"), help="folder for TensorBoard runs (default ./logs)")
    a("--visualize", action="store_true", help="also log image grids (input, reconstruction, masks) to TensorBoard")
    a("--gpu_id", type=int, help="CUDA device index (official flag; same as --device cuda:N)")
    a("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    a("--image_size", type=parse_size, default=(256, 256),
      help="training size: N (square) or HxW such as 256x640, each side a multiple of 32 (default 256)")
    a("--train_crop", type=parse_size,
      help="train on a random crop of this size (N or HxW) of each image cached at --image_size; evaluation "
           "runs on the whole image (default: no crop)")
    a("--base_width", type=int, default=128, help="reconstructive sub-network width (default 128)")
    a("--seg_base_width", type=int, default=64, help="discriminative sub-network width (default 64)")
    recipes = "; ".join(f"{name}: {recipe.describe()}" for name, recipe in RECIPES.items())
    a("--recipe", choices=sorted(RECIPES), default="official",
      help=f"{recipes} (default official)".replace("%", "%%"))
    a("--sspcab", action="store_true", help="replace encoder block5 with SSPCAB and add its loss (x0.1)")
    a("--seed", type=int, default=0, help="seed for initialisation, batch order and anomaly simulation (default 0)")
    a("--workers", type=int, default=0, help="threads that decode images (default: up to 8)")
    a("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
      help="mixed precision: auto = bf16 on a GPU that supports it, off on the CPU (default auto)")
    a("--compile", action="store_true", help="torch.compile the model (first steps are slower)")
    a("--log_every", type=int, default=50, help="log losses every N steps (default 50)")
    a("--save_every", type=int, default=1, help="save a checkpoint every N epochs (default 1)")
    a("--eval_every", type=int, default=0,
      help="score the test set every N epochs; 0 = at the end only; -1 = never (default 0)")
    a("--resume", nargs="?", const="auto", default=None,
      help="continue from this run's checkpoint (or the checkpoint PATH given)")
    a("--ddp", action="store_true", help="under torchrun: train one model data-parallel (global batch = --bs x "
                                         "processes) instead of spreading the categories over the processes")
    a("--sync_bn", action="store_true", help="with --ddp on GPUs: synchronise BatchNorm statistics across ranks")
    a("--demo", action="store_true", help="build ./datasets/demo and train a small model on it, then score it; "
                                          "its settings are defaults that any flag given overrides")
    a("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags; under --demo the demo's settings are the defaults, so every flag given still wins."""
    parser = build_parser()
    if parser.parse_known_args(argv)[0].demo:
        parser.set_defaults(**DEMO_DEFAULTS)
    args = parser.parse_args(argv)
    check_args(args, parser)
    return args


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.bs < 1:
        parser.error("--bs must be at least 1")
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if not args.lr > 0:
        parser.error("--lr must be positive")
    if args.train_crop and (args.train_crop[0] > args.image_size[0] or args.train_crop[1] > args.image_size[1]):
        parser.error(f"--train_crop {args.train_crop[0]}x{args.train_crop[1]} does not fit in --image_size "
                     f"{args.image_size[0]}x{args.image_size[1]}")
    if min(args.base_width, args.seg_base_width) < 1:
        parser.error("--base_width and --seg_base_width must be at least 1")
    if args.save_every < 1 or args.log_every < 1:
        parser.error("--save_every and --log_every must be at least 1")
    if args.data_path is None:
        parser.error("--data_path is required (or use --demo)")


def amp_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype | None:
    if args.amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[args.amp]


def run_name(args: argparse.Namespace, category: str) -> str:
    return f"DRAEM_{category}_{args.recipe}_lr{args.lr:g}_ep{args.epochs}_bs{args.bs}"


def config_of(args: argparse.Namespace, category: str) -> dict:
    keys = ("bs", "lr", "epochs", "base_width", "seg_base_width", "recipe", "sspcab", "seed", "amp")
    return {**{k: getattr(args, k) for k in keys}, "image_size": list(args.image_size),
            "train_crop": list(args.train_crop) if args.train_crop else None, "category": category,
            "channel_order": CHANNEL_ORDER,
            "data_path": str(args.data_path), "anomaly_source_path": str(args.anomaly_source_path or "")}


def ensure_writable(folder: Path, flag: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test{id(folder)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise DataError(f"{flag} {folder} cannot be written ({exc.strerror or exc})")


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


# ---- the pieces of a run: model and optimiser, random streams, checkpoints -----------------------------

@dataclass
class Training:
    """What the optimisation updates and a checkpoint restores."""
    model: DraemModel
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler


def build_training(args: argparse.Namespace, device: torch.device) -> Training:
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's global RNG
        torch.manual_seed(args.seed)
        model = DraemModel(args.base_width, args.seg_base_width, args.sspcab)
        init_weights(model)
    model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(args, device) == torch.float16)
    return Training(model, optimizer, scaler)


def resume_path(args: argparse.Namespace, ckpt_path: Path) -> Path | None:
    """The checkpoint --resume names, or this run's own if it exists ("auto"); None to start afresh."""
    if not args.resume:
        return None
    if args.resume == "auto":
        return ckpt_path if ckpt_path.is_file() else None
    path = Path(args.resume)
    if not path.is_file():
        raise CheckpointError(f"--resume {path}: no such checkpoint")
    return path


def restore(training: Training, path: Path) -> tuple[int, dict]:
    """Weights, optimiser and scaler from a checkpoint; returns its step and metrics."""
    state = load_state(path)
    load_weights(training.model, state["reconstructive"], state["discriminative"], path)
    training.optimizer.load_state_dict(state["optimizer"])
    training.scaler.load_state_dict(state["scaler"])
    return state["step"], state["metrics"]


def save(path: Path, training: Training, config: dict, step: int, steps_per_epoch: int, metrics: dict) -> None:
    save_checkpoint({
        "format": FORMAT, "config": config, "category": config["category"],
        "reconstructive": training.model.reconstructive_subnetwork.state_dict(),
        "discriminative": training.model.discriminative_subnetwork.state_dict(),
        "optimizer": training.optimizer.state_dict(), "scaler": training.scaler.state_dict(),
        "epoch": step // steps_per_epoch, "step": step, "metrics": metrics}, path)


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


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def prepare_network(model: DraemModel, args: argparse.Namespace, launch: Launch, device: torch.device) -> nn.Module:
    """What the step calls: the model, maybe with SyncBatchNorm, compiled and wrapped for DDP."""
    if launch.data_parallel and args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = torch.compile(model) if args.compile else model
    if launch.data_parallel:
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    return net


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


# ---- what people see: progress, TensorBoard, evaluation ---------------------------------------------------

class Progress:
    """One tqdm bar over a category's steps when stderr is a terminal; otherwise (CI, nohup, a cluster job,
    where a bar's redraws fill the log with cursor codes) one plain line per log point."""

    def __init__(self, category: str, start: int, total: int, steps_per_epoch: int, images_per_step: int,
                 shown: bool):
        self.category, self.total, self.steps_per_epoch, self.images_per_step = category, total, steps_per_epoch, images_per_step
        self.bar = tqdm(desc=category, initial=start, total=total, unit="step") if shown and sys.stderr.isatty() else None
        self.lines = shown and self.bar is None
        self.since_step, self.since_time = start, time.perf_counter()

    def advance(self) -> None:
        if self.bar:
            self.bar.update()

    def report(self, step: int, loss: float, lr: float) -> None:
        epoch = f"{(step - 1) // self.steps_per_epoch + 1}/{self.total // self.steps_per_epoch}"
        if self.bar:
            self.bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}")
        elif self.lines:
            now = time.perf_counter()
            rate = (step - self.since_step) * self.images_per_step / max(now - self.since_time, 1e-9)
            self.since_step, self.since_time = step, now
            print(f"[{self.category}] step {step}/{self.total} epoch {epoch} loss {loss:.4f} lr {lr:.3g} "
                  f"{rate:.1f} img/s", flush=True)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def log_step(writer: SummaryWriter | None, progress: Progress, step: int, total: torch.Tensor, parts: dict,
             optimizer: torch.optim.Optimizer) -> None:
    """Losses and learning rate to TensorBoard and the progress display (reading the losses syncs the device)."""
    values = {k: v.item() for k, v in parts.items()} | {"total": total.item()}
    lr = optimizer.param_groups[0]["lr"]
    if writer:
        for key, value in values.items():
            writer.add_scalar(f"loss/{key}", value, step)
        writer.add_scalar("lr", lr, step)
    progress.report(step, values["total"], lr)


def to_rgb_grid(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) BGR or 1-channel in [0, 1] -> (B, 3, H, W) RGB for TensorBoard."""
    images = images.detach().float().clamp(0, 1)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images.flip(1)


def log_image_grid(writer: SummaryWriter, batch: SyntheticBatch, out: DraemOutput, step: int) -> None:
    predicted = torch.softmax(out.logits.float(), 1)[:, 1:]
    grid = torch.cat([to_rgb_grid(t) for t in (batch.augmented, out.reconstruction, batch.mask, predicted)])
    writer.add_images("train/augmented_reconstruction_target_predicted", grid, step)


def check_finite(first_bad: torch.Tensor, ckpt_path: Path) -> None:
    bad = first_bad.item()
    if bad >= 0:
        kept = f"the last good checkpoint {ckpt_path} is kept" if ckpt_path.exists() else "no checkpoint was written yet"
        raise FloatingPointError(f"loss is NaN or Inf at step {bad + 1}; stopped ({kept})")


def evaluation_due(args: argparse.Namespace, epoch: int, category: str) -> bool:
    if args.eval_every < 0 or not (args.data_path / category / "test").is_dir():
        return False
    return epoch == args.epochs or (args.eval_every > 0 and epoch % args.eval_every == 0)


def evaluate_category(model: DraemModel, args: argparse.Namespace, category: str, device: torch.device) -> dict:
    """The test-set metrics and operating points (thresholds), as the checkpoint stores them."""
    test_set = load_test_set(args.data_path, category, args.image_size, args.workers)
    out = evaluate(model, test_set, device, channel_order=CHANNEL_ORDER)
    return {**out["metrics"], "operating_points": out["operating_points"]}


def format_metrics(metrics: dict) -> str:
    return " ".join(f"{k}={metrics[k]:.3f}" for k in METRICS)


def parameter_fingerprint(model: nn.Module) -> str:
    """A digest of every parameter's bytes: equal on all DDP ranks when they stayed in step."""
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# ---- the loop -----------------------------------------------------------------------------------------

def train_category(args: argparse.Namespace, category: str, device: torch.device, sources: torch.Tensor | None,
                   stop: StopRequest, launch: Launch = Launch()) -> Path:
    name = run_name(args, category)
    ckpt_path = args.checkpoint_path / f"{name}.pt"
    config, recipe = config_of(args, category), RECIPES[args.recipe]
    images = load_train_images(args.data_path, category, args.image_size, args.workers).to(device)
    training = build_training(args, device)
    model, optimizer, scaler = training.model, training.optimizer, training.scaler
    start, metrics = 0, {}
    if path := resume_path(args, ckpt_path):
        start, metrics = restore(training, path)
        print(f"[{category}] resumed from {path} at step {start}")
    net = prepare_network(model, args, launch, device)
    # Under --ddp the global batch is bs x dp_size: every rank draws the same order and trains its slice.
    steps_per_epoch = math.ceil(len(images) / (args.bs * launch.dp_size))
    total_steps = steps_per_epoch * args.epochs
    writes = launch.writes_outputs
    if writes:
        print(f"[{category}] {len(images)} training images cached on {device}; run {name}")
    # On resume, drop logged events from after the checkpoint (progress that was lost), keep the rest.
    writer = SummaryWriter(args.log_path / name, purge_step=start + 1 if start else None) if writes else None
    progress = Progress(category, start, total_steps, steps_per_epoch, args.bs * launch.dp_size, shown=writes)
    dtype = amp_dtype(args, device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    focal, simulation_g = FocalLoss(), torch.Generator(device)
    first_bad = torch.tensor(-1, device=device)  # first step with a non-finite loss, read at log points only
    order = None
    model.train()
    for step in range(start, total_steps):
        # schedule: the epoch's batch order and learning rate
        epoch, index = divmod(step, steps_per_epoch)
        if order is None or index == 0:
            order = epoch_order(len(images), args.bs * launch.dp_size, args.seed, epoch, device)
            set_learning_rate(optimizer, recipe.learning_rate(args.lr, epoch, args.epochs))

        # batch and simulate: this rank's slice of the batch, anomalies from this step's own stream
        normal = images[order[index].view(launch.dp_size, args.bs)[launch.dp_rank]]
        simulation_g.manual_seed(stream_seed(args.seed, "simulation", launch.dp_rank, step))
        if args.train_crop:
            normal = random_crops(normal, args.train_crop, simulation_g)
        batch = simulate_anomalies(normal, sources, recipe, simulation_g)

        # step
        out, total, parts = train_step(net, batch, optimizer, scaler, autocast, focal, args.sspcab)
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(total), step, first_bad)
        done = step + 1
        progress.advance()

        # log: the only host syncs of the loop. Under DDP the ranks agree to stop here, so none is left
        # waiting in an all-reduce.
        log_now = done % args.log_every == 0
        stopping = stop.agreed(device) if launch.data_parallel and log_now else stop.requested and not launch.data_parallel
        if log_now or stopping:
            check_finite(first_bad, ckpt_path)
            log_step(writer, progress, done, total, parts, optimizer)

        # end of an epoch: visualise, evaluate, save
        if index + 1 == steps_per_epoch:
            check_finite(first_bad, ckpt_path)
            if args.visualize and writer:
                log_image_grid(writer, batch, out, done)
            if writes and evaluation_due(args, epoch + 1, category):
                metrics = {"epoch": epoch + 1, **evaluate_category(model, args, category, device)}
                for key in METRICS:
                    writer.add_scalar(f"test/{key}", metrics[key], done)
                model.train()
            if writes and ((epoch + 1) % args.save_every == 0 or done == total_steps):
                save(ckpt_path, training, config, done, steps_per_epoch, metrics)

        if stopping:
            if writes:
                save(ckpt_path, training, config, done, steps_per_epoch, metrics)
                writer.close()
            progress.close()
            raise TrainingStopped(f"[{category}] stopped at step {done}; resume with --resume")
    progress.close()
    if launch.data_parallel:
        print(f"[{category}] rank {launch.rank} parameter fingerprint {parameter_fingerprint(model)}")
    if writer:
        writer.close()
        print(f"[{category}] checkpoint {ckpt_path}" + (f"  metrics {format_metrics(metrics)}" if metrics else ""))
    return ckpt_path


def train(args: argparse.Namespace) -> None:
    if args.demo:
        print(f"demo dataset: {make_demo_dataset()}")
    launch = start_processes(args)
    device = pick_device(launch.device) if launch.device else pick_device(args.device, args.gpu_id)
    categories = resolve_categories(str(args.obj_id), args.data_path)
    if launch.world_size > 1 and not launch.data_parallel:  # each process trains its share, one after another
        categories = categories[launch.rank::launch.world_size]
    for folder, flag in ((args.checkpoint_path, "--checkpoint_path"), (args.log_path, "--log_path")):
        ensure_writable(folder, flag)
    if args.anomaly_source_path is None:
        warnings.warn("no --anomaly_source_path: the Perlin noise itself is the anomaly source (as in anomalib); "
                      "the paper used DTD textures", stacklevel=1)
        sources = None
    else:
        # the simulation works on what a step trains on: the crop when there is one
        sources = load_anomaly_sources(args.anomaly_source_path, args.train_crop or args.image_size,
                                       args.workers).to(device)
        print(f"{len(sources)} anomaly-source images cached on {device}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    started = time.perf_counter()
    with stop_on_signals() as stop:
        try:
            paths = [train_category(args, category, device, sources, stop, launch) for category in categories]
        except TrainingStopped as exc:
            print(exc, file=sys.stderr)
            sys.exit(130)
    if launch.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    if launch.writes_outputs:
        print(f"trained {len(paths)} categor{'y' if len(paths) == 1 else 'ies'} in {time.perf_counter() - started:.0f} s;"
              f" TensorBoard: tensorboard --logdir {args.log_path}")
    if args.demo and launch.rank == 0:
        finish_demo(args, paths)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with one_line_errors(args.debug):
        train(args)


if __name__ == "__main__":
    main()
