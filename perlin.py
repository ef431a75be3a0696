"""DRAEM's anomaly simulation for a whole batch, on the images' device.

Per sample, as the official code's data loader does it (the paper, section 3.1): maybe rotate the normal
image; draw a Perlin noise mask (lattice 2^a x 2^b, a, b in 0..5, rotated, thresholded at 0.5); augment
a random anomaly-source image with 3 distinct of 10 augmenters in random order; blend it into the masked
region with factor beta; keep a share of the batch anomaly-free (recipe.py holds the numbers). Every
random draw comes from one ``torch.Generator``, so a seeded CPU batch is repeatable, and nothing leaves
the device: no per-sample NumPy, no host syncs.

Where torchvision or a direct formula differs from the official imgaug augmenters:
- hue: imgaug adds U(-50, 50) on its 0..255 hue circle (about +-70 degrees); here the same angle is a
  rotation of the chroma plane in YIQ space, a batched 3x3 matrix per sample instead of an HSV round trip.
- saturation: imgaug adds U(-50, 50) to S (0..255); here a per-sample factor 1 + U(-50, 50) / 127.5 blends
  with the grey image (torchvision's adjust_saturation), a multiplicative change of similar size.
- autocontrast cuts the same percentage from both histogram ends per channel (PIL semantics), on 256 bins.
The augmented source only has to look unlike the normal image inside the mask; these variants give
the same variety of colours, contrasts and textures, which is what the discriminator learns from.
"""
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from recipe import RECIPES, Recipe

MAX_LOG_RES = 5  # lattice resolutions 2^0 .. 2^5 per axis


@dataclass
class Batch:
    """What one training step trains on. simulate_anomalies makes simulated samples alone; with real defects
    (engine.step_batch) the last `pasted` simulated places hold real defects pasted onto good images (clean target:
    the good image), then come `real` real defect images as they are (image = their input: no clean target, so no
    reconstruction loss), whose pixel labels are known where has_mask is true."""
    image: Tensor  # (B, 3, H, W) float in [0, 1]: the clean target (rotated when the normal image was)
    augmented: Tensor  # (B, 3, H, W): the network input
    mask: Tensor  # (B, 1, H, W) float {0, 1}
    real: int = 0
    has_mask: Tensor | None = None  # (B,) bool, with real defects only
    pasted: int = 0


def uniform(shape: tuple[int, ...], low: float, high: float, g: torch.Generator | None, device) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=g, device=device)


def rotate(images: Tensor, degrees: Tensor, mode: str = "bilinear") -> Tensor:
    """Rotate each image of (B, C, H, W) about its centre by its own angle; zero fill outside.

    The rotation is rigid in pixels, so shapes keep their proportions when H != W.
    """
    theta = degrees.to(images.dtype) * (math.pi / 180)
    height, width = images.shape[-2:]
    # Pixel centres in pixels from the image centre, rotated per sample by broadcasting (cheaper than
    # affine_grid's batched matrix product), then in grid_sample's [-1, 1] coordinates (align_corners=False).
    ys = torch.arange(height, device=images.device, dtype=images.dtype)[None, :, None] - (height - 1) / 2
    xs = torch.arange(width, device=images.device, dtype=images.dtype)[None, None, :] - (width - 1) / 2
    cos, sin = theta.cos()[:, None, None], theta.sin()[:, None, None]
    grid = torch.stack(((cos * xs - sin * ys) / (width / 2), (sin * xs + cos * ys) / (height / 2)), dim=-1)
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)


def random_crops(images: Tensor, size: tuple[int, int], g: torch.Generator | None) -> Tensor:
    """One random (height, width) window per image of (B, C, H, W), drawn on the images' device."""
    batch, _, height, width = images.shape
    crop_h, crop_w = size
    top = torch.randint(0, height - crop_h + 1, (batch, 1), generator=g, device=images.device)
    left = torch.randint(0, width - crop_w + 1, (batch, 1), generator=g, device=images.device)
    rows = (top + torch.arange(crop_h, device=images.device))[:, None, :, None]  # (B, 1, h, 1)
    cols = (left + torch.arange(crop_w, device=images.device))[:, None, None, :]  # (B, 1, 1, w)
    channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    samples = torch.arange(batch, device=images.device)[:, None, None, None]
    return images[samples, channels, rows, cols]


