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
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter

import data_loader
import engine
from recipe import RECIPES
from scoring.results import score_test_sets
from training.cli import AMP_DTYPES, add_shared_flags, false_alarm_rate, one_line_errors, pick_device, resolve_amp
from training.demo import DEMO_CATEGORY, DEMO_ROOT, make_demo_dataset
from training.processes import (PLACE, StopRequest, TrainingStopped, batch_slice, ensure_writable, start_processes,
                                stop_on_signals, writes_outputs)
from training.settings import plain_settings, run_name


# ---- configuration: every flag with its default and help; the demo's overrides -----------------------------

AMP_CHOICES = ("auto", "bf16", "fp16", "off")
DEFAULT_CALIBRATION_SPLIT = 0.1  # of train/good, for a category with neither validation images nor a labelled test set


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_draem.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    # ---- the run: what shapes the weights; recorded in the checkpoint, part of the run's name, compared by --resume
    a("--data_path", type=Path, help="folder holding <category>/train/good/ (MVTec AD layout) or <category>.json "
                                     "(folders anywhere: docs/data.md)")
    a("--anomaly_source_path", type=Path, help="folder of anomaly-source images, searched recursively (DTD's "
                                               "images/); without it the Perlin noise itself is the source")
    a("--image_size", type=data_loader.parse_size, default=(256, 256),
      help="training size: N (square) or HxW such as 256x640, each side a multiple of 32 (default 256)")
    a("--train_crop", type=data_loader.parse_size,
      help="train on a random crop of this size (N or HxW) of each image cached at --image_size; evaluation runs on "
           "the whole image (default: no crop)")
    a("--base_width", type=int, default=128, help="reconstructive sub-network width (default 128)")
    a("--seg_base_width", type=int, default=64, help="discriminative sub-network width (default 64)")
    a("--recipe", choices=sorted(RECIPES), default="official",
      help="; ".join(f"{name}: {r.describe()}" for name, r in RECIPES.items()).replace("%", "%%")
           + " (default official)")
    a("--sspcab", action="store_true", help="replace encoder block5 with SSPCAB and add its loss (x0.1)")
    a("--score_loss", type=float, default=0.0, metavar="WEIGHT",
      help="add WEIGHT x binary cross-entropy of each sample's image score (the max of the 21x21 mean-filtered map, "
           "as scored) against whether it holds an anomaly; not in the paper (default 0: off)")
    a("--bs", "--batch_size", type=int, default=8, dest="bs", help="batch size per process (default 8)")
    a("--lr", type=float, default=1e-4, help="Adam learning rate (default 0.0001)")
    a("--epochs", type=int, default=700, help="passes over the training images (default 700)")
    a("--seed", type=int, default=0, help="seed for initialisation, batch order and anomaly simulation (default 0)")
    a("--amp", choices=AMP_CHOICES, default="auto",
      help="mixed precision: auto = bf16 on a GPU that supports it and on a CPU with bf16 instructions (AVX512_BF16 "
           "or AMX), else off; the checkpoint records what auto chose (default auto)")
    a("--sync_bn", action="store_true", help="with --ddp on GPUs: synchronise BatchNorm statistics across ranks")
    add_shared_flags(p, "--bit_depth")
    a("--calibration_split", type=float,
      help="share of train/good held out from training (chosen by --seed) to set thresholds on at the end (see "
           f"--false_alarm_rate); 0 = train on all (default: {DEFAULT_CALIBRATION_SPLIT:g} when the category has "
           "neither validation images, which thresholds are then calibrated on, nor a labelled test set, so that the "
           "run still ends with thresholds; else 0)")
    a("--train_defects", type=int, default=0, metavar="N",
      help="move N of the test set's defect images into training (stratified by defect type, drawn by --seed); "
           "every evaluation of the checkpoint leaves them out. Defects in <category>/train/<type>/ are always "
           "trained on (docs/training.md, Real defects) (default 0)")
    a("--pixel_labels", default="all",
      help="which real training defects keep their masks: all, N (drawn by --seed), or KolektorSDD2's split file "
           "split_N.pyb (those it marks is_segmented); the others are image-level labels (default all)")
    a("--unsupervised", action="store_true",
      help="train on good images alone even where <category>/train/<type>/ holds defect images (the published "
           "unsupervised protocols, such as KolektorSDD2's N = 0)")
    a("--paste_defects", action=argparse.BooleanOptionalAction, default=True,
      help="with real training defects: paste each one that has a mask onto a good training image, which is its "
           "clean target, and train it as a simulated anomaly (reconstruction and focal loss); --no-paste_defects "
           "trains on the defect image itself (focal loss on its mask, no reconstruction loss). Image-level labels "
           "always train on their own image (default on: measured better, docs/training.md)")
    a("--paste_contrast", type=float, default=0.0, metavar="SPREAD",
      help="with pasted defects: scale each one's difference from the brightness around it by a factor drawn in "
           "[1 - SPREAD, 1 + SPREAD], showing fainter and stronger versions of the few defects there are; measured "
           "at 0.5 in docs/training.md (default 0: as it is)")
    a("--defect_share", type=float, default=0.25,
      help="with real training defects: the share of each batch they fill, at least one sample and leaving one "
           "simulated (default 0.25: 2 of 8)")
    # ---- PROCESS_FLAGS: which categories, where the outputs go, how this process runs ------------------------
    a("--obj_id", default="-1", help="category: 0..14 (official MVTec order), -1 for every category under "
                                     "--data_path, or a folder name such as my_part (default -1)")
    a("--run_name", help="name of the run's checkpoint and TensorBoard folder (with several categories: "
                         "NAME_<category>); default: built from the settings, unique per configuration")
    a("--checkpoint_path", type=Path, default=Path("checkpoints"), help="folder for checkpoints (default ./checkpoints)")
    a("--log_path", type=Path, default=Path("logs"), help="folder for TensorBoard runs (default ./logs)")
    a("--visualize", action="store_true", help="also log image grids (input, reconstruction, masks) to TensorBoard")
    a("--gpu_id", type=int, help="CUDA device index (official flag; same as --device cuda:N)")
    add_shared_flags(p, "--device", "--workers")
    a("--compile", action="store_true", help="torch.compile the model (first steps are slower)")
    a("--log_every", type=int, default=50, help="log losses every N steps (default 50)")
    a("--save_every", type=int, default=1, help="save a checkpoint every N epochs (default 1)")
    a("--eval_every", type=int, default=0,
      help="score the test set every N epochs; 0 = at the end only; -1 = never (default 0)")
    a("--resume", nargs="?", const="auto", default=None,
      help="continue this run from its checkpoint, or from the checkpoint PATH given; the settings must match, "
           "except a larger --epochs, which extends the run")
    a("--false_alarm_rate", type=false_alarm_rate, default=0.01,
      help="the share of held-out (--calibration_split) or validation good images the calibrated thresholds may "
           "flag (default 0.01)")
    a("--preview", type=int, metavar="N",
      help="write a PNG grid of the first N simulated training samples (normal image, simulated anomaly, mask), "
           "drawn as the first steps would draw them, print its path and exit without training")
    a("--ddp", action="store_true", help="under torchrun: train one model data-parallel (global batch = --bs x "
                                         "processes) instead of spreading the categories over the processes")
    a("--demo", action="store_true", help="build ./datasets/demo and train a small model on it, then score it; "
                                          "its settings (DEMO) are defaults that any flag given overrides")
    add_shared_flags(p, "--debug")
    return p


