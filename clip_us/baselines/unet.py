"""U-Net, the segmentation reference row of Table 2 of the ultrasound-CLIP paper (Qu et al.,
"Adapting Vision-Language Foundation Model for Next Generation Medical Ultrasound Image Analysis"),
trained from scratch.

The official code (NextGen-UIA) vendors a small 2-D U-Net (the SSL4MIS-style `UNet`); this file
rebuilds it with the same module names, so its state dict keys match (`encoder.in_conv.conv_conv.0
.weight`, `decoder.up1.up.weight`, `decoder.out_conv.weight`, ...):

- Encoder: 5 levels with 16, 32, 64, 128, 256 channels, max-pooling (2x2) between levels. Each level
  is a block conv3x3 -> BatchNorm -> LeakyReLU -> Dropout -> conv3x3 -> BatchNorm -> LeakyReLU,
  with dropout 0.05, 0.1, 0.2, 0.3, 0.5 from the top level down.
- Decoder: 4 steps, each a transposed conv (kernel 2, stride 2) that halves the channels, then the
  skip concatenated before it (`cat([skip, up])`), then the same block without dropout.
- Output: a 3x3 conv to the classes, logits [B, classes, H, W] at the input size.

Four poolings halve the size four times, so H and W must be multiples of 16; other sizes raise a
ValueError rather than losing pixels. Imports nothing from clip_us, so the file can be copied.
"""
from __future__ import annotations

import torch
from torch import nn

CHANNELS = (16, 32, 64, 128, 256)
DROPOUT = (0.05, 0.1, 0.2, 0.3, 0.5)


class ConvBlock(nn.Module):
    """conv3x3 -> BN -> LeakyReLU -> Dropout -> conv3x3 -> BN -> LeakyReLU (padding keeps the size)."""

    def __init__(self, cin: int, cout: int, dropout: float):
        super().__init__()
        self.conv_conv = nn.Sequential(
            nn.Conv2d(cin, cout, kernel_size=3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(),
            nn.Dropout(dropout),
            nn.Conv2d(cout, cout, kernel_size=3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_conv(x)


class DownBlock(nn.Module):
    """2x2 max-pool, then a ConvBlock: one encoder level below the first."""

    def __init__(self, cin: int, cout: int, dropout: float):
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), ConvBlock(cin, cout, dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class UpBlock(nn.Module):
    """Transposed conv up (cin -> cskip channels), concatenation after the skip, ConvBlock."""

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cskip, kernel_size=2, stride=2)
        self.conv = ConvBlock(2 * cskip, cout, dropout=0.0)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))  # [B, 2*cskip, h, w]


class Encoder(nn.Module):
    def __init__(self, in_channels: int, channels=CHANNELS, dropout=DROPOUT):
        super().__init__()
        self.in_conv = ConvBlock(in_channels, channels[0], dropout[0])
        self.down1 = DownBlock(channels[0], channels[1], dropout[1])
        self.down2 = DownBlock(channels[1], channels[2], dropout[2])
        self.down3 = DownBlock(channels[2], channels[3], dropout[3])
        self.down4 = DownBlock(channels[3], channels[4], dropout[4])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.in_conv(x)]
        for down in (self.down1, self.down2, self.down3, self.down4):
            feats.append(down(feats[-1]))
        return feats  # sizes H, H/2, H/4, H/8, H/16


class Decoder(nn.Module):
    def __init__(self, num_classes: int, channels=CHANNELS):
        super().__init__()
        self.up1 = UpBlock(channels[4], channels[3], channels[3])
        self.up2 = UpBlock(channels[3], channels[2], channels[2])
        self.up3 = UpBlock(channels[2], channels[1], channels[1])
        self.up4 = UpBlock(channels[1], channels[0], channels[0])
        self.out_conv = nn.Conv2d(channels[0], num_classes, kernel_size=3, padding=1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x0, x1, x2, x3, x4 = feats
        x = self.up4(self.up3(self.up2(self.up1(x4, x3), x2), x1), x0)
        return self.out_conv(x)


class UNet(nn.Module):
    """images [B, in_channels, H, W] (H, W multiples of 16) -> logits [B, num_classes, H, W]."""

    def __init__(self, in_channels: int = 3, num_classes: int = 2, channels=CHANNELS,
                 dropout=DROPOUT):
        super().__init__()
        if len(channels) != 5 or len(dropout) != 5:
            raise ValueError(f"UNet has 5 levels: give 5 channels and 5 dropouts, got "
                             f"{len(channels)} and {len(dropout)}")
        self.encoder = Encoder(in_channels, channels, dropout)
        self.decoder = Decoder(num_classes, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[-2] % 16 or x.shape[-1] % 16:
            raise ValueError(f"UNet needs images [B, C, H, W] with H and W multiples of 16 (it "
                             f"pools 4 times); got shape {tuple(x.shape)}. Use --image-size 224, "
                             "128 or another multiple of 16")
        return self.decoder(self.encoder(x))
