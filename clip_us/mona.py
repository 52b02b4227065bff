"""Mona (multi-cognitive visual adapter) for ViT token sequences [B, 1 + h*w, C], CLS first.

Mona (Yin et al., 2023) was made for Swin. The ultrasound-CLIP paper (§3.1 / Fig. 2c) embeds it in
CLIP's ViT; its official code (jinggqu/NextGen-UIA, `BaselineMona`) does, for x [B, 1 + h*w, D]:

    x' = LN(x) * gamma + x * gammax            gamma init 1e-6, gammax init 1 (per channel)
    p  = project1(x')                          Linear(D -> bottleneck)
    patches of p -> [B, c, h, w]; the CLS token skips the convolutions
    z  = (dw3(p) + dw5(p) + dw7(p)) / 3 + p;  z = z + conv1x1(z)
    out = x + project2(dropout(gelu(z)))       Linear(bottleneck -> D), not zero-initialised

The up-projection is not zero-initialised (as in the official code), so a freshly added Mona
changes a model's output. Submodule names follow the official code (project1, adapter_conv.conv1,
...) to ease porting. Where Mona goes inside clip_us's CLIP is in mona_in_clip.py; this file
imports only torch, so it can be copied into another project on its own:

    mona = Mona(width=768)
    tokens = mona(tokens, grid=(14, 14))       # after a ViT block; grid defaults to square
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MonaOp(nn.Module):
    """Depthwise 3x3, 5x5, 7x7 averaged plus identity, then a 1x1 conv plus identity."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.conv2 = nn.Conv2d(channels, channels, 5, padding=2, groups=channels)
        self.conv3 = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.projector = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (self.conv1(x) + self.conv2(x) + self.conv3(x)) / 3.0 + x
        return x + self.projector(x)


class Mona(nn.Module):
    """One Mona adapter on [B, 1 + h*w, D] tokens (CLS first); returns the same shape."""

    def __init__(self, width: int, bottleneck: int = 64, dropout: float = 0.1):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.gamma = nn.Parameter(torch.full((width,), 1e-6))
        self.gammax = nn.Parameter(torch.ones(width))
        self.project1 = nn.Linear(width, bottleneck)
        self.adapter_conv = MonaOp(bottleneck)
        self.dropout = nn.Dropout(dropout)
        self.project2 = nn.Linear(bottleneck, width)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """x [B, 1 + h*w, D], CLS first, patches row by row; grid (h, w), square when None."""
        B, N, _ = x.shape
        h, w = grid if grid is not None else (round((N - 1) ** 0.5),) * 2
        if N != 1 + h * w:
            raise ValueError(f"Mona got {N} tokens but grid {h}x{w} needs 1 + {h * w} "
                             f"(CLS first, then the patches row by row)")
        p = self.project1(self.norm(x) * self.gamma + x * self.gammax)  # [B, N, c]
        c = p.shape[-1]
        patches = p[:, 1:].reshape(B, h, w, c).permute(0, 3, 1, 2)  # [B, c, h, w]
        patches = self.adapter_conv(patches).permute(0, 2, 3, 1).reshape(B, h * w, c)
        z = torch.cat([p[:, :1], patches], dim=1)  # CLS skipped the convolutions: [B, N, c]
        return x + self.project2(self.dropout(F.gelu(z)))
