"""DRAEM's losses, hand-written as in the official code: L2 + SSIM loss + focal loss (+ SSPCAB MSE).

Everything is computed on the inputs' device and dtype and returns tensors: no host syncs.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_unet import DraemOutput, image_scores
from perlin import Batch

SSPCAB_LAMBDA = 0.1  # the SSPCAB paper's weight of its own reconstruction term


def gaussian_window(size: int, sigma: float, channels: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(channels, 1, size, size) normalised Gaussian kernel for a grouped convolution."""
    x = torch.arange(size, device=device, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x.square() / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g).to(dtype).expand(channels, 1, size, size).contiguous()


def ssim_map(img1: Tensor, img2: Tensor, window_size: int = 11, sigma: float = 1.5, data_range: float = 1.0) -> Tensor:
    """Per-pixel structural similarity of two (B, C, H, W) batches; Gaussian window, zero padding (official code)."""
    channels = img1.shape[1]
    window = gaussian_window(window_size, sigma, channels, img1.device, img1.dtype)
    pad = window_size // 2

    def blur(x: Tensor) -> Tensor:
        return F.conv2d(x, window, padding=pad, groups=channels)

    mu1, mu2 = blur(img1), blur(img2)
    var1 = blur(img1 * img1) - mu1.square()
    var2 = blur(img2 * img2) - mu2.square()
    cov = blur(img1 * img2) - mu1 * mu2
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return ((2 * mu1 * mu2 + c1) * (2 * cov + c2)) / ((mu1.square() + mu2.square() + c1) * (var1 + var2 + c2))


def ssim_loss(img1: Tensor, img2: Tensor) -> Tensor:
    """1 - the mean SSIM."""
    return 1 - ssim_map(img1, img2).mean()


class FocalLoss(nn.Module):
    """Focal loss on softmax probabilities (not logits), as in the official code: gamma 2, alpha 1."""

    def __init__(self, gamma: float = 2.0, smooth: float = 1e-5):
        super().__init__()
        self.gamma, self.smooth = gamma, smooth

    def forward(self, probs: Tensor, mask: Tensor) -> Tensor:
        """probs: (B, K, H, W) class probabilities; mask: (B, 1, H, W) or (B, H, W) class indices."""
        return self.per_sample(probs, mask).mean()

    def per_sample(self, probs: Tensor, mask: Tensor) -> Tensor:
        """(B,): each sample's mean over its pixels (equal pixel counts: their mean is forward's value)."""
        return self.per_pixel(probs, mask).flatten(1).mean(1)

    def per_pixel(self, probs: Tensor, mask: Tensor) -> Tensor:
        """(B, H, W): the loss at each pixel."""
        target = mask.reshape(mask.shape[0], *probs.shape[2:]).long()
        one_hot = F.one_hot(target, probs.shape[1]).movedim(-1, 1).to(probs.dtype)
        one_hot = one_hot.clamp(self.smooth / (probs.shape[1] - 1), 1 - self.smooth)
        pt = (one_hot * probs).sum(dim=1) + self.smooth
        return -(1 - pt).pow(self.gamma) * pt.log()


FOCAL = FocalLoss()  # no parameters and no state: one serves every step


def area_balanced(per_pixel: Tensor, mask: Tensor) -> Tensor:
    """(B,): half the mean loss over each sample's mask pixels plus half the mean over its other pixels (the
    plain mean where the mask is empty). per_pixel (B, H, W), mask (B, 1, H, W) in {0, 1}."""
    loss, inside = per_pixel.flatten(1), mask.flatten(1)
    area = inside.sum(1)
    mean_in = (loss * inside).sum(1) / area.clamp(min=1)
    mean_out = (loss * (1 - inside)).sum(1) / (inside.shape[1] - area).clamp(min=1)
    return torch.where(area > 0, 0.5 * (mean_in + mean_out), loss.mean(1))


