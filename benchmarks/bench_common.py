"""What the inference benchmarks share: a randomly initialised checkpoint, and printing + saving results."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_unet import DraemModel, init_weights  # noqa: E402
from training.checkpoint import save_training  # noqa: E402


def random_checkpoint(path: Path, base_width: int, seg_base_width: int, image_size: int) -> DraemModel:
    """Save a seeded, officially initialised model as this project's checkpoint; return the model (eval)."""
    torch.manual_seed(0)
    model = DraemModel(base_width, seg_base_width)
    init_weights(model)
    save_training(path, model, {"category": "bench", "base_width": base_width, "seg_base_width": seg_base_width,
                                "image_size": [image_size, image_size]})
    return model.eval()


def report(config: dict, results: list[dict], json_path: Path | None) -> None:
    print(json.dumps(config))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"config": config, "results": results}, indent=2))


def memory_mib(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, in MiB, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_memory() -> float:
    """Start the peak (VmHWM) afresh at the current resident memory (Linux: /proc/self/clear_refs), so that
    a later peak measures what came after, not imports; returns the current resident memory in MiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return memory_mib("VmRSS")
