"""benchmarks/gpu_check.sh, the one script that measures the GPU figures, run end to end on the CPU at tiny sizes
(GPU_CHECK_TINY=1), so that a module it calls cannot move or change its flags without a failing test."""
import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import ROOT

PROMISED = ["gpu.txt", "bench_full.json", "synthesis.json", "train_category.txt", "test/results.json",
            "test_category.txt", "inference.json"]


def gpu_check(out: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"GPU_CHECK_TINY": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)], env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_gpu_check_runs_every_step_and_writes_every_result_it_promises(tmp_path):
    proc = gpu_check(tmp_path / "out")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "out"
    missing = [name for name in PROMISED if not (out / name).is_file()]
    assert not missing and list((out / "ckpt").glob("*.pt")), missing
    assert json.loads((out / "bench_full.json").read_text())["preset"] == "tiny"
    assert json.loads((out / "synthesis.json").read_text())["batched_samples_per_s"] > 0
    assert [row["images"] for row in json.loads((out / "inference.json").read_text())["results"]] == [4, 8]
    runs = json.loads((out / "test" / "results.json").read_text())["runs"]
    assert len(runs) == 1 and all(0 <= run["image_auroc"] <= 1 for run in runs.values())
    assert proc.stdout.strip().splitlines()[-1].startswith("gpu_check: every step passed")


def test_the_gpu_check_stops_at_the_first_failing_step_and_names_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "data").write_text("a file where the second step writes its dataset folder")
    proc = gpu_check(out)
    assert proc.returncode == 1
    assert "gpu_check: step 'category-sized dataset' failed" in proc.stderr
    assert (out / "bench_full.json").is_file()  # the step before it ran ...
    assert not (out / "synthesis.txt").exists() and not (out / "train_category.txt").exists()  # ... and none after it
