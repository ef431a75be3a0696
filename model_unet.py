"""DRAEM's two networks: a reconstructive auto-encoder and a discriminative U-Net, and the image score.

Module and parameter names match the official checkpoints exactly (``encoder.block1.0.weight`` ...),
so the published ``.pckl`` state_dicts load without renaming. Inputs are float images in [0, 1]
(BGR, as the official code reads them with OpenCV), sides a multiple of 32.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


def block(in_channels: int, mid_channels: int, out_channels: int | None = None) -> nn.Sequential:
    """Two conv-BN-ReLU layers (indices 0..5, the official ``blockN`` / ``dbN`` layout)."""
    out_channels = mid_channels if out_channels is None else out_channels
    return nn.Sequential(*conv_bn_relu(in_channels, mid_channels), *conv_bn_relu(mid_channels, out_channels))


def up(in_channels: int, out_channels: int) -> nn.Sequential:
    """x2 bilinear upsampling then conv-BN-ReLU (the conv is index 1, as in ``upN.1``)."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                         *conv_bn_relu(in_channels, out_channels))


def pool() -> nn.Sequential:
    return nn.Sequential(nn.MaxPool2d(2))


def head(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1))


def add_down_path(module: nn.Module, in_channels: int, w: int) -> None:
    """block1..block4 (widths w, 2w, 4w, 8w), each followed by mp1..mp4: both encoders start this way."""
    for i, (cin, cout) in enumerate(((in_channels, w), (w, 2 * w), (2 * w, 4 * w), (4 * w, 8 * w)), start=1):
        module.add_module(f"block{i}", block(cin, cout))
        module.add_module(f"mp{i}", pool())


