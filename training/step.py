"""What one optimisation step needs: the model and optimiser, the step-derived random streams (batch order,
anomaly simulation, the calibration hold-out), the batch a step trains on, and the step itself."""
import hashlib
import math
from dataclasses import dataclass, fields

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from data_loader import DataError
from loss import FocalLoss, draem_loss
from model_unet import DraemModel, DraemOutput, init_weights
from perlin import SyntheticBatch, random_crops, simulate_anomalies
from recipe import RECIPES
from training.cli import cpu_capabilities
from training.config import TrainConfig
from training.defects import RealDefects, draw_real, paste, pasted_per_step, real_per_step
from training.processes import Launch

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def resolve_amp(amp: str, device: torch.device) -> str:
    """--amp auto as what it means on this device: bf16 on a GPU that supports it and on a CPU with bf16
    instructions (AVX512_BF16 or AMX: about twice the fp32 step rate, docs/training.md), else off."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "off"
    return "bf16" if device.type == "cpu" and cpu_capabilities()["bf16"] else "off"


@dataclass
class Training:
    """What the optimisation updates and a checkpoint restores."""
    model: DraemModel
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler


def build_training(config: TrainConfig, device: torch.device) -> Training:
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's global RNG
        torch.manual_seed(config.seed)
        model = DraemModel(config.base_width, config.seg_base_width, config.sspcab)
        init_weights(model)
    model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    return Training(model, optimizer, scaler)


def stream_seed(seed: int, *place: object) -> int:
    """The seed of one random stream (an epoch's batch order, a step's simulation on one rank): a function
    of the run's seed and the place alone, so a checkpoint needs only its step to resume exactly."""
    return int.from_bytes(hashlib.sha256(repr((seed, *place)).encode()).digest()[:8], "little") >> 1