# --demo: these defaults instead, any flag given still wins; about two minutes of training on 2 CPU cores.
DEMO = {"data_path": DEMO_ROOT, "anomaly_source_path": DEMO_ROOT / "sources", "obj_id": DEMO_CATEGORY, "epochs": 30,
        "image_size": (128, 128), "base_width": 16, "seg_base_width": 16, "log_every": 8}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, checked; under --demo the DEMO defaults."""
    parser = get_args_parser()
    if parser.parse_known_args(argv)[0].demo:
        parser.set_defaults(**DEMO)
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
    if args.run_name is not None and (not args.run_name or set(args.run_name) & set("/\\:*?\"<>|")):
        parser.error(f"--run_name {args.run_name!r}: use a plain file name (no / \\ : * ? \" < > |)")
    if args.calibration_split is not None and not 0 <= args.calibration_split < 1:
        parser.error(f"--calibration_split {args.calibration_split:g}: expected a share in [0, 1), such as 0.1")
    if args.preview is not None and args.preview < 1:
        parser.error("--preview N: N must be at least 1")
    if args.data_path is None:
        parser.error("--data_path is required (or use --demo)")
    if args.train_defects < 0:
        parser.error("--train_defects N: N must be 0 or more")
    if args.unsupervised and (args.train_defects or args.pixel_labels != "all"):
        parser.error("--unsupervised trains on good images alone: drop --train_defects and --pixel_labels")
    if not 0 < args.defect_share < 1:
        parser.error(f"--defect_share {args.defect_share:g}: expected a share of the batch in (0, 1), such as 0.25")
    if not 0 <= args.paste_contrast < 1:  # also refuses nan
        parser.error(f"--paste_contrast {args.paste_contrast:g}: expected a spread in [0, 1), such as 0.5")
    if not args.score_loss >= 0:  # also refuses nan
        parser.error(f"--score_loss {args.score_loss:g}: expected a weight of 0 (off) or more, such as 0.1")


# Flags that say which categories, where outputs go and how this process runs: not what a run trains, so neither
# stored with the weights nor part of the run's name. Every other flag is.
PROCESS_FLAGS = ("obj_id", "run_name", "checkpoint_path", "log_path", "visualize", "gpu_id", "device", "workers",
                 "compile", "log_every", "save_every", "eval_every", "resume", "false_alarm_rate", "preview", "ddp",
                 "demo", "debug")


def run_config(args: argparse.Namespace, category: str, layout: data_loader.Layout, paths: list[Path],
               device: torch.device) -> argparse.Namespace:
    """This category's run: the flags, with what they leave open decided here and nowhere else (the precision,
    the bit depth, the calibration split, the processes that train one model, the colour order)."""
    config = argparse.Namespace(**vars(args))
    config.category = category
    config.amp = resolve_amp(args.amp, device)
    config.bit_depth = data_loader.detect_bit_depth(paths, args.workers) if args.bit_depth == "auto" else args.bit_depth
    config.calibration_split = default_calibration_split(args, layout, len(paths))
    config.processes = batch_slice(args)[0]  # the global batch is bs x processes
    config.sync_bn = args.sync_bn and args.ddp
    config.channel_order = data_loader.CHANNEL_ORDER  # the colour order the networks see
    return config


def settings(config: argparse.Namespace) -> dict:
    """What the checkpoint records as the run's settings: every flag but the PROCESS_FLAGS, as plain values (and
    not the process's place, which start_processes adds)."""
    return plain_settings({k: v for k, v in vars(config).items() if k not in PROCESS_FLAGS + PLACE})