def image_label_loss(anomaly_maps: Tensor, weights: Tensor, eps: float = 1e-6) -> Tensor:
    """For defect images known only to be defective (no mask): -log of the image score the evaluation reads (the
    max of the 21x21 mean-filtered anomaly map), averaged with weights (B,) (1 for such images, 0 for others).
    It needs no mask: the network may place the defect where it finds one."""
    score = image_scores(anomaly_maps).clamp(eps, 1.0)
    return (-score.log() * weights).sum() / weights.sum().clamp(min=1)


def image_score_loss(anomaly_maps: Tensor, defective: Tensor, weights: Tensor, eps: float = 1e-6) -> Tensor:
    """Binary cross-entropy of the image score the evaluation reads against whether the sample holds an anomaly
    (defective (B,) in {0, 1}), averaged with weights (B,). The focal loss is a mean over pixels: one bright blob
    on a good image costs it little, yet that blob is the image's score and decides its rank."""
    score = image_scores(anomaly_maps).clamp(eps, 1 - eps)
    bce = -(defective * score.log() + (1 - defective) * (1 - score).log())
    return (bce * weights).sum() / weights.sum().clamp(min=1)


def draem_loss(out: DraemOutput, batch: Batch, sspcab: bool = False, score_weight: float = 0.0
               ) -> tuple[Tensor, dict[str, Tensor]]:
    """Total DRAEM loss of a step's output on its batch, and its parts (unweighted sum; the SSPCAB term added
    when sspcab; score_weight x image_score_loss on every sample with pixel labels when score_weight > 0), in the
    dtype of out's tensors.

    With real defects, the last `batch.real` samples are real defect images: they have no clean target (no
    reconstruction loss), the focal loss covers those with masks (batch.has_mask; area_balanced) together with
    the simulated samples, and those without get image_label_loss. The `batch.pasted` samples before them are real
    defects pasted onto good images, trained as simulated ones. parts then also holds "real_defects", the loss on
    the real samples alone, pasted or not (a curve to watch; it is not added to the total again)."""
    reconstruction, logits, clean, mask = out.reconstruction, out.logits, batch.image, batch.mask
    real, has_mask, pasted, focal = batch.real, batch.has_mask, batch.pasted, FOCAL
    simulated = len(logits) - real
    probs = torch.softmax(logits, dim=1)
    per_sample = focal.per_sample(probs, mask)
    if real:
        # A real defect covers a few pixels (a blowhole) or half the image (uneven lighting); under the per-image
        # mean the large ones dominate and the small ones teach next to nothing. Their mask pixels weigh as much
        # as the rest of their image instead (measured on the magnetic tiles: docs/training.md).
        balanced = area_balanced(focal.per_pixel(probs[simulated:], mask[simulated:]), mask[simulated:])
        per_sample = torch.cat((per_sample[:simulated], balanced))
    pixel_labelled = torch.ones_like(per_sample) if has_mask is None else has_mask.to(per_sample.dtype)
    parts = {
        "l2": F.mse_loss(reconstruction[:simulated], clean[:simulated]),
        "ssim": ssim_loss(reconstruction[:simulated], clean[:simulated]),
        "focal": (per_sample * pixel_labelled).sum() / pixel_labelled.sum(),
    }
    if real:
        image_level = 1 - pixel_labelled[simulated:]
        parts["image_label"] = image_label_loss(probs[simulated:, 1], image_level)
    if score_weight:
        defective = mask.flatten(1).amax(1).to(probs.dtype)
        parts["image_score"] = score_weight * image_score_loss(probs[:, 1], defective, pixel_labelled)
    if sspcab:
        parts["sspcab"] = SSPCAB_LAMBDA * F.mse_loss(out.block5_output, out.block5_input)
    total = torch.stack(list(parts.values())).sum()
    if real or pasted:
        first = simulated - pasted
        masked = pixel_labelled[first:]
        real_focal = (per_sample[first:] * masked).sum() / masked.sum().clamp(min=1)
        parts["real_defects"] = (real_focal + parts.get("image_label", 0)).detach()
    return total, parts