class SSPCAB(nn.Module):
    """Self-supervised predictive convolutional attention block (Ristea et al., CVPR 2022).

    Four 1x1 convolutions each read one corner of a masked 3x3 neighbourhood (offset 2 from the
    centre, which itself is hidden), summed, then squeeze-and-excitation channel attention.
    Parameter names follow anomalib (``masked_conv1``.. ``attention_module.fc1``).
    """

    def __init__(self, channels: int, reduction_ratio: int = 8):
        super().__init__()
        self.pad, self.crop = 2, 4  # kernel + dilation, kernel + 2 * dilation + 1 (kernel 1, dilation 1)
        self.masked_conv1 = nn.Conv2d(channels, channels, 1)
        self.masked_conv2 = nn.Conv2d(channels, channels, 1)
        self.masked_conv3 = nn.Conv2d(channels, channels, 1)
        self.masked_conv4 = nn.Conv2d(channels, channels, 1)
        self.attention_module = nn.Module()
        self.attention_module.fc1 = nn.Linear(channels, channels // reduction_ratio)
        self.attention_module.fc2 = nn.Linear(channels // reduction_ratio, channels)

    def forward(self, x: Tensor) -> Tensor:
        p, c = self.pad, self.crop
        x = F.pad(x, (p, p, p, p))
        out = (self.masked_conv1(x[..., :-c, :-c]) + self.masked_conv2(x[..., c:, :-c])
               + self.masked_conv3(x[..., :-c, c:]) + self.masked_conv4(x[..., c:, c:]))
        attention = self.attention_module.fc1(out.mean(dim=(2, 3))).relu()
        attention = torch.sigmoid(self.attention_module.fc2(attention))
        return out * attention[:, :, None, None]


class EncoderReconstructive(nn.Module):
    def __init__(self, in_channels: int, base_width: int, sspcab: bool = False):
        super().__init__()
        w = base_width
        add_down_path(self, in_channels, w)
        self.block5 = SSPCAB(8 * w) if sspcab else block(8 * w, 8 * w)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns the bottleneck and block5's input (the SSPCAB loss compares the two)."""
        x = self.mp1(self.block1(x))
        x = self.mp2(self.block2(x))
        x = self.mp3(self.block3(x))
        block5_input = self.mp4(self.block4(x))
        return self.block5(block5_input), block5_input


class DecoderReconstructive(nn.Module):
    def __init__(self, base_width: int, out_channels: int):
        super().__init__()
        w = base_width
        self.up1, self.db1 = up(8 * w, 8 * w), block(8 * w, 8 * w, 4 * w)
        self.up2, self.db2 = up(4 * w, 4 * w), block(4 * w, 4 * w, 2 * w)
        self.up3, self.db3 = up(2 * w, 2 * w), block(2 * w, 2 * w, w)
        self.up4, self.db4 = up(w, w), block(w, w, w)
        self.fin_out = head(w, out_channels)

    def forward(self, bottleneck: Tensor) -> Tensor:
        x = self.db1(self.up1(bottleneck))
        x = self.db2(self.up2(x))
        x = self.db3(self.up3(x))
        x = self.db4(self.up4(x))
        return self.fin_out(x)


class ReconstructiveSubNetwork(nn.Module):
    def __init__(self, in_channels: int = 3, out_channels: int = 3, base_width: int = 128, sspcab: bool = False):
        super().__init__()
        self.encoder = EncoderReconstructive(in_channels, base_width, sspcab)
        self.decoder = DecoderReconstructive(base_width, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x)[0])


class EncoderDiscriminative(nn.Module):
    def __init__(self, in_channels: int, base_width: int):
        super().__init__()
        w = base_width
        add_down_path(self, in_channels, w)
        self.block5, self.mp5 = block(8 * w, 8 * w), pool()
        self.block6 = block(8 * w, 8 * w)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        act1 = self.block1(x)
        act2 = self.block2(self.mp1(act1))
        act3 = self.block3(self.mp2(act2))
        act4 = self.block4(self.mp3(act3))
        act5 = self.block5(self.mp4(act4))
        act6 = self.block6(self.mp5(act5))
        return act1, act2, act3, act4, act5, act6


class DecoderDiscriminative(nn.Module):
    def __init__(self, base_width: int, out_channels: int = 2):
        super().__init__()
        w = base_width
        self.up_b, self.db_b = up(8 * w, 8 * w), block(16 * w, 8 * w)
        self.up1, self.db1 = up(8 * w, 4 * w), block(12 * w, 4 * w)
        self.up2, self.db2 = up(4 * w, 2 * w), block(6 * w, 2 * w)
        self.up3, self.db3 = up(2 * w, w), block(3 * w, w)
        self.up4, self.db4 = up(w, w), block(2 * w, w)
        self.fin_out = head(w, out_channels)

    def forward(self, act1: Tensor, act2: Tensor, act3: Tensor, act4: Tensor, act5: Tensor, act6: Tensor) -> Tensor:
        x = self.db_b(torch.cat((self.up_b(act6), act5), dim=1))
        x = self.db1(torch.cat((self.up1(x), act4), dim=1))
        x = self.db2(torch.cat((self.up2(x), act3), dim=1))
        x = self.db3(torch.cat((self.up3(x), act2), dim=1))
        x = self.db4(torch.cat((self.up4(x), act1), dim=1))
        return self.fin_out(x)


class DiscriminativeSubNetwork(nn.Module):
    def __init__(self, in_channels: int = 6, out_channels: int = 2, base_width: int = 64):
        super().__init__()
        self.encoder_segment = EncoderDiscriminative(in_channels, base_width)
        self.decoder_segment = DecoderDiscriminative(base_width, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder_segment(*self.encoder_segment(x))


class DraemOutput(NamedTuple):
    reconstruction: Tensor
    logits: Tensor  # (B, 2, H, W)
    block5_input: Tensor
    block5_output: Tensor

    @property
    def anomaly_map(self) -> Tensor:
        """(B, H, W) float32: the discriminator's probability that each pixel is anomalous."""
        return torch.softmax(self.logits.float(), dim=1)[:, 1]


class DraemModel(nn.Module):
    """Both sub-networks; the discriminator sees cat(reconstruction, image), reconstruction first."""

    def __init__(self, base_width: int = 128, seg_base_width: int = 64, sspcab: bool = False):
        super().__init__()
        self.reconstructive_subnetwork = ReconstructiveSubNetwork(base_width=base_width, sspcab=sspcab)
        self.discriminative_subnetwork = DiscriminativeSubNetwork(base_width=seg_base_width)

    def forward(self, image: Tensor) -> DraemOutput:
        rec_net = self.reconstructive_subnetwork
        bottleneck, block5_input = rec_net.encoder(image)
        reconstruction = rec_net.decoder(bottleneck)
        logits = self.discriminative_subnetwork(torch.cat((reconstruction, image), dim=1))
        return DraemOutput(reconstruction, logits, block5_input, bottleneck)


def image_scores(anomaly_maps: Tensor, kernel: int = 21) -> Tensor:
    """The paper's image-level score: max of the kernel x kernel mean-filtered anomaly map (stride 1, zero
    padding counted): (N, H, W) -> (N,)."""
    pooled = F.avg_pool2d(anomaly_maps[:, None].float(), kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    return pooled.flatten(1).amax(1)


def init_weights(module: nn.Module) -> None:
    """The official initialisation: conv weights ~ N(0, 0.02), BatchNorm weight ~ N(1, 0.02), bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