def default_calibration_split(args: argparse.Namespace, layout: data_loader.Layout, images: int) -> float:
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
    if data_loader.has_defect_images(layout):
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


def name_run(args: argparse.Namespace, config: argparse.Namespace, several: bool) -> str:
    if args.run_name is None:
        return run_name(settings(config))
    return f"{args.run_name}_{config.category}" if several else args.run_name


# ---- one category's run, built in view --------------------------------------------------------------------

def plan_run(args: argparse.Namespace, category: str, device: torch.device, several: bool) -> engine.Run:
    """The run's settings and name, its training images and real defects cached on the device, the good images
    its thresholds are calibrated on, and the test set it is scored on."""
    layout = data_loader.category_layout(args.data_path, category)
    paths = data_loader.train_image_paths(args.data_path, category)
    config = run_config(args, category, layout, paths, device)
    name = name_run(args, config, several)
    kept, held = engine.calibration_holdout(len(paths), config.calibration_split, config.seed)
    images = data_loader.load_images([paths[i] for i in kept], config.image_size, args.workers, config.bit_depth)
    # Under --ddp the global batch is bs x dp_size: every rank draws the same order and trains its slice.
    steps_per_epoch = math.ceil(len(images) / (config.bs * config.processes))
    validation = data_loader.list_images(layout.validation) if layout.validation else []
    run = engine.Run(config, settings(config), name, args.checkpoint_path / f"{name}.pt", layout, images.to(device),
                     [paths[i] for i in held], validation, steps_per_epoch,
                     engine.real_defects(layout, config, paths, device))
    if not args.preview:
        if run.held_out or run.validation:
            run.calibration_images = data_loader.load_images(run.held_out or run.validation, config.image_size,
                                                             args.workers, config.bit_depth)
        run.test_set = engine.scoring_set(run)
    return run


