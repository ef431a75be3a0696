"""--resume: which checkpoint continues this run, and whether it may (same settings; a larger --epochs extends)."""
import argparse
import re
import sys
from pathlib import Path

from recipe import RECIPES
from training.checkpoint import CheckpointError, ModelInfo
from training.config import TrainConfig


def resume_path(args: argparse.Namespace, config: TrainConfig, ckpt_path: Path) -> Path | None:
    """The checkpoint --resume continues from; None to start afresh.

    --resume PATH: that file. --resume alone: this run's own checkpoint, else the one checkpoint of the same run
    trained for another --epochs (extended by check_resumable's rules); two such are an error naming both, and
    none is said in one line before starting afresh."""
    if not args.resume:
        return None
    if args.resume != "auto":
        path = Path(args.resume)
        if not path.is_file():
            raise CheckpointError(f"--resume {path}: no such checkpoint")
        return path
    if ckpt_path.is_file():
        return ckpt_path
    others = other_lengths(ckpt_path, config) if args.run_name is None else []
    if len(others) > 1:
        raise CheckpointError(f"--resume: {len(others)} checkpoints of this run with other --epochs "
                              f"({', '.join(map(str, others))}): name the one to continue with --resume PATH")
    if not others:
        print(f"[{config.category}] --resume: no checkpoint of this run in {ckpt_path.parent} ({ckpt_path.name}, "
              f"or the same run with other --epochs): starting afresh", file=sys.stderr)
        return None
    return others[0]


def other_lengths(ckpt_path: Path, config: TrainConfig) -> list[Path]:
    """Checkpoints beside ckpt_path of this very run trained for another --epochs: run names that differ in
    the epoch count alone (the name's digest covers every other setting)."""
    head, tail = ckpt_path.name.split(f"_ep{config.epochs}_", 1)
    same_run = re.compile(rf"{re.escape(head)}_ep\d+_{re.escape(tail)}")
    return [p for p in sorted(ckpt_path.parent.glob("*.pt")) if p != ckpt_path and same_run.fullmatch(p.name)]


def check_resumable(info: ModelInfo, config: TrainConfig, path: Path, total_steps: int) -> None:
    """--resume continues the same run: equal settings, except --epochs, which may extend it."""
    stored = info.train_config
    if info.source != "draem" or stored is None:
        raise CheckpointError(f"--resume {path}: not a training checkpoint of this project")
    # Older checkpoints recorded --amp as given ("auto"), not what it chose on their device, and no bit depth
    # (they read 16-bit files at full range, which 8-bit files are unaffected by).
    ignore = ("epochs",) + (("amp",) if stored.amp == "auto" else ()) + (
        ("bit_depth",) if stored.bit_depth == "auto" and config.bit_depth in (8, 16) else ())
    differences = stored.differences(config, ignore=ignore)
    if differences:
        raise CheckpointError(f"--resume {path}: that run has other settings ({'; '.join(differences)}); resume "
                              f"with its settings, or train this configuration under its own name")
    if info.step >= total_steps:
        raise CheckpointError(f"--resume {path}: the checkpoint is at step {info.step}, and --epochs {config.epochs} "
                              f"ends at step {total_steps}: give more --epochs to extend it")
    for location in ("data_path", "anomaly_source_path"):
        if getattr(stored, location) != getattr(config, location):
            print(f"note: --{location} {getattr(config, location)} (the checkpoint trained on "
                  f"{getattr(stored, location)})", file=sys.stderr)
    if stored.epochs != config.epochs:
        recipe = RECIPES[config.recipe]
        milestones = ", ".join(str(round(f * config.epochs)) for f in recipe.lr_milestones) or "none"
        print(f"note: extending a {stored.epochs}-epoch run to {config.epochs} epochs: from step {info.step} the "
              f"learning rate follows the {config.epochs}-epoch schedule (x{recipe.lr_decay:g} at epochs "
              f"{milestones})", file=sys.stderr)
