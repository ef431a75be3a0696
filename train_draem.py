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
import random
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from cli import pick_device, run_cli
from checkpoint import FORMAT, CheckpointError, load_state, load_weights, save_checkpoint
from data_loader import (CHANNEL_ORDER, DataError, load_anomaly_sources, load_test_set, load_train_images,
                         resolve_categories)
from demo import apply_demo_defaults, finish_demo
from loss import FocalLoss, draem_loss
from model_unet import DraemModel, DraemOutput, init_weights
from perlin import RECIPES, SyntheticBatch, simulate_anomalies
from test_draem import evaluate

# LR milestones as fractions of the epochs, and the decay factor (../shared/DRAEM_FACTS.md section 3).
LR_SCHEDULES = {"official": ([0.8, 0.9], 0.2), "paper": ([400 / 700, 600 / 700], 0.1)}


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
    a("--image_size", type=int, default=256, help="training side in pixels, a multiple of 32 (default 256)")
    a("--base_width", type=int, default=128, help="reconstructive sub-network width (default 128)")
    a("--seg_base_width", type=int, default=64, help="discriminative sub-network width (default 64)")
    a("--recipe", choices=sorted(RECIPES), default="official",
      help="official: the authors' code (beta U(0,0.8), LR x0.2 at 80%%/90%%); paper: beta U(0.1,1), "
           "rotation +-45, LR x0.1 at epochs 400/600 of 700 (default official)")
    a("--sspcab", action="store_true", help="replace encoder block5 with SSPCAB and add its loss (x0.1)")
    a("--seed", type=int, default=0, help="seed for initialisation and anomaly simulation (default 0)")
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
    a("--demo", action="store_true", help="build ./datasets/demo, train a small model on it and score it")
    a("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.bs < 1:
        parser.error("--bs must be at least 1")
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if not args.lr > 0:
        parser.error("--lr must be positive")
    if args.image_size < 32 or args.image_size % 32:
        parser.error("--image_size must be a positive multiple of 32 (five 2x poolings)")
    if min(args.base_width, args.seg_base_width) < 1:
        parser.error("--base_width and --seg_base_width must be at least 1")
    if args.save_every < 1 or args.log_every < 1:
        parser.error("--save_every and --log_every must be at least 1")
    if args.data_path is None and not args.demo:
        parser.error("--data_path is required (or use --demo)")


def amp_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype | None:
    if args.amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[args.amp]


def run_name(args: argparse.Namespace, category: str) -> str:
    return f"DRAEM_{category}_{args.recipe}_lr{args.lr:g}_ep{args.epochs}_bs{args.bs}"


def ensure_writable(folder: Path, flag: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test{id(folder)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise DataError(f"{flag} {folder} cannot be written ({exc.strerror or exc})")


def config_of(args: argparse.Namespace, category: str) -> dict:
    keys = ("bs", "lr", "epochs", "image_size", "base_width", "seg_base_width", "recipe", "sspcab", "seed", "amp")
    return {**{k: getattr(args, k) for k in keys}, "category": category, "channel_order": CHANNEL_ORDER,
            "data_path": str(args.data_path), "anomaly_source_path": str(args.anomaly_source_path or "")}


def rng_states(g: torch.Generator, sim_g: torch.Generator) -> dict:
    np_state = np.random.get_state()
    return {"generator": g.get_state(), "simulation": sim_g.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate()}


def restore_rng_states(states: dict, g: torch.Generator, sim_g: torch.Generator) -> None:
    g.set_state(states["generator"])
    sim_g.set_state(states["simulation"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in states["python"]))


class StopRequest:
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint after the current step and exits."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)

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


def epoch_batches(n: int, bs: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """(steps, bs) indices: a random permutation, its last batch topped up with random images so all are full."""
    steps = math.ceil(n / bs)
    order = torch.randperm(n, generator=g, device=device)
    extra = torch.randint(0, n, (steps * bs - n,), generator=g, device=device)
    return torch.cat((order, extra)).view(steps, bs)


def to_rgb_grid(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) BGR or 1-channel in [0, 1] -> (B, 3, H, W) RGB for TensorBoard."""
    images = images.detach().float().clamp(0, 1)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images.flip(1)


@dataclass(frozen=True)
class Distributed:
    """Where this process stands under torchrun (rank 0 of 1 without it)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    ddp: bool = False  # one model data-parallel (--ddp), rather than categories spread over the processes

    @property
    def writes(self) -> bool:  # checkpoints and logs are written once, by their owner
        return not self.ddp or self.rank == 0


def setup_distributed(args: argparse.Namespace) -> Distributed:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        if args.ddp:
            print("note: --ddp without torchrun: training on one process", file=sys.stderr)
        return Distributed()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and args.device != "cpu"
    if use_cuda:
        args.device, args.gpu_id = f"cuda:{local_rank}", None
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return Distributed(rank, world, local_rank, args.ddp)


def train_category(args, category: str, device: torch.device, sources: torch.Tensor | None, stop: StopRequest,
                   where: Distributed = Distributed()) -> Path:
    name = run_name(args, category)
    ckpt_path = args.checkpoint_path / f"{name}.pt"
    images = load_train_images(args.data_path, category, args.image_size, args.workers).to(device)
    if where.writes:
        print(f"[{category}] {len(images)} training images cached on {device}; run {name}")
    # In DDP every rank draws the same batch order (the global batch is bs x world: rank r takes its
    # bs columns) but simulates its own anomalies.
    world, rank = (where.world, where.rank) if where.ddp else (1, 0)

    torch.manual_seed(args.seed)
    model = DraemModel(args.base_width, args.seg_base_width, args.sspcab)
    init_weights(model)
    model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=device.type == "cuda")
    fractions, gamma = LR_SCHEDULES[args.recipe]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [round(f * args.epochs) for f in fractions], gamma)
    dtype = amp_dtype(args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    g = torch.Generator(device).manual_seed(args.seed)  # batch order
    sim_g = torch.Generator(device).manual_seed(args.seed + 1 + rank)  # anomaly simulation, per rank
    start_epoch, step, resume_batch, order, metrics = 0, 0, 0, None, {}

    if args.resume:
        path = ckpt_path if args.resume == "auto" else Path(args.resume)
        if path.is_file():
            state = load_state(path)
            load_weights(model, state["reconstructive"], state["discriminative"], path)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            restore_rng_states(state["rng"], g, sim_g)
            if rank:  # only rank 0's simulation stream was saved; the others restart theirs, still distinct
                sim_g.manual_seed(args.seed + 1 + rank + 1000 * state["step"])
            start_epoch, step, resume_batch, metrics = state["epoch"], state["step"], state["batch"], state["metrics"]
            order = state["order"].to(device) if state["order"] is not None else None
            print(f"[{category}] resumed from {path} at epoch {start_epoch}, step {step}")
        elif args.resume != "auto":
            raise CheckpointError(f"--resume {path}: no such checkpoint")

    def checkpoint(epoch: int, batch: int, order_now: torch.Tensor | None) -> None:
        save_checkpoint({
            "format": FORMAT, "config": config_of(args, category), "category": category,
            "reconstructive": model.reconstructive_subnetwork.state_dict(),
            "discriminative": model.discriminative_subnetwork.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epoch, "batch": batch, "step": step, "order": None if order_now is None else order_now.cpu(),
            "metrics": metrics, "rng": rng_states(g, sim_g)}, ckpt_path)

    if where.ddp and args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = torch.compile(model) if args.compile else model
    if where.ddp:
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    focal = FocalLoss()
    # On resume, drop logged events from after the checkpoint (progress that was lost), keep the rest.
    writer = SummaryWriter(args.log_path / name, purge_step=step + 1 if step else None) if where.writes else None
    first_bad = torch.tensor(-1, device=device)  # first step with a non-finite loss, checked when logging
    steps_per_epoch = math.ceil(len(images) / (args.bs * world))
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    model.train()
    epochs = tqdm(range(start_epoch, args.epochs), desc=category, initial=start_epoch, total=args.epochs, unit="ep",
                  disable=not where.writes)
    out = None  # the last step's output, for the image grids
    for epoch in epochs:
        order = order if order is not None else epoch_batches(len(images), args.bs * world, g, device)
        for batch_index in tqdm(range(resume_batch, steps_per_epoch), leave=False, unit="step", disable=not where.writes):
            mine = order[batch_index, rank * args.bs:(rank + 1) * args.bs]
            batch = simulate_anomalies(images[mine], sources, args.recipe, sim_g)
            out, total, parts = train_step(net, batch, optimizer, scaler, autocast, focal, args.sspcab)
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(total), step, first_bad)
            step += 1
            log_now = step % args.log_every == 0
            # Under DDP the ranks agree to stop at a log point, so none is left waiting in an all-reduce.
            stopping = stop.agreed(device) if where.ddp and log_now else stop.requested and not where.ddp
            if log_now or stopping:
                check_finite(first_bad, ckpt_path)
                values = {k: v.item() for k, v in parts.items()} | {"total": total.item()}
                if writer:
                    for key, value in values.items():
                        writer.add_scalar(f"loss/{key}", value, step)
                    writer.add_scalar("lr", optimizer.param_groups[0]["lr"], step)
                epochs.set_postfix(loss=f"{values['total']:.4f}")
            if stopping:
                if where.writes:
                    checkpoint(epoch, batch_index + 1, order)
                    writer.close()
                    print(f"[{category}] stopped at step {step}; resume with --resume", file=sys.stderr)
                sys.exit(130)
        check_finite(first_bad, ckpt_path)
        scheduler.step()
        order, resume_batch = None, 0
        if args.visualize and writer and out is not None:
            grid = torch.cat([to_rgb_grid(t) for t in (batch.augmented, out.reconstruction, batch.mask,
                                                         torch.softmax(out.logits.float(), 1)[:, 1:])])
            writer.add_images("train/augmented_reconstruction_target_predicted", grid, step)
        last = epoch + 1 == args.epochs
        if where.writes and evaluation_due(args, epoch + 1, last, category):
            metrics = {"epoch": epoch + 1, **evaluate_category(model, args, category, device)}
            for key, value in metrics.items():
                if key != "epoch":
                    writer.add_scalar(f"test/{key}", value, step)
            model.train()
        if where.writes and ((epoch + 1) % args.save_every == 0 or last):
            checkpoint(epoch + 1, 0, None)
    if where.ddp:
        print(f"[{category}] rank {rank} parameter fingerprint {parameter_fingerprint(model)}")
    if writer:
        writer.close()
        print(f"[{category}] checkpoint {ckpt_path}" + (f"  metrics {format_metrics(metrics)}" if metrics else ""))
    return ckpt_path


def parameter_fingerprint(model: nn.Module) -> str:
    """A digest of every parameter's bytes: equal on all DDP ranks when they stayed in step."""
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


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


def check_finite(first_bad: torch.Tensor, ckpt_path: Path) -> None:
    bad = first_bad.item()
    if bad >= 0:
        kept = f"the last good checkpoint {ckpt_path} is kept" if ckpt_path.exists() else "no checkpoint was written yet"
        raise FloatingPointError(f"loss is NaN or Inf at step {bad + 1}; stopped ({kept})")


def evaluation_due(args, epoch: int, last: bool, category: str) -> bool:
    if args.eval_every < 0 or not (args.data_path / category / "test").is_dir():
        return False
    return last or (args.eval_every > 0 and epoch % args.eval_every == 0)


def evaluate_category(model: DraemModel, args, category: str, device: torch.device) -> dict:
    test_set = load_test_set(args.data_path, category, args.image_size, args.workers)
    return evaluate(model, test_set, device, channel_order=CHANNEL_ORDER)["metrics"]


def format_metrics(metrics: dict) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in metrics.items() if k != "epoch")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo:
        apply_demo_defaults(args)
    check_args(args, parser)
    where = setup_distributed(args)
    device = pick_device(args.device, args.gpu_id)
    categories = resolve_categories(str(args.obj_id), args.data_path)
    if where.world > 1 and not where.ddp:  # category-parallel: each process trains its share, one after another
        categories = categories[where.rank::where.world]
    for folder, flag in ((args.checkpoint_path, "--checkpoint_path"), (args.log_path, "--log_path")):
        ensure_writable(folder, flag)
    if args.anomaly_source_path is None:
        warnings.warn("no --anomaly_source_path: the Perlin noise itself is the anomaly source (as in anomalib); "
                      "the paper used DTD textures", stacklevel=1)
        sources = None
    else:
        sources = load_anomaly_sources(args.anomaly_source_path, args.image_size, args.workers).to(device)
        print(f"{len(sources)} anomaly-source images cached on {device}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    stop = StopRequest()
    started = time.perf_counter()
    paths = [train_category(args, category, device, sources, stop, where) for category in categories]
    if where.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if where.writes:
        print(f"trained {len(paths)} categor{'y' if len(paths) == 1 else 'ies'} in {time.perf_counter() - started:.0f} s;"
              f" TensorBoard: tensorboard --logdir {args.log_path}")
    if args.demo and where.rank == 0:
        finish_demo(args, paths)


if __name__ == "__main__":
    run_cli(main)
