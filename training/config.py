"""What a training run is: one dataclass holding every setting that shapes the trained weights.

The training script's flags for these settings, the checkpoint's ``config``, the run's name, the check
that ``--resume`` continues the same run, and the grouping of runs into seed summaries and per-
configuration means all come from ``TrainConfig``: a new field is a new flag, recorded, named and compared.
"""
import argparse
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from data_loader import BIT_DEPTHS, CHANNEL_ORDER, height_width, parse_bit_depth, parse_size
from recipe import RECIPES

AMP_CHOICES = ("auto", "bf16", "fp16", "off")
# Where the data lives is recorded but is not part of what a run is: the same data may sit at another
# path on another machine, and seeds trained there still belong to one configuration.
LOCATIONS = ("data_path", "anomaly_source_path")
# Settings added after run names were first given: left out of the digest at the value every earlier run
# had ("auto" is what an older checkpoint's missing bit_depth reads as), so those names and --resume stay valid.
LATER_DEFAULTS = {"bit_depth": ("auto", 8), "calibration_split": (0.0,)}
NAMED = ("category", "recipe", "image_size", "train_crop", "base_width", "seg_base_width", "sspcab", "epochs", "bs",
         "seed")


def setting(default, help: str, flag: bool = True, **argparse_kwargs):
    """A TrainConfig field and how its flag reads (flag=False: set by the script, not on the command line)."""
    return field(default=default, metadata={"help": help, "flag": flag, "argparse": argparse_kwargs})


