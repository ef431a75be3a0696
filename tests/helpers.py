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


def tiny_dataset(root: Path) -> Path:
    from training.demo import make_demo_dataset
    return make_demo_dataset(root, train=12, test_good=4, per_defect=2, sources=6)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
