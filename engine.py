"""The training run's engine, beside train_draem.py as MAE's engine beside its script: the model and optimiser,
the step-derived random streams (batch order, anomaly simulation, the calibration hold-out), the batch a step trains
on, the step itself, what people see while it runs (progress, TensorBoard), and the end of an epoch (save, score
the test set, calibrate thresholds)."""
import argparse
import hashlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from data_loader import DataError, Layout, TestSet, load_test_set
from loss import draem_loss
from model_unet import DraemModel, DraemOutput, init_weights
from perlin import Batch, random_crops, simulate_anomalies
from recipe import RECIPES
from scoring.calibration import calibrate, describe, map_statistics
from scoring.evaluate import evaluate, predict
from scoring.metrics import METRICS
from scoring.visualize import sample_grid, write_png
from training.checkpoint import load_checkpoint, load_weights, save_training
from training.defects import (RealDefects, choose_defects, draw_pasted, draw_real, load_real_defects, pasted_per_step,
                              real_per_step)
from training.cli import UsageError
from training.processes import batch_slice
from training.settings import check_resumable, resume_path


def build_training(args: argparse.Namespace, device: torch.device
                   ) -> tuple[DraemModel, torch.optim.Optimizer, torch.amp.GradScaler]:
    """The model (seeded), its optimiser and the fp16 loss scaler (a no-op otherwise): what a checkpoint restores."""
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's global RNG
        torch.manual_seed(args.seed)
        model = DraemModel(args.base_width, args.seg_base_width, args.sspcab)
        init_weights(model)
    model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    return model, optimizer, scaler


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
        raise UsageError(f"--calibration_split {share:g} of {n} training images holds out {held}: it must leave at "
                        f"least one image for each of training and calibration")
    g = torch.Generator().manual_seed(stream_seed(seed, "calibration"))
    order = torch.randperm(n, generator=g)
    return sorted(order[held:].tolist()), sorted(order[:held].tolist())


def step_batch(images: torch.Tensor, order: torch.Tensor, step: int, sources: torch.Tensor | None,
               args: argparse.Namespace, generator: torch.Generator, defects: RealDefects | None = None) -> Batch:
    """What step trains on: this rank's slice of its batch in the epoch's order (epoch_order: one row per step),
    cropped when the run crops, with anomalies simulated from the step's own random stream. With real defects,
    they take the batch's last real_per_step places, drawn from their own stream of the step."""
    slices, rank = batch_slice(args)
    normal = images[order[step % len(order)].view(slices, args.bs)[rank]]
    real = real_per_step(args.defect_share, args.bs) if defects is not None else 0
    pasted = pasted_per_step(defects, real, args.paste_defects) if real else 0
    own = real - pasted  # the pasted ones keep their good image: it is their clean target
    kept = len(normal) - own - pasted  # the simulated places; the pasted ones take the next good images
    normal, good = normal[:kept], normal[kept:len(normal) - own]
    generator.manual_seed(stream_seed(args.seed, "simulation", rank, step))
    if args.train_crop:
        normal = random_crops(normal, args.train_crop, generator)
    simulated = simulate_anomalies(normal, sources, args.recipe, generator)
    if not real:
        return simulated
    generator.manual_seed(stream_seed(args.seed, "real defects", rank, step))
    recipe = RECIPES[args.recipe]
    clean, augmented, mask = simulated.image, simulated.augmented, simulated.mask
    if pasted:
        parts = draw_pasted(defects, good, recipe, args.train_crop, generator, args.paste_contrast)
        clean, augmented, mask = (torch.cat((a, b)) for a, b in zip((clean, augmented, mask), parts))
    if not own:
        return Batch(clean, augmented, mask, 0, None, pasted)
    image, own_mask, has_mask = draw_real(defects, own, recipe, args.train_crop, generator,
                                          defects.pools[False] if args.paste_defects else None)
    return Batch(torch.cat((clean, image)), torch.cat((augmented, image)), torch.cat((mask, own_mask)), own,
                 torch.cat((torch.ones(len(clean), dtype=torch.bool, device=image.device), has_mask)), pasted)


