import contextlib
import importlib
import io
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--image_size", "32", "--base_width", "4", "--seg_base_width", "4", "--bs", "4", "--log_every", "2",
        "--workers", "2", "--device", "cpu"]


def run_script(script: str, *args, cwd: Path, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def call_script(script: str, *args, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """A script's main(args) in this process, its exit status and printed output as a subprocess of it would give
    them (a subprocess spends seconds importing torch). For what a fresh process alone shows (signals, import
    side effects, a missing package) use run_script; an uncaught exception here fails the test as a traceback
    would."""
    module = importlib.import_module(Path(script).stem)
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            module.main(module.parse_args([str(a) for a in args]))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    if check and code != 0:
        raise AssertionError(f"{script} exited {code}\nstdout:\n{out.getvalue()[-3000:]}\nstderr:\n{err.getvalue()[-3000:]}")
    return subprocess.CompletedProcess([script, *map(str, args)], code, out.getvalue(), err.getvalue())


def tiny_dataset(root: Path) -> Path:
    from training.demo import make_demo_dataset
    return make_demo_dataset(root, train=12, test_good=4, per_defect=2, sources=6)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def export_args(checkpoint: Path, out: Path, *flags):
    """export_draem.py's flags for writing out (its format from its suffix) from checkpoint, as deploy/ takes them."""
    import export_draem
    fmt = "openvino" if Path(out).suffix == ".xml" else "onnx"
    return export_draem.parse_args(["--checkpoint", str(checkpoint), "--out", str(out), "--format", fmt,
                                    *map(str, flags)])


def loss_on(reconstruction, clean, logits, mask, block5=None, score_weight=0.0, **real):
    """draem_loss on bare tensors: block5 (input, output) adds the SSPCAB term; real: Batch's real-defect fields."""
    from loss import draem_loss
    from model_unet import DraemOutput
    from perlin import Batch
    out = DraemOutput(reconstruction, logits, *(block5 or (None, None)))
    return draem_loss(out, Batch(clean, reconstruction, mask, **real), sspcab=block5 is not None,
                      score_weight=score_weight)


def run_settings(**changes) -> dict:
    """A run's settings as train_draem.py stores them in a checkpoint: its flags' defaults, what it decides for a
    run (a category, fp32, 8-bit, no calibration split, one process), and changes."""
    import argparse
    import train_draem
    decided = {"category": "part", "amp": "off", "bit_depth": 8, "calibration_split": 0.0, "processes": 1,
               "channel_order": "BGR", "data_path": "data"}
    args = vars(train_draem.parse_args(["--data_path", "data"])) | decided | changes
    return train_draem.settings(argparse.Namespace(**args))