def epoch_order(n: int, batch_size: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """(steps, batch_size) image indices: a random permutation, the last batch topped up with random images."""
    g = torch.Generator(device).manual_seed(stream_seed(seed, "order", epoch))
    steps = math.ceil(n / batch_size)
    order = torch.randperm(n, generator=g, device=device)
    extra = torch.randint(0, n, (steps * batch_size - n,), generator=g, device=device)
    return torch.cat((order, extra)).view(steps, batch_size)


def calibration_holdout(n: int, share: float, seed: int) -> tuple[list[int], list[int]]:
    """--calibration_split: (training, held-out) indices into the sorted train/good files; which ones are
    held out depends on the seed alone, so a resumed or repeated run holds out the same images."""
    if share == 0:
        return list(range(n)), []
    held = round(share * n)
    if not 0 < held < n:
        raise DataError(f"--calibration_split {share:g} of {n} training images holds out {held}: it must leave at "
                        f"least one image for each of training and calibration")
    g = torch.Generator().manual_seed(stream_seed(seed, "calibration"))
    order = torch.randperm(n, generator=g)
    return sorted(order[held:].tolist()), sorted(order[:held].tolist())


@dataclass
class Batch(SyntheticBatch):
    """What one step trains on: simulated samples, the last `pasted` of them real defects pasted onto good images
    (clean target: the good image), then `real` real defect images as they are (image = their input: no clean
    target, so no reconstruction loss), whose pixel labels are known where has_mask is true."""
    real: int = 0
    has_mask: torch.Tensor | None = None  # (B,) bool, with real defects only
    pasted: int = 0


def step_batch(images: torch.Tensor, order: torch.Tensor, step: int, sources: torch.Tensor | None,
               config: TrainConfig, launch: Launch, generator: torch.Generator,
               defects: RealDefects | None = None) -> Batch:
    """What step trains on: this rank's slice of its batch in the epoch's order (epoch_order: one row per step),
    cropped when the run crops, with anomalies simulated from the step's own random stream. With real defects,
    they take the batch's last real_per_step places, drawn from their own stream of the step."""
    normal = images[order[step % len(order)].view(launch.dp_size, config.bs)[launch.dp_rank]]
    real = real_per_step(config.defect_share, config.bs) if defects is not None else 0
    pasted = pasted_per_step(defects, real, config.paste_defects) if real else 0
    own = real - pasted  # the pasted ones keep their good image: it is their clean target
    normal = normal[:len(normal) - own]
    generator.manual_seed(stream_seed(config.seed, "simulation", launch.dp_rank, step))
    if config.train_crop:
        normal = random_crops(normal, config.train_crop, generator)
    simulated = simulate_anomalies(normal, sources, config.recipe, generator)
    if not real:
        return Batch(simulated.image, simulated.augmented, simulated.mask)
    generator.manual_seed(stream_seed(config.seed, "real defects", launch.dp_rank, step))
    recipe = RECIPES[config.recipe]
    augmented, mask = simulated.augmented, simulated.mask
    if pasted:
        defect, defect_mask, _ = draw_real(defects, pasted, recipe, config.train_crop, generator, defects.pools[True])
        kept = len(normal) - pasted
        augmented = torch.cat((augmented[:kept], paste(defect, defect_mask, simulated.image[kept:])))
        mask = torch.cat((mask[:kept], defect_mask))
    if not own:
        return Batch(simulated.image, augmented, mask, 0, None, pasted)
    image, own_mask, has_mask = draw_real(defects, own, recipe, config.train_crop, generator,
                                          defects.pools[False] if config.paste_defects else None)
    return Batch(torch.cat((simulated.image, image)), torch.cat((augmented, image)), torch.cat((mask, own_mask)), own,
                 torch.cat((torch.ones(len(normal), dtype=torch.bool, device=image.device), has_mask)), pasted)


def first_samples(images: torch.Tensor, sources: torch.Tensor | None, config: TrainConfig, count: int,
                  steps_per_epoch: int, defects: RealDefects | None = None) -> SyntheticBatch:
    """The first count samples the first steps train on (--preview), drawn exactly as the loop draws them (real
    defects, when the run has them, last in each batch: their image is their input, their mask the target)."""
    generator, parts, launch = torch.Generator(images.device), [], Launch()
    for step in range(math.ceil(count / config.bs)):
        order = epoch_order(len(images), config.bs * launch.dp_size, config.seed, step // steps_per_epoch, images.device)
        parts.append(step_batch(images, order, step, sources, config, launch, generator, defects))
    return SyntheticBatch(*(torch.cat([getattr(b, f.name) for b in parts])[:count] for f in fields(SyntheticBatch)))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def prepare_network(model: DraemModel, config: TrainConfig, compile: bool, launch: Launch,
                    device: torch.device) -> nn.Module:
    """What the step calls: the model, maybe with SyncBatchNorm, compiled and wrapped for DDP."""
    if launch.data_parallel and config.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = torch.compile(model) if compile else model
    if launch.data_parallel:
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    return net


def parameter_fingerprint(model: nn.Module) -> str:
    """A digest of every parameter's bytes: equal on all DDP ranks when they stayed in step."""
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def train_step(net, batch: Batch, optimizer, scaler, autocast, focal: FocalLoss,
               sspcab: bool) -> tuple[DraemOutput, torch.Tensor, dict]:
    """One optimisation step on both sub-networks; the loss is computed in fp32 outside autocast."""
    with autocast:
        # channels_last (NHWC) is faster for these convolutions on GPUs (tensor cores) and on the CPU (oneDNN)
        out = net(batch.augmented.contiguous(memory_format=torch.channels_last))
    total, parts = draem_loss(out.reconstruction.float(), batch.image, out.logits.float(), batch.mask,
                              *((out.block5_input.float(), out.block5_output.float()) if sspcab else ()), focal=focal,
                              real=batch.real, has_mask=batch.has_mask, pasted=batch.pasted)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    scaler.step(optimizer)
    scaler.update()
    return out, total, parts
