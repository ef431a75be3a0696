"""What people see while a run trains: a progress bar or plain log lines, and TensorBoard scalars and images."""
import sys
import time

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from model_unet import DraemOutput
from perlin import SyntheticBatch


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


def log_image_grid(writer: SummaryWriter, batch: SyntheticBatch, out: DraemOutput, step: int) -> None:
    predicted = out.anomaly_map[:, None]
    grid = torch.cat([to_rgb_grid(t) for t in (batch.augmented, out.reconstruction, batch.mask, predicted)])
    writer.add_images("train/augmented_reconstruction_target_predicted", grid, step)