def train_category(args: argparse.Namespace, category: str, device: torch.device, sources: torch.Tensor | None,
                   stop: StopRequest, several: bool = False) -> Path:
    run = plan_run(args, category, device, several)
    if args.preview:
        return engine.write_preview(run, sources)
    config, images, steps_per_epoch = run.config, run.images, run.steps_per_epoch
    model, optimizer, scaler = engine.build_training(config, device)
    start = engine.resume(run, model, optimizer, scaler)
    net = engine.prepare_network(model, config, device)
    writes = writes_outputs(config)
    if writes:
        print(engine.describe_run(run, device, args.amp == "auto"))
    # On resume, drop logged events from after the checkpoint (progress that was lost), keep the rest.
    writer = SummaryWriter(args.log_path / run.name, purge_step=start + 1 if start else None) if writes else None
    progress = engine.Progress(category, start, run.total_steps, steps_per_epoch, config.bs * config.processes, writes)
    dtype = AMP_DTYPES[config.amp]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    simulation_g = torch.Generator(device)
    first_bad = torch.tensor(-1, device=device)  # first step with a non-finite loss, read at log points only
    order = None
    model.train()
    for step in range(start, run.total_steps):
        # schedule: the epoch's batch order and learning rate
        epoch, index = divmod(step, steps_per_epoch)
        if order is None or index == 0:
            order = engine.epoch_order(len(images), config.bs * config.processes, config.seed, epoch, device)
            engine.set_learning_rate(optimizer, RECIPES[config.recipe].learning_rate(config.lr, epoch,
                                                                                             config.epochs))

        # batch and simulate: this rank's slice of the batch, anomalies from this step's own stream
        batch = engine.step_batch(images, order, step, sources, config, simulation_g, run.defects)

        # step: forward under autocast, L2 + SSIM + focal loss in fp32, backward, Adam
        out, total, parts = engine.train_step(net, batch, optimizer, scaler, autocast, config.sspcab,
                                              config.score_loss)
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(total), step, first_bad)
        done = step + 1
        progress.advance()

        # log: the only host syncs of the loop. Under DDP the ranks agree to stop here, so none is left
        # waiting in an all-reduce.
        log_now = done % args.log_every == 0
        stopping = stop.agreed(device) if config.ddp and log_now else stop.requested and not config.ddp
        if log_now or stopping:
            engine.check_finite(first_bad, run.checkpoint)
            engine.log_step(writer, progress, done, total, parts, optimizer)

        # end of an epoch: visualise, save, evaluate, calibrate
        if index + 1 == steps_per_epoch:
            engine.check_finite(first_bad, run.checkpoint)
            if args.visualize and writer:
                engine.log_image_grid(writer, batch, out, done)
            if writes:
                engine.end_of_epoch(run, model, optimizer, scaler, epoch, writer, device)

        if stopping:
            if writes:
                engine.save(run, model, optimizer, scaler, done)
                writer.close()
            progress.close()
            raise TrainingStopped(f"[{category}] stopped at step {done}; resume with --resume")
    progress.close()
    if config.ddp:
        print(f"[{category}] rank {config.rank} parameter fingerprint {engine.parameter_fingerprint(model)}")
    if writer:
        writer.close()
        print(f"[{category}] checkpoint {run.checkpoint}"
              + (f"  metrics {engine.format_metrics(run.metrics)}" if run.metrics else ""))
    return run.checkpoint


def main(args: argparse.Namespace) -> None:
    with one_line_errors(args.debug):  # known problems: one line on stderr, exit status 2 (--debug: the traceback)
        if args.demo:
            print(f"demo dataset: {make_demo_dataset()}")
        start_processes(args)
        device = pick_device(args.process_device) if args.process_device else pick_device(args.device, args.gpu_id)
        categories = data_loader.resolve_categories(str(args.obj_id), args.data_path)
        several = len(categories) > 1
        if args.world_size > 1 and not args.ddp:  # each process trains its share, one after another
            categories = categories[args.rank::args.world_size]
        for folder, flag in ((args.checkpoint_path, "--checkpoint_path"), (args.log_path, "--log_path")):
            ensure_writable(folder, flag)
        if args.anomaly_source_path is None:
            warnings.warn("no --anomaly_source_path: the Perlin noise itself is the anomaly source (as in anomalib); "
                          "the paper used DTD textures", stacklevel=1)
            sources = None
        else:
            # the simulation works on what a step trains on: the crop when there is one
            sources = data_loader.load_anomaly_sources(args.anomaly_source_path, args.train_crop or args.image_size,
                                                       args.workers).to(device)
            print(f"{len(sources)} anomaly-source images cached on {device}")
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        started = time.perf_counter()
        with stop_on_signals() as stop:
            try:
                paths = [train_category(args, c, device, sources, stop, several) for c in categories]
            except TrainingStopped as exc:
                print(exc, file=sys.stderr)
                sys.exit(130)
        if args.preview:
            for path in paths:
                print(f"preview: {path}")
            return
        if args.world_size > 1:
            dist.barrier()
            dist.destroy_process_group()
        if writes_outputs(args):
            print(f"trained {len(paths)} categor{'y' if len(paths) == 1 else 'ies'} in "
                  f"{time.perf_counter() - started:.0f} s; TensorBoard: tensorboard --logdir {args.log_path}")
        if args.demo and args.rank == 0:
            out = Path("results") / "demo"
            score_test_sets(paths, args.data_path, out, device)
            print(f"demo done. open {out / 'report.html'} (metrics, curves, every test image's panel); "
                  f"TensorBoard: tensorboard --logdir {args.log_path}")


if __name__ == "__main__":
    main(parse_args())
