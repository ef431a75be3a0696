"""Train DRAEM on one category, or on every category under --data_path one after another.

    python train_draem.py --obj_id 1 --data_path ./datasets/mvtec --anomaly_source_path ./datasets/dtd/images
    python train_draem.py --demo      # builds a small synthetic dataset, trains and scores it on the CPU
    python train_draem.py --obj_id my_part --data_path ./datasets/mine --preview 16   # look at the samples first

Each step takes a batch of the cached normal images (uint8, on the training device), simulates
anomalies on the device (perlin.py), runs both sub-networks and steps Adam on L2 + SSIM + focal loss.
One checkpoint per category and run, written atomically; TensorBoard logs under --log_path/<run>.
"""
import argparse
import math
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter

from data_loader import (DataError, Layout, TestSet, category_layout, detect_bit_depth, has_defect_images, list_images,
                         load_anomaly_sources, load_images, load_test_set, resolve_categories, train_image_paths)
from loss import FocalLoss
from model_unet import DraemModel
from recipe import RECIPES
from scoring.calibration import calibrate, describe, map_statistics
from scoring.evaluate import evaluate, predict
from scoring.metrics import METRICS
from scoring.results import score_test_sets
from scoring.visualize import sample_grid, write_png
from training.checkpoint import load_checkpoint, save_training
from training.cli import one_line_errors, pick_device
from training.config import DEFAULT_CALIBRATION_SPLIT, TrainConfig, parse_args
from training.defects import RealDefects, choose_defects, load_real_defects, pasted_per_step, real_per_step
from training.demo import make_demo_dataset
from training.processes import Launch, StopRequest, TrainingStopped, ensure_writable, start_processes, stop_on_signals
from training.progress import Progress, log_image_grid, log_step
from training.resume import check_resumable, resume_path
from training.step import (AMP_DTYPES, Training, build_training, calibration_holdout, epoch_order, first_samples,
                           parameter_fingerprint, prepare_network, resolve_amp, set_learning_rate, step_batch,
                           stream_seed, train_step)


# ---- configuration: every flag, default and the demo's overrides are in training/config.py -----------------


def run_config(args: argparse.Namespace, category: str, launch: Launch, device: torch.device, bit_depth: int,
               calibration_split: float) -> TrainConfig:
    """This run's settings, with what the flags leave open decided: the precision, the processes per model,
    the bit depth, the calibration split."""
    return TrainConfig.from_args(args, category=category, amp=resolve_amp(args.amp, device), bit_depth=bit_depth,
                                 processes=launch.dp_size, sync_bn=args.sync_bn and launch.data_parallel,
                                 calibration_split=calibration_split)


def default_calibration_split(args: argparse.Namespace, layout: Layout, images: int) -> float:
    """--calibration_split as given; without it, 0 for a category that ships validation images (thresholds are
    calibrated on them) or has a labelled test set, else DEFAULT_CALIBRATION_SPLIT (said on the console), so that
    an own part with good images alone still ends with thresholds."""
    category = layout.category
    if args.calibration_split is not None:
        if args.calibration_split > 0 and layout.validation:
            print(f"[{category}] --calibration_split {args.calibration_split:g}: thresholds from held-out train "
                  f"images, not from {layout.validation}")
        return args.calibration_split
    if layout.validation:
        print(f"[{category}] thresholds for {100 * args.false_alarm_rate:g} % false alarms (--false_alarm_rate) will "
              f"be calibrated on {layout.validation}")
        return 0.0
    if has_defect_images(layout):
        return 0.0
    held = round(DEFAULT_CALIBRATION_SPLIT * images)
    if held < 1:
        print(f"[{category}] no labelled test set, and {images} good image(s) are too few to hold any out: the run "
              f"stores no thresholds (give them later with test_draem.py --calibrate GOOD_DIR)")
        return 0.0
    print(f"[{category}] no labelled test set: holding out {held} of {images} good images (--calibration_split "
          f"{DEFAULT_CALIBRATION_SPLIT:g}) to set thresholds for {100 * args.false_alarm_rate:g} % false alarms "
          f"(--false_alarm_rate); --calibration_split 0 trains on all of them")
    return DEFAULT_CALIBRATION_SPLIT


def run_name(args: argparse.Namespace, config: TrainConfig, several: bool) -> str:
    if args.run_name is None:
        return config.run_name()
    return f"{args.run_name}_{config.category}" if several else args.run_name


# ---- evaluation, calibration, preview ------------------------------------------------------------------