def fade(t: Tensor) -> Tensor:
    return ((6 * t - 15) * t + 10) * t * t * t


def perlin_noise(batch: int, height: int, width: int, g: torch.Generator | None = None, device=None,
                 log_res: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """(B, H, W) 2-D Perlin noise, lattice resolution (2^a, 2^b) drawn per sample, output scaled by sqrt(2)."""
    if log_res is None:
        log_res = (torch.randint(0, MAX_LOG_RES + 1, (batch,), generator=g, device=device),
                   torch.randint(0, MAX_LOG_RES + 1, (batch,), generator=g, device=device))
    res_y, res_x = 2.0 ** log_res[0].float(), 2.0 ** log_res[1].float()
    lattice = 2 ** MAX_LOG_RES + 1
    angles = 2 * math.pi * torch.rand(batch, lattice, lattice, generator=g, device=device)
    gradients = torch.stack((angles.cos(), angles.sin()), dim=1)  # (B, 2, L, L); component 0 pairs with rows

    pos_y = torch.arange(height, device=device) / height * res_y[:, None]  # (B, H), lattice units
    pos_x = torch.arange(width, device=device) / width * res_x[:, None]  # (B, W)
    cell_y, cell_x = pos_y.floor().long(), pos_x.floor().long()
    fy, fx = (pos_y - cell_y)[:, :, None], (pos_x - cell_x)[:, None, :]  # (B, H, 1), (B, 1, W)

    def corner(dy: int, dx: int) -> Tensor:
        # Gather lattice rows, then columns: two small gathers instead of one per pixel and corner.
        rows = torch.gather(gradients, 2, (cell_y + dy)[:, None, :, None].expand(-1, 2, -1, lattice))
        grad = torch.gather(rows, 3, (cell_x + dx)[:, None, None, :].expand(-1, 2, height, -1))  # (B, 2, H, W)
        return grad[:, 0] * (fy - dy) + grad[:, 1] * (fx - dx)

    ty, tx = fade(fy), fade(fx)
    top = torch.lerp(corner(0, 0), corner(1, 0), ty)
    bottom = torch.lerp(corner(0, 1), corner(1, 1), ty)
    return math.sqrt(2) * torch.lerp(top, bottom, tx)


def anomaly_masks(batch: int, height: int, width: int, g: torch.Generator | None, device) -> tuple[Tensor, Tensor]:
    """Binary masks (B, 1, H, W) where the noise, rotated U(-90, 90) degrees, exceeds 0.5; and that noise."""
    noise = perlin_noise(batch, height, width, g, device)[:, None]
    noise = rotate(noise, uniform((batch,), -90.0, 90.0, g, device))
    return (noise > 0.5).float(), noise


# ---- the ten anomaly-source augmenters: (n, 3, H, W) RGB float in [0, 1] -> same --------------------

def luminance(x: Tensor) -> Tensor:
    return TF.rgb_to_grayscale(x)


def aug_gamma(x: Tensor, g, device) -> Tensor:
    gamma = uniform((x.shape[0], 3, 1, 1), 0.5, 2.0, g, device)  # per channel
    return x.clamp_min(0) ** gamma


def aug_brightness(x: Tensor, g, device) -> Tensor:
    # Changing Y in YCbCr by d shifts R, G and B each by d.
    n = x.shape[0]
    mul, add = uniform((n, 1, 1, 1), 0.8, 1.2, g, device), uniform((n, 1, 1, 1), -30 / 255, 30 / 255, g, device)
    y = luminance(x)
    return (x + y * (mul - 1) + add).clamp(0, 1)


def aug_sharpness(x: Tensor, g, device) -> Tensor:
    factor = uniform((x.shape[0], 1, 1, 1), 0.0, 2.0, g, device)
    degenerate = TF.adjust_sharpness(x, 0.0)  # PIL's smoothed image; blending with it is PIL's enhance
    return (degenerate + factor * (x - degenerate)).clamp(0, 1)


@functools.lru_cache
def yiq_matrices(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """RGB -> YIQ and its inverse, made once per device: no host copy or inverse (a GPU sync) per step."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                          dtype=torch.float64)
    return to_yiq.to(device, dtype), torch.linalg.inv(to_yiq).to(device, dtype)


def rotate_hue(x: Tensor, g, device) -> Tensor:
    theta = uniform((x.shape[0],), -50 / 255, 50 / 255, g, device) * 2 * math.pi
    to_yiq, from_yiq = yiq_matrices(torch.device(device), x.dtype)
    cos, sin, one, zero = theta.cos(), theta.sin(), torch.ones_like(theta), torch.zeros_like(theta)
    rotation = torch.stack((torch.stack((one, zero, zero), 1), torch.stack((zero, cos, -sin), 1),
                            torch.stack((zero, sin, cos), 1)), 1)  # (n, 3, 3): turns the chroma (I, Q) plane
    return torch.einsum("nij,njhw->nihw", from_yiq @ rotation @ to_yiq, x).clamp(0, 1)


def scale_saturation(x: Tensor, g, device) -> Tensor:
    factor = 1 + uniform((x.shape[0], 1, 1, 1), -50.0, 50.0, g, device) / 127.5
    grey = luminance(x)
    return (grey + factor * (x - grey)).clamp(0, 1)


def aug_hue_saturation(x: Tensor, g, device) -> Tensor:
    return scale_saturation(rotate_hue(x, g, device), g, device)


def aug_solarize(x: Tensor, g, device) -> Tensor:
    n = x.shape[0]
    apply = torch.rand((n, 1, 1, 1), generator=g, device=device) < 0.5
    threshold = uniform((n, 1, 1, 1), 32 / 255, 128 / 255, g, device)
    return torch.where(apply & (x >= threshold), 1 - x, x)


def to_uint8(x: Tensor) -> Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def aug_posterize(x: Tensor, g, device) -> Tensor:
    bits = torch.randint(1, 9, (x.shape[0], 1, 1, 1), generator=g, device=device)
    keep = ((255 << (8 - bits)) & 255).to(torch.uint8)
    return (to_uint8(x) & keep).to(x.dtype) / 255


def aug_invert(x: Tensor, g, device) -> Tensor:
    return TF.invert(x)


def aug_autocontrast(x: Tensor, g, device) -> Tensor:
    n, c = x.shape[:2]
    cutoff = uniform((n, 1, 1), 0.0, 0.2, g, device) * x[0, 0].numel()  # pixels cut from each end
    levels = to_uint8(x).flatten(2).long()
    hist = torch.zeros(n, c, 256, device=device, dtype=x.dtype).scatter_add_(2, levels, torch.ones_like(x).flatten(2))
    low = (hist.cumsum(2) <= cutoff).sum(2, keepdim=True).clamp(max=255)  # first level past the cut
    high = 255 - (hist.flip(2).cumsum(2) <= cutoff).sum(2, keepdim=True).clamp(max=255)
    low, high = low[..., None].to(x.dtype) / 255, high[..., None].to(x.dtype) / 255
    stretched = ((x - low) / (high - low).clamp_min(1 / 255)).clamp(0, 1)
    return torch.where(high > low, stretched, x)


def aug_equalize(x: Tensor, g, device) -> Tensor:
    return TF.equalize(x)


def aug_rotate(x: Tensor, g, device) -> Tensor:
    return rotate(x, uniform((x.shape[0],), -45.0, 45.0, g, device))


AUGMENTERS = [aug_gamma, aug_brightness, aug_sharpness, aug_hue_saturation, aug_solarize, aug_posterize,
              aug_invert, aug_autocontrast, aug_equalize, aug_rotate]


def apply_where(selected: Tensor, fn, x: Tensor) -> Tensor:
    """fn applied to the samples of x (B, ...) where selected (B,) is true.

    On a GPU, fn runs on the whole batch and torch.where keeps the selected samples: shapes never depend on
    a random draw, so there is no host sync, and the GPU has compute to spare. On the CPU, syncs are free and
    compute is not, so fn runs on the selected samples only.
    """
    return (apply_to_selected if x.device.type == "cpu" else apply_to_all_keep_selected)(selected, fn, x)


def apply_to_all_keep_selected(selected: Tensor, fn, x: Tensor) -> Tensor:
    return torch.where(selected.view(-1, *[1] * (x.dim() - 1)), fn(x), x)


def apply_to_selected(selected: Tensor, fn, x: Tensor) -> Tensor:
    index = selected.nonzero()[:, 0]
    if index.numel() == 0:
        return x
    out = x.clone()
    out[index] = fn(x[index])
    return out


def augment_sources(sources: Tensor, g: torch.Generator | None, ops_per_sample: int = 3) -> tuple[Tensor, Tensor]:
    """Apply ops_per_sample distinct augmenters, in random order, to each BGR image of (B, 3, H, W).

    Returns the images and the (B, ops_per_sample) indices into AUGMENTERS that each sample drew.
    """
    device = sources.device
    choice = torch.rand(sources.shape[0], len(AUGMENTERS), generator=g, device=device).argsort(1)[:, :ops_per_sample]
    x = sources.flip(1)  # BGR -> RGB: luminance, hue and saturation assume RGB
    for stage in range(ops_per_sample):
        for index, augmenter in enumerate(AUGMENTERS):
            x = apply_where(choice[:, stage] == index, lambda s: augmenter(s, g, device), x)
    return x.flip(1), choice


def simulate_anomalies(images: Tensor, sources: Tensor | None, recipe: Recipe | str = "official",
                       g: torch.Generator | None = None) -> Batch:
    """Simulated anomalies for a batch of normal images.

    images: (B, 3, H, W) uint8 (or float in [0, 1]); sources: (N, 3, H, W) anomaly-source images of
    the same size, or None to use the Perlin noise itself as the source (grey levels, as anomalib does).
    """
    recipe = RECIPES[recipe] if isinstance(recipe, str) else recipe
    device = images.device
    batch, _, height, width = images.shape
    image = images.float() / 255 if images.dtype == torch.uint8 else images.float()

    rotate_normal = torch.rand(batch, generator=g, device=device) < recipe.rotate_p
    degrees = recipe.rotate_degrees
    image = apply_where(rotate_normal, lambda x: rotate(x, uniform((x.shape[0],), -degrees, degrees, g, device)), image)

    mask, noise = anomaly_masks(batch, height, width, g, device)
    if sources is None:
        source = (noise * 0.5 + 0.25).expand(-1, 3, -1, -1)
    else:
        picked = sources[torch.randint(0, sources.shape[0], (batch,), generator=g, device=device)]
        picked = picked.float() / 255 if picked.dtype == torch.uint8 else picked.float()
        source = augment_sources(picked, g)[0]

    beta = uniform((batch,), recipe.beta_low, recipe.beta_high, g, device)
    b = beta[:, None, None, None]
    augmented = image * (1 - mask) + (1 - b) * source * mask + b * image * mask
    anomaly_free = (torch.rand(batch, generator=g, device=device) < recipe.anomaly_free_p)[:, None, None, None]
    mask = mask.masked_fill(anomaly_free, 0.0)
    augmented = torch.where(anomaly_free, image, augmented)
    return Batch(image, augmented, mask)