def first_samples(images: torch.Tensor, sources: torch.Tensor | None, args: argparse.Namespace, count: int,
                  steps_per_epoch: int, defects: RealDefects | None = None) -> Batch:
    """The first count samples the first steps train on (--preview), drawn exactly as the loop draws them (real
    defects, when the run has them, last in each batch: their image is their input, their mask the target)."""
    generator, parts = torch.Generator(images.device), []
    one_process = argparse.Namespace(**{**vars(args), "ddp": False})  # as a run of one process draws them
    for step in range(math.ceil(count / args.bs)):
        order = epoch_order(len(images), args.bs, args.seed, step // steps_per_epoch, images.device)
        parts.append(step_batch(images, order, step, sources, one_process, generator, defects))
    return Batch(*(torch.cat([getattr(b, name) for b in parts])[:count] for name in ("image", "augmented", "mask")))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def prepare_network(model: DraemModel, args: argparse.Namespace, device: torch.device) -> nn.Module:
    """What the step calls: the model, maybe with SyncBatchNorm, compiled and wrapped for DDP."""
    if args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = torch.compile(model) if args.compile else model
    if args.ddp:
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    return net


def parameter_fingerprint(model: nn.Module) -> str:
    """A digest of every parameter's bytes: equal on all DDP ranks when they stayed in step."""
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def train_step(net: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               autocast, sspcab: bool, score_weight: float = 0.0) -> tuple[DraemOutput, torch.Tensor, dict]:
    """One optimisation step on both sub-networks; the loss is computed in fp32 outside autocast."""
    with autocast:
        # channels_last (NHWC) is faster for these convolutions on GPUs (tensor cores) and on the CPU (oneDNN)
        out = net(batch.augmented.contiguous(memory_format=torch.channels_last))
    # fp32 for the loss, whatever autocast computed the networks in
    total, parts = draem_loss(DraemOutput(*(t.float() for t in out)), batch, sspcab, score_weight)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    scaler.step(optimizer)
    scaler.update()
    return out, total, parts


# ---- what people see while a run trains: a progress bar or plain log lines, TensorBoard scalars and images ----

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


def log_image_grid(writer: SummaryWriter, batch: Batch, out: DraemOutput, step: int) -> None:
    predicted = out.anomaly_map[:, None]
    grid = torch.cat([to_rgb_grid(t) for t in (batch.augmented, out.reconstruction, batch.mask, predicted)])
    writer.add_images("train/augmented_reconstruction_target_predicted", grid, step)


# ---- the run and the end of an epoch: save, score the test set, calibrate ----------------------------------

@dataclass
class Run:
    """One category's run as the loop sees it: settings, name and file, what it trains on and is judged on, its
    schedule, and what it has measured so far (the checkpoint stores that too)."""
    config: argparse.Namespace  # the flags with what train_draem.run_config decided
    settings: dict  # what the checkpoint records of config (train_draem.settings)
    name: str
    checkpoint: Path
    layout: Layout
    images: torch.Tensor  # the training images, uint8 on the device
    held_out: list[Path]  # train/good files kept out of training by --calibration_split
    validation: list[Path]  # the category's validation images, calibrated on when nothing is held out
    steps_per_epoch: int
    defects: RealDefects | None = None  # real defect images trained on, on the device (training/defects.py)
    test_set: TestSet | None = None  # scored every --eval_every epochs and at the end, without the defects
    calibration_images: torch.Tensor | None = None  # held_out, else validation, decoded: calibrated on at the end
    metrics: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.epochs


def check_finite(first_bad: torch.Tensor, ckpt_path: Path) -> None:
    bad = first_bad.item()
    if bad >= 0:
        kept = f"the last good checkpoint {ckpt_path} is kept" if ckpt_path.exists() else "no checkpoint was written yet"
        raise FloatingPointError(f"loss is NaN or Inf at step {bad + 1}; stopped ({kept})")


def defect_draw(seed: int) -> torch.Generator:
    """The stream that chooses which real defects a run trains on (--train_defects N, --pixel_labels N)."""
    return torch.Generator().manual_seed(stream_seed(seed, "real defects"))


def real_defects(layout: Layout, config: argparse.Namespace, paths: list[Path], device: torch.device
                 ) -> RealDefects | None:
    """The real defect images the run trains on (training/defects.py: train/<type>/, and --train_defects of the
    test set's, drawn by the seed's own stream) on the device; None when it trains on good images alone."""
    chosen = [] if config.unsupervised else choose_defects(
        layout, config.train_defects, config.pixel_labels, paths, defect_draw(config.seed))
    if config.train_crop and any(d["mask"] is None for d, _ in chosen):
        raise DataError("--train_crop with defect images that have no mask: a crop may cut the defect out of an "
                        "image labelled defective; give their masks or train without --train_crop")
    if chosen and config.bs < 2:
        raise DataError("--bs 1 leaves no room for real defects beside a simulated sample: use --bs 2 or more")
    defects = load_real_defects(chosen, config.image_size, config.bit_depth, config.workers)
    return defects.to(device) if defects else None


def scoring_set(run: Run) -> TestSet | None:
    """The test set without the defects the run trains on, read (and checked: layout, every image, masks) before
    the first step, so that a broken one fails in seconds and not after hours of training; None when there is
    none or --eval_every -1."""
    config, layout = run.config, run.layout
    if config.eval_every < 0:
        return None
    if not layout.test:
        print(f"[{layout.category}] no test set in {layout.origin}: training without evaluation")
        return None
    test_set = load_test_set(config.data_path, layout.category, config.image_size, config.workers or None,
                             config.bit_depth, run.defects.digests if run.defects else frozenset())
    if test_set.left_out:
        print(f"[{layout.category}] test set: {test_set.left_out_text()}")
    return test_set


def resume(run: Run, model: DraemModel, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> int:
    """Load --resume's checkpoint into the model, optimiser and run; the step to continue from (0: afresh)."""
    path = resume_path(run.config.resume, run.settings, run.checkpoint)
    if path is None:
        return 0
    state, info = load_checkpoint(path)
    check_resumable(info, run.settings, path, run.total_steps)
    trained = run.defects.digests if run.defects else frozenset()
    if info.trained_digests != trained:
        raise DataError(f"--resume {path}: it trained on {len(info.trained_defects)} real defect image(s), "
                        f"this run has {len(trained)} (other files in train/<type>/ or another --train_defects draw): "
                        f"start a new run")
    load_weights(model, state, path, optimizer, scaler)
    run.metrics, run.calibration = info.metrics, info.calibration
    print(f"[{run.config.category}] resumed from {path} at step {info.step}")
    return info.step


def describe_run(run: Run, device: torch.device, amp_was_auto: bool) -> str:
    """The line a run starts with: what it trains on, where, at which precision, under which name."""
    config = run.config
    return (f"[{config.category}] {len(run.images)} training images ({config.bit_depth}-bit) cached on {device}"
            + (f", {len(run.held_out)} held out to calibrate thresholds on" if run.held_out else
               f", {len(run.validation)} validation images to calibrate thresholds on" if run.validation else "")
            + (f"; {run.defects.describe()}, {defects_per_batch(run.defects, config)}" if run.defects else "")
            + f"; {'fp32' if config.amp == 'off' else config.amp + ' autocast'}"
            + (" (--amp auto)" if amp_was_auto else "")
            + f"; run {run.name}")


def evaluate_category(model: DraemModel, test_set: TestSet, device: torch.device, channel_order: str) -> dict:
    """The test-set metrics, operating points (thresholds), mask coverage and the defect images left out because
    the run trains on them, as the checkpoint stores them."""
    out = evaluate(model, test_set, device, channel_order=channel_order)
    return {**out["metrics"], "operating_points": out["operating_points"], "mask_coverage": out["mask_coverage"],
            "left_out": [str(p) for p in test_set.left_out]}


def calibrate_at_end(model: DraemModel, run: Run, rate: float, device: torch.device) -> dict:
    """Thresholds for the false-alarm budget from good images never trained on: those --calibration_split kept
    out of training, else the category's validation images."""
    config = run.config
    maps, _ = predict(model, run.calibration_images, device, config.channel_order, config.bs)
    source = (f"{len(run.held_out)} of train/good held out by --calibration_split {config.calibration_split:g}"
              if run.held_out else f"the {len(run.validation)} validation images in {run.validation[0].parent}")
    scores, maxima = map_statistics(maps)
    calibration = calibrate(scores.numpy(), maxima.numpy(), rate, source)
    for line in describe(calibration):
        print(f"[{config.category}] {line}")
    return calibration | ({"held_out": [p.name for p in run.held_out]} if run.held_out else {})


def write_preview(run: Run, sources: torch.Tensor | None) -> Path:
    """--preview: the first N training samples as one labelled PNG."""
    config, name, count = run.config, run.name, run.config.preview
    batch = first_samples(run.images, sources, config, count, run.steps_per_epoch, run.defects)
    h, w = batch.image.shape[-2:]
    title = (f"{name}: first {count} samples | {config.recipe} recipe | {h}x{w}"
             + (f" crops of {config.image_size[0]}x{config.image_size[1]}" if config.train_crop else "")
             + f" | {'textures' if sources is not None else 'Perlin noise'} | {config.bit_depth}-bit"
             + (" | real defects last in each batch" if run.defects else ""))
    path = config.log_path / name / "preview.png"
    real = real_per_step(config.defect_share, config.bs) if run.defects else 0
    own = real - (pasted_per_step(run.defects, real, config.paste_defects) if real else 0)
    kinds = ["own" if i % config.bs >= config.bs - own else "pasted" if i % config.bs >= config.bs - real else ""
             for i in range(len(batch.image))]
    write_png(path, sample_grid(batch.image, batch.augmented, batch.mask, title, real=kinds))
    return path


def defects_per_batch(defects: RealDefects, config: argparse.Namespace) -> str:
    """'2 per batch of 8 (2 pasted onto good images)': what each step trains on."""
    real = real_per_step(config.defect_share, config.bs)
    pasted = pasted_per_step(defects, real, config.paste_defects)
    return f"{real} per batch of {config.bs}" + (f" ({pasted} pasted onto good images)" if pasted else "")


def format_metrics(metrics: dict) -> str:
    coverage = metrics["mask_coverage"]
    masks = ("" if coverage["defect_images_with_mask"] == coverage["defect_images"] else
             f" (pixel metrics over the {coverage['defect_images_with_mask']} of {coverage['defect_images']} "
             f"defect images that have masks)")
    left_out = len(metrics["left_out"])
    scored = (f" (scored on {coverage['defect_images']} of {coverage['defect_images'] + left_out} defect images; "
              f"{left_out} used in training)" if left_out else "")
    return " ".join(f"{k}={metrics[k]:.3f}" for k in METRICS) + masks + scored


def save(run: Run, model: DraemModel, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
         done: int) -> None:
    progress = {"step": done, "epoch": done // run.steps_per_epoch, "metrics": run.metrics,
                "calibration": run.calibration, "trained_defects": run.defects.files if run.defects else []}
    save_training(run.checkpoint, model, run.settings, progress, optimizer, scaler)


def end_of_epoch(run: Run, model: DraemModel, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 epoch: int, writer: SummaryWriter, device: torch.device) -> None:
    """Save when due, then score the test set and calibrate on the held-out (or validation) images when due, and
    save again (saving first: a failure in scoring never costs the weights)."""
    config = run.config
    done, last = (epoch + 1) * run.steps_per_epoch, epoch + 1 == config.epochs
    due = last or (config.eval_every > 0 and (epoch + 1) % config.eval_every == 0)
    evaluate_now = run.test_set is not None and due
    calibrate_now = run.calibration_images is not None and last
    if (epoch + 1) % config.save_every == 0 or last or evaluate_now:
        save(run, model, optimizer, scaler, done)
    if evaluate_now or calibrate_now:
        model.eval()
    if evaluate_now:
        scored = evaluate_category(model, run.test_set, device, config.channel_order)
        run.metrics = {"epoch": epoch + 1, **scored}
        for key in METRICS:
            writer.add_scalar(f"test/{key}", run.metrics[key], done)
    if calibrate_now:
        run.calibration = calibrate_at_end(model, run, config.false_alarm_rate, device)
    if evaluate_now or calibrate_now:
        save(run, model, optimizer, scaler, done)
        model.train()