def check_finite(first_bad: torch.Tensor, ckpt_path: Path) -> None:
    bad = first_bad.item()
    if bad >= 0:
        kept = f"the last good checkpoint {ckpt_path} is kept" if ckpt_path.exists() else "no checkpoint was written yet"
        raise FloatingPointError(f"loss is NaN or Inf at step {bad + 1}; stopped ({kept})")


def load_scoring_set(args: argparse.Namespace, run: "Run") -> TestSet | None:
    """The test set without the defects the run trains on, read (and checked: layout, every image, masks) before
    the first step, so that a broken one fails in seconds and not after hours of training; None when there is
    none or --eval_every -1."""
    layout = run.layout
    if args.eval_every < 0:
        return None
    if not layout.test:
        print(f"[{layout.category}] no test set in {layout.origin}: training without evaluation")
        return None
    test_set = load_test_set(args.data_path, layout.category, args.image_size, args.workers or None,
                             run.config.bit_depth, run.defects.digests if run.defects else frozenset())
    if test_set.left_out:
        print(f"[{layout.category}] test set: {test_set.left_out_text()}")
    return test_set


def evaluate_category(model: DraemModel, test_set: TestSet, device: torch.device, channel_order: str) -> dict:
    """The test-set metrics, operating points (thresholds), mask coverage and the defect images left out because
    the run trains on them, as the checkpoint stores them."""
    out = evaluate(model, test_set, device, channel_order=channel_order)
    return {**out["metrics"], "operating_points": out["operating_points"], "mask_coverage": out["mask_coverage"],
            "left_out": [str(p) for p in test_set.left_out]}


def calibrate_at_end(model: DraemModel, run: "Run", rate: float, device: torch.device) -> dict:
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


def write_preview(args: argparse.Namespace, run: "Run", sources: torch.Tensor | None) -> Path:
    """--preview: the first N training samples as one labelled PNG."""
    config, name = run.config, run.name
    batch = first_samples(run.images, sources, config, args.preview, run.steps_per_epoch, run.defects)
    h, w = batch.image.shape[-2:]
    title = (f"{name}: first {args.preview} samples | {config.recipe} recipe | {h}x{w}"
             + (f" crops of {config.image_size[0]}x{config.image_size[1]}" if config.train_crop else "")
             + f" | {'textures' if sources is not None else 'Perlin noise'} | {config.bit_depth}-bit"
             + (" | real defects last in each batch" if run.defects else ""))
    path = args.log_path / name / "preview.png"
    real = real_per_step(config.defect_share, config.bs) if run.defects else 0
    own = real - (pasted_per_step(run.defects, real, config.paste_defects) if real else 0)
    kinds = ["own" if i % config.bs >= config.bs - own else "pasted" if i % config.bs >= config.bs - real else ""
             for i in range(len(batch.image))]
    write_png(path, sample_grid(batch.image, batch.augmented, batch.mask, title, real=kinds))
    return path


def defects_per_batch(defects: RealDefects, config: TrainConfig) -> str:
    """'2 per batch of 8 (2 pasted onto good images)': what each step trains on."""
    real = real_per_step(config.defect_share, config.bs)
    pasted = pasted_per_step(defects, real, config.paste_defects)
    return f"{real} per batch of {config.bs}" + (f" ({pasted} pasted onto good images)" if pasted else "")


def format_metrics(metrics: dict) -> str:
    coverage = metrics.get("mask_coverage")  # absent from checkpoints written before masks became optional
    masks = ("" if not coverage or coverage["defect_images_with_mask"] == coverage["defect_images"] else
             f" (pixel metrics over the {coverage['defect_images_with_mask']} of {coverage['defect_images']} "
             f"defect images that have masks)")
    left_out = len(metrics.get("left_out", []))
    scored = (f" (scored on {coverage['defect_images']} of {coverage['defect_images'] + left_out} defect images; "
              f"{left_out} used in training)" if left_out and coverage else "")
    return " ".join(f"{k}={metrics[k]:.3f}" for k in METRICS) + masks + scored


# ---- the loop -----------------------------------------------------------------------------------------

@dataclass
class Run:
    """One category's run as the loop sees it: settings, name and file, what it trains on and is judged on, its
    schedule, and what it has measured so far (the checkpoint stores that too)."""
    config: TrainConfig
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


