"""The training configuration on one screen: every flag of train_draem.py with its default and help, the demo's
overrides, and ``TrainConfig``, the settings among them that shape the trained weights.

``TrainConfig`` is what a checkpoint records as its ``config``, what names a run, what ``--resume`` compares and
what groups runs into seed summaries and per-configuration means. A new setting: its flag in the first group of
``get_args_parser``, its field in ``TrainConfig``; and, if runs were named before it existed, its earlier value in
``ADDED_LATER``, so that their names (and ``--resume``) stay valid.
"""
import argparse
import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from data_loader import BIT_DEPTHS, CHANNEL_ORDER, height_width, parse_bit_depth, parse_size
from recipe import RECIPES
from training.demo import DEMO_CATEGORY, DEMO_ROOT

AMP_CHOICES = ("auto", "bf16", "fp16", "off")
DEFAULT_CALIBRATION_SPLIT = 0.1  # of train/good, for a category with neither validation images nor a labelled test set


def false_alarm_rate(text: str) -> float:
    """The type of --false_alarm_rate (train_draem.py and test_draem.py): a share in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if 0 < value < 1:
        return value
    raise argparse.ArgumentTypeError(f"expected a share of good images in (0, 1) such as 0.01 for 1 %, not {text!r}")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_draem.py", formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    # ---- the run: TrainConfig, recorded in the checkpoint, named and compared on --resume ----------------
    a("--data_path", type=Path, help="folder holding <category>/train/good/ (MVTec AD layout) or <category>.json "
                                     "(folders anywhere: docs/data.md)")
    a("--anomaly_source_path", type=Path, help="folder of anomaly-source images, searched recursively (DTD's "
                                               "images/); without it the Perlin noise itself is the source")
    a("--image_size", type=parse_size, default=(256, 256),
      help="training size: N (square) or HxW such as 256x640, each side a multiple of 32 (default 256)")
    a("--train_crop", type=parse_size, help="train on a random crop of this size (N or HxW) of each image cached at "
                                            "--image_size; evaluation runs on the whole image (default: no crop)")
    a("--base_width", type=int, default=128, help="reconstructive sub-network width (default 128)")
    a("--seg_base_width", type=int, default=64, help="discriminative sub-network width (default 64)")
    a("--recipe", choices=sorted(RECIPES), default="official",
      help="; ".join(f"{name}: {r.describe()}" for name, r in RECIPES.items()).replace("%", "%%")
           + " (default official)")
    a("--sspcab", action="store_true", help="replace encoder block5 with SSPCAB and add its loss (x0.1)")
    a("--bs", type=int, default=8, help="batch size per process (default 8)")
    a("--lr", type=float, default=1e-4, help="Adam learning rate (default 0.0001)")
    a("--epochs", type=int, default=700, help="passes over the training images (default 700)")
    a("--seed", type=int, default=0, help="seed for initialisation, batch order and anomaly simulation (default 0)")
    a("--amp", choices=AMP_CHOICES, default="auto",
      help="mixed precision: auto = bf16 on a GPU that supports it and on a CPU with bf16 instructions (AVX512_BF16 "
           "or AMX), else off; the checkpoint records what auto chose (default auto)")
    a("--sync_bn", action="store_true", help="with --ddp on GPUs: synchronise BatchNorm statistics across ranks")
    a("--bit_depth", type=parse_bit_depth, default="auto",
      help=f"bits per sample of 16-bit training images ({', '.join(map(str, BIT_DEPTHS))}): the top 8 bits are kept; "
           "auto = from the largest value in train/good (8-bit files are read as they are); the checkpoint records "
           "the depth, and scoring reads images the same way (default auto)")
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
    a("--defect_share", type=float, default=0.25,
      help="with real training defects: the share of each batch they fill, at least one sample and leaving one "
           "simulated (default 0.25: 2 of 8)")
    # ---- which categories, where the outputs go, how this process runs ---------------------------------------
    a("--obj_id", default="-1", help="category: 0..14 (official MVTec order), -1 for every category under "
                                     "--data_path, or a folder name such as my_part (default -1)")
    a("--run_name", help="name of the run's checkpoint and TensorBoard folder (with several categories: "
                         "NAME_<category>); default: built from the settings, unique per configuration")
    a("--checkpoint_path", type=Path, default=Path("checkpoints"), help="folder for checkpoints (default ./checkpoints)")
    a("--log_path", type=Path, default=Path("logs"), help="folder for TensorBoard runs (default ./logs)")
    a("--visualize", action="store_true", help="also log image grids (input, reconstruction, masks) to TensorBoard")
    a("--gpu_id", type=int, help="CUDA device index (official flag; same as --device cuda:N)")
    a("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    a("--workers", type=int, default=0, help="threads that decode images (default: up to 8)")
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
    a("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


# --demo: these defaults instead, any flag given still wins; about two minutes of training on 2 CPU cores.
DEMO = {"data_path": DEMO_ROOT, "anomaly_source_path": DEMO_ROOT / "sources", "obj_id": DEMO_CATEGORY, "epochs": 30,
        "image_size": (128, 128), "base_width": 16, "seg_base_width": 16, "log_every": 8}


def parse_args(argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """The flags, checked; under --demo the DEMO defaults."""
    parser = get_args_parser()
    parser.description = description
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


# Each setting's value when nothing gives it: its flag's default; for the three no flag gives, what the script
# sets (category from --obj_id, processes from torchrun) and what checkpoints older than calibration_split did.
D = {a.dest: a.default for a in get_args_parser()._actions} | {
    "category": "", "processes": 1, "channel_order": CHANNEL_ORDER, "calibration_split": 0.0}
# Where the data lives is recorded but is not part of what a run is: the same data may sit at another
# path on another machine, and seeds trained there still belong to one configuration.
LOCATIONS = ("data_path", "anomaly_source_path")
# The settings a run's name spells out; a digest of the rest follows them.
NAMED = ("category", "recipe", "image_size", "train_crop", "base_width", "seg_base_width", "sspcab", "epochs", "bs",
         "seed")
# Settings added after runs were first named: left out of the digest at the value every earlier run had ("auto"
# is what an older checkpoint's missing bit_depth reads as), so that those names and --resume stay valid.
ADDED_LATER = {"bit_depth": ("auto", 8), "calibration_split": (0.0,), "train_defects": (0,), "pixel_labels": ("all",),
               "defect_share": (0.25,), "unsupervised": (False,), "paste_defects": (True,)}


@dataclass(frozen=True)
class TrainConfig:
    """The settings that shape the trained weights (each a flag above, but category, processes, channel_order)."""
    category: str = D["category"]
    data_path: str | None = D["data_path"]
    anomaly_source_path: str | None = D["anomaly_source_path"]
    image_size: tuple[int, int] = D["image_size"]
    train_crop: tuple[int, int] | None = D["train_crop"]
    base_width: int = D["base_width"]
    seg_base_width: int = D["seg_base_width"]
    recipe: str = D["recipe"]
    sspcab: bool = D["sspcab"]
    bs: int = D["bs"]
    lr: float = D["lr"]
    epochs: int = D["epochs"]
    seed: int = D["seed"]
    amp: str = D["amp"]  # what --amp auto chose on the training device
    processes: int = D["processes"]  # that trained one model (--ddp): the global batch is bs x processes
    sync_bn: bool = D["sync_bn"]
    channel_order: str = D["channel_order"]  # the colour order the networks see
    bit_depth: int | str = D["bit_depth"]  # what auto found
    calibration_split: float = D["calibration_split"]  # what the script decided for the category
    train_defects: int = D["train_defects"]
    pixel_labels: str = D["pixel_labels"]
    defect_share: float = D["defect_share"]
    unsupervised: bool = D["unsupervised"]
    paste_defects: bool = D["paste_defects"]

    # ---- reading and writing --------------------------------------------------------------------------

    @classmethod
    def from_args(cls, args: argparse.Namespace, **decided) -> "TrainConfig":
        """The settings among parsed flags, with those the script decides (category, amp, ...) as given."""
        return cls(**({f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)} | decided))

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
        labels = self.pixel_labels  # a split file is named by its file name, wherever it lies
        return values | {"anomaly_sources": "textures" if self.anomaly_source_path else "perlin noise",
                         "pixel_labels": labels if labels == "all" or labels.isdigit() else Path(labels).name}

    def differences(self, other: "TrainConfig", ignore: tuple[str, ...] = ()) -> list[str]:
        """'name: mine -> other' for each differing setting of the identity, except those ignored."""
        mine, theirs = self.identity(), other.identity()
        return [f"{k} {fmt(mine[k])} -> {fmt(theirs[k])}" for k in mine if k not in ignore and mine[k] != theirs[k]]

    def digest(self, leave_out: tuple[str, ...] = NAMED) -> str:
        """Six hex digits of the identity's settings other than leave_out."""
        rest = {k: v for k, v in self.identity().items()
                if k not in leave_out and v not in ADDED_LATER.get(k, ())}
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