@dataclass(frozen=True)
class TrainConfig:
    category: str = setting("", "the category trained (from --obj_id)", flag=False)
    data_path: str = setting(None, "folder holding <category>/train/good/ (MVTec AD layout) or <category>.json "
                                   "(folders anywhere: docs/data.md)", type=Path)
    anomaly_source_path: str | None = setting(
        None, "folder of anomaly-source images, searched recursively (DTD's images/); without it the Perlin noise "
              "itself is the source", type=Path)
    image_size: tuple[int, int] = setting((256, 256), "training size: N (square) or HxW such as 256x640, each side "
                                                      "a multiple of 32", type=parse_size)
    train_crop: tuple[int, int] | None = setting(
        None, "train on a random crop of this size (N or HxW) of each image cached at --image_size; evaluation "
              "runs on the whole image (default: no crop)", type=parse_size)
    base_width: int = setting(128, "reconstructive sub-network width", type=int)
    seg_base_width: int = setting(64, "discriminative sub-network width", type=int)
    recipe: str = setting("official", "; ".join(f"{name}: {r.describe()}" for name, r in RECIPES.items()),
                          choices=sorted(RECIPES))
    sspcab: bool = setting(False, "replace encoder block5 with SSPCAB and add its loss (x0.1)")
    bs: int = setting(8, "batch size per process", type=int)
    lr: float = setting(1e-4, "Adam learning rate", type=float)
    epochs: int = setting(700, "passes over the training images", type=int)
    seed: int = setting(0, "seed for initialisation, batch order and anomaly simulation", type=int)
    amp: str = setting("auto", "mixed precision: auto = bf16 on a GPU that supports it and on a CPU with bf16 "
                               "instructions (AVX512_BF16 or AMX), else off; the checkpoint records what auto chose",
                       choices=AMP_CHOICES)
    processes: int = setting(1, "processes training one model (--ddp under torchrun): global batch = bs x processes",
                             flag=False)
    sync_bn: bool = setting(False, "with --ddp on GPUs: synchronise BatchNorm statistics across ranks")
    channel_order: str = setting(CHANNEL_ORDER, "colour order of the images the networks see", flag=False)
    bit_depth: int | str = setting(
        "auto", f"bits per sample of 16-bit training images ({', '.join(map(str, BIT_DEPTHS))}): the top 8 bits "
                "are kept; auto = from the largest value in train/good (8-bit files are read as they are); the "
                "checkpoint records the depth, and scoring reads images the same way", type=parse_bit_depth)
    calibration_split: float = setting(
        0.0, "share of train/good held out from training (chosen by --seed) to set thresholds on at the end "
             "(see --false_alarm_rate); 0 = train on all (default: 0.1 when the category has neither validation "
             "images, which thresholds are then calibrated on, nor a labelled test set, so that the run still ends "
             "with thresholds; else 0)", type=float)

    # ---- reading and writing --------------------------------------------------------------------------

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides) -> "TrainConfig":
        """The settings among parsed flags (fields without a flag from overrides or their defaults)."""
        given = {f.name: getattr(args, f.name) for f in fields(cls) if f.metadata["flag"]}
        return cls(**(given | overrides))

    @classmethod
    def from_dict(cls, config: dict) -> "TrainConfig":
        """A checkpoint's config; keys older checkpoints lack take their defaults, unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in known})

    def __post_init__(self) -> None:
        """Paths as strings, sizes as (height, width) tuples: one spelling for equal settings."""
        normal = {"data_path": None if self.data_path is None else str(self.data_path),
                  "anomaly_source_path": str(self.anomaly_source_path) if self.anomaly_source_path else None,
                  "image_size": height_width(self.image_size),
                  "train_crop": height_width(self.train_crop) if self.train_crop else None}
        for name, value in normal.items():
            object.__setattr__(self, name, value)  # a frozen dataclass: set once, here

    def to_dict(self) -> dict:
        """Plain values (lists, not tuples): what checkpoints and results.json record."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    # ---- identity -------------------------------------------------------------------------------------

    def identity(self) -> dict:
        """Every setting that changes the trained weights (locations replaced by whether textures are used)."""
        values = {k: v for k, v in self.to_dict().items() if k not in LOCATIONS}
        return values | {"anomaly_sources": "textures" if self.anomaly_source_path else "perlin noise"}

    def differences(self, other: "TrainConfig", ignore: tuple[str, ...] = ()) -> list[str]:
        """'name: mine -> other' for each differing setting of the identity, except those ignored."""
        mine, theirs = self.identity(), other.identity()
        return [f"{k} {fmt(mine[k])} -> {fmt(theirs[k])}" for k in mine if k not in ignore and mine[k] != theirs[k]]

    def digest(self, leave_out: tuple[str, ...] = NAMED) -> str:
        """Six hex digits of the identity's settings other than leave_out."""
        rest = {k: v for k, v in self.identity().items()
                if k not in leave_out and v not in LATER_DEFAULTS.get(k, ())}
        return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()[:6]

    def variant(self, leave_out: tuple[str, ...] = ("category",)) -> str:
        """A readable label of the settings, without those left out; equal labels mean equal settings."""
        h, w = self.image_size
        parts = {"category": self.category, "recipe": self.recipe, "image_size": f"{h}x{w}",
                 "train_crop": f"crop{self.train_crop[0]}x{self.train_crop[1]}" if self.train_crop else "",
                 "widths": f"w{self.base_width}-{self.seg_base_width}", "sspcab": "sspcab" if self.sspcab else "",
                 "epochs": f"ep{self.epochs}",
                 "bs": f"bs{self.bs}", "seed": f"seed{self.seed}"}
        shown = [v for k, v in parts.items() if v and k not in leave_out]
        return "_".join(shown + [self.digest(NAMED + tuple(leave_out))])

    def run_name(self) -> str:
        """DRAEM_<category>_<recipe>_<HxW>[_crop<hxw>]_w<widths>[_sspcab]_ep<epochs>_bs<bs>_seed<seed>_<digest of the rest>."""
        return "DRAEM_" + self.variant(leave_out=())


def fmt(value) -> str:
    if isinstance(value, list):
        return "x".join(map(str, value))
    return str(value)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field that has one, with its help and default."""
    for f in fields(TrainConfig):
        if not f.metadata["flag"]:
            continue
        kwargs = dict(f.metadata["argparse"])
        if f.type is bool:
            kwargs["action"] = "store_true"
        shown = "" if f.default is None or f.default is False or "default:" in f.metadata["help"] else \
            f" (default {fmt(list(f.default)) if isinstance(f.default, tuple) else f.default})"
        parser.add_argument(f"--{f.name}", default=f.default, help=(f.metadata["help"] + shown).replace("%", "%%"),
                            **kwargs)