def plan_run(args: argparse.Namespace, category: str, device: torch.device, launch: Launch, several: bool) -> Run:
    """The run's settings and name, and its training images cached on the device."""
    layout = category_layout(args.data_path, category)
    paths = train_image_paths(args.data_path, category)
    bit_depth = detect_bit_depth(paths, args.workers) if args.bit_depth == "auto" else args.bit_depth
    split = default_calibration_split(args, layout, len(paths))
    config = run_config(args, category, launch, device, bit_depth, split)
    name = run_name(args, config, several)
    kept, held = calibration_holdout(len(paths), config.calibration_split, config.seed)
    images = load_images([paths[i] for i in kept], config.image_size, args.workers, bit_depth).to(device)
    # Under --ddp the global batch is bs x dp_size: every rank draws the same order and trains its slice.
    steps_per_epoch = math.ceil(len(images) / (config.bs * launch.dp_size))
    validation = list_images(layout.validation) if layout.validation else []
    chosen = [] if config.unsupervised else choose_defects(
        layout, config.train_defects, config.pixel_labels, paths,
        torch.Generator().manual_seed(stream_seed(config.seed, "real defects")))
    if config.train_crop and any(d.mask is None for d, _ in chosen):
        raise DataError("--train_crop with defect images that have no mask: a crop may cut the defect out of an "
                        "image labelled defective; give their masks or train without --train_crop")
    if chosen and config.bs < 2:
        raise DataError("--bs 1 leaves no room for real defects beside a simulated sample: use --bs 2 or more")
    defects = load_real_defects(chosen, config.image_size, bit_depth, args.workers)
    return Run(config, name, args.checkpoint_path / f"{name}.pt", layout, images, [paths[i] for i in held],
               validation, steps_per_epoch, defects.to(device) if defects else None)


def resume_if_asked(args: argparse.Namespace, run: Run, training: Training) -> int:
    """Load --resume's checkpoint into the model, optimiser and run; the step to continue from (0: afresh)."""
    path = resume_path(args, run.config, run.checkpoint)
    if path is None:
        return 0
    checkpoint = load_checkpoint(path)
    check_resumable(checkpoint.info, run.config, path, run.total_steps)
    trained = run.defects.digests if run.defects else frozenset()
    if checkpoint.info.trained_digests != trained:
        raise DataError(f"--resume {path}: it trained on {len(checkpoint.info.trained_defects)} real defect image(s), "
                        f"this run has {len(trained)} (other files in train/<type>/ or another --train_defects draw): "
                        f"start a new run")
    checkpoint.load_into(training.model, training.optimizer, training.scaler)
    run.metrics, run.calibration = checkpoint.info.metrics, checkpoint.info.calibration
    print(f"[{run.config.category}] resumed from {path} at step {checkpoint.info.step}")
    return checkpoint.info.step


def save(run: Run, training: Training, done: int) -> None:
    save_training(run.checkpoint, training.model, run.config, done, done // run.steps_per_epoch,
                  run.metrics, training.optimizer, training.scaler, run.calibration,
                  run.defects.files if run.defects else [])


def end_of_epoch(args: argparse.Namespace, run: Run, training: Training, epoch: int, writer: SummaryWriter,
                 device: torch.device) -> None:
    """Save when due, then score the test set and calibrate on the held-out (or validation) images when due, and
    save again (saving first: a failure in scoring never costs the weights)."""
    done, last = (epoch + 1) * run.steps_per_epoch, epoch + 1 == run.config.epochs
    due = last or (args.eval_every > 0 and (epoch + 1) % args.eval_every == 0)
    evaluate_now = run.test_set is not None and due
    calibrate_now = run.calibration_images is not None and last
    if (epoch + 1) % args.save_every == 0 or last or evaluate_now:
        save(run, training, done)
    if evaluate_now or calibrate_now:
        training.model.eval()
    if evaluate_now:
        scored = evaluate_category(training.model, run.test_set, device, run.config.channel_order)
        run.metrics = {"epoch": epoch + 1, **scored}
        for key in METRICS:
            writer.add_scalar(f"test/{key}", run.metrics[key], done)
    if calibrate_now:
        run.calibration = calibrate_at_end(training.model, run, args.false_alarm_rate, device)
    if evaluate_now or calibrate_now:
        save(run, training, done)
        training.model.train()


def train_category(args: argparse.Namespace, category: str, device: torch.device, sources: torch.Tensor | None,
                   stop: StopRequest, launch: Launch = Launch(), several: bool = False) -> Path:
    run = plan_run(args, category, device, launch, several)
    config, recipe, images, steps_per_epoch = run.config, RECIPES[run.config.recipe], run.images, run.steps_per_epoch
    if args.preview:
        return write_preview(args, run, sources)
    if run.held_out or run.validation:
        run.calibration_images = load_images(run.held_out or run.validation, config.image_size, args.workers,
                                             config.bit_depth)
    run.test_set = load_scoring_set(args, run)
    training = build_training(config, device)
    start = resume_if_asked(args, run, training)
    net = prepare_network(training.model, config, args.compile, launch, device)
    writes = launch.writes_outputs
    if writes:
        print(f"[{category}] {len(images)} training images ({config.bit_depth}-bit) cached on {device}"
              + (f", {len(run.held_out)} held out to calibrate thresholds on" if run.held_out else
                 f", {len(run.validation)} validation images to calibrate thresholds on" if run.validation else "")
              + (f"; {run.defects.describe()}, {defects_per_batch(run.defects, config)}" if run.defects else "")
              + f"; {'fp32' if config.amp == 'off' else config.amp + ' autocast'}"
              + (" (--amp auto)" if args.amp == "auto" else "") + f"; run {run.name}")
    # On resume, drop logged events from after the checkpoint (progress that was lost), keep the rest.
    writer = SummaryWriter(args.log_path / run.name, purge_step=start + 1 if start else None) if writes else None
    progress = Progress(category, start, run.total_steps, steps_per_epoch, config.bs * launch.dp_size, shown=writes)
    dtype = AMP_DTYPES[config.amp]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    focal, simulation_g = FocalLoss(), torch.Generator(device)
    first_bad = torch.tensor(-1, device=device)  # first step with a non-finite loss, read at log points only
    order = None
    training.model.train()
    for step in range(start, run.total_steps):
        # schedule: the epoch's batch order and learning rate
        epoch, index = divmod(step, steps_per_epoch)
        if order is None or index == 0:
            order = epoch_order(len(images), config.bs * launch.dp_size, config.seed, epoch, device)
            set_learning_rate(training.optimizer, recipe.learning_rate(config.lr, epoch, config.epochs))

        # batch and simulate: this rank's slice of the batch, anomalies from this step's own stream
        batch = step_batch(images, order, step, sources, config, launch, simulation_g, run.defects)

        # step
        out, total, parts = train_step(net, batch, training.optimizer, training.scaler, autocast, focal,
                                       config.sspcab)
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(total), step, first_bad)
        done = step + 1
        progress.advance()

        # log: the only host syncs of the loop. Under DDP the ranks agree to stop here, so none is left
        # waiting in an all-reduce.
        log_now = done % args.log_every == 0
        stopping = stop.agreed(device) if launch.data_parallel and log_now else stop.requested and not launch.data_parallel
        if log_now or stopping:
            check_finite(first_bad, run.checkpoint)
            log_step(writer, progress, done, total, parts, training.optimizer)

        # end of an epoch: visualise, save, evaluate, calibrate
        if index + 1 == steps_per_epoch:
            check_finite(first_bad, run.checkpoint)
            if args.visualize and writer:
                log_image_grid(writer, batch, out, done)
            if writes:
                end_of_epoch(args, run, training, epoch, writer, device)

        if stopping:
            if writes:
                save(run, training, done)
                writer.close()
            progress.close()
            raise TrainingStopped(f"[{category}] stopped at step {done}; resume with --resume")
    progress.close()
    if launch.data_parallel:
        print(f"[{category}] rank {launch.rank} parameter fingerprint {parameter_fingerprint(training.model)}")
    if writer:
        writer.close()
        print(f"[{category}] checkpoint {run.checkpoint}"
              + (f"  metrics {format_metrics(run.metrics)}" if run.metrics else ""))
    return run.checkpoint


def train(args: argparse.Namespace) -> None:
    if args.demo:
        print(f"demo dataset: {make_demo_dataset()}")
    launch = start_processes(args)
    device = pick_device(launch.device) if launch.device else pick_device(args.device, args.gpu_id)
    categories = resolve_categories(str(args.obj_id), args.data_path)
    several = len(categories) > 1
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
            paths = [train_category(args, category, device, sources, stop, launch, several) for category in categories]
        except TrainingStopped as exc:
            print(exc, file=sys.stderr)
            sys.exit(130)
    if args.preview:
        for path in paths:
            print(f"preview: {path}")
        return
    if launch.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    if launch.writes_outputs:
        print(f"trained {len(paths)} categor{'y' if len(paths) == 1 else 'ies'} in {time.perf_counter() - started:.0f} s;"
              f" TensorBoard: tensorboard --logdir {args.log_path}")
    if args.demo and launch.rank == 0:
        finish_demo(args.data_path, paths, device, args.log_path)


def finish_demo(data_path: Path, checkpoints: list[Path], device: torch.device, log_path: Path) -> None:
    """Score the demo's checkpoints and say where to look."""
    out = Path("results") / "demo"
    score_test_sets(checkpoints, data_path, out, device)
    print(f"demo done. open {out / 'report.html'} (metrics, curves, every test image's panel); "
          f"TensorBoard: tensorboard --logdir {log_path}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv, description=__doc__)
    with one_line_errors(args.debug):
        train(args)


if __name__ == "__main__":
    main()
