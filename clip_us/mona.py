"""Mona (multi-cognitive visual adapter) for ViT token sequences [B, 1 + h*w, C], CLS first.

Mona (Yin et al., 2023) was made for Swin. The ultrasound-CLIP paper (§3.1 / Fig. 2c) embeds it in
CLIP's ViT; its official code (jinggqu/NextGen-UIA, `src/adapters/mona.py`) does, for
x [B, 1 + h*w, D]:

    x' = LN(x) * gamma + x * gammax            gamma init 1e-6, gammax init 1 (per channel)
    p  = project1(x')                          Linear(D -> bottleneck)
    patches of p -> [B, c, h, w]; the CLS token skips the convolutions (adapter_conv)
    out = x + project2(dropout(gelu(p')))      Linear(bottleneck -> D), not zero-initialised

The official code has four variants, which differ only in adapter_conv (input p, [B, c, h, w]):

    baseline       z = (dw3(p) + dw5(p) + dw7(p)) / 3 + p             the paper's text describes this one
    noise_aware    z = a1 dw3(p) + a2 dw5(p) + a3 dw7(p) + p,  (a1, a2, a3) = noise_estimator(p),
                   a softmax over the three scales from the pooled p, per image (no / 3)
    freq_enhanced  q = p * freq_filter (per channel); z = (dw3(q) + dw5(q) + dw7(q)) / 3 + p
    hybrid         q as freq_enhanced; z = a1 dw3(q) + a2 dw5(q) + a3 dw7(q) + p, a = noise_estimator(q)

and then z = z + conv1x1(z) in all four. The official scripts' `--mona_variant` defaults to
noise_aware (segmentation, contrastive fine-tuning, zero-shot) or freq_enhanced (classification).

The up-projection is not zero-initialised (as in the official code), so a freshly added Mona
changes a model's output. Parameter names are the official code's (project1, adapter_conv.conv1,
adapter_conv.noise_estimator.1, adapter_conv.freq_filter, ...), so its weights load by name.
Where Mona goes inside clip_us's CLIP is in adapters.py; this file imports only torch, so it can
be copied into another project on its own:

    mona = Mona(width=768, variant="noise_aware")
    tokens = mona(tokens, grid=(14, 14))       # after a ViT block; grid defaults to square
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

VARIANTS = ("baseline", "noise_aware", "freq_enhanced", "hybrid")
NOISE_AWARE = ("noise_aware", "hybrid")    # weigh the three scales by noise_estimator
FREQ_FILTERED = ("freq_enhanced", "hybrid")  # scale the channels by freq_filter first


def noise_estimator(channels: int) -> nn.Sequential:
    """[B, c, h, w] -> softmax weights of the three conv scales [B, 3, 1, 1]. A Sequential with
    the official layout, so its convolutions are `noise_estimator.1` and `noise_estimator.3`."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, channels // 4, 1),
                         nn.ReLU(), nn.Conv2d(channels // 4, 3, 1), nn.Softmax(dim=1))


class MonaOp(nn.Module):
    """Depthwise 3x3, 5x5, 7x7 mixed plus identity, then a 1x1 conv plus identity; how the three
    scales are mixed, and whether the channels are filtered first, is the variant's."""

    def __init__(self, channels: int, variant: str = "baseline"):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.conv2 = nn.Conv2d(channels, channels, 5, padding=2, groups=channels)
        self.conv3 = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.projector = nn.Conv2d(channels, channels, 1)
        if variant in FREQ_FILTERED:
            self.freq_filter = nn.Parameter(torch.ones(channels))
        if variant in NOISE_AWARE:
            self.noise_estimator = noise_estimator(channels)
        self.variant = variant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = x
        if self.variant in FREQ_FILTERED:
            # The official filter is rfft2 -> times freq_filter[c] at every frequency -> irfft2 at
            # the same size. One number for all frequencies of a channel is, the FFT being linear
            # and exactly inverted, that channel times the number: computed so, with no FFT.
            q = x * self.freq_filter.view(1, -1, 1, 1)
        scales = (self.conv1(q), self.conv2(q), self.conv3(q))
        if self.variant in NOISE_AWARE:
            a = self.noise_estimator(q)  # [B, 3, 1, 1], sums to 1 over the scales
            mixed = sum(s * a[:, i:i + 1] for i, s in enumerate(scales))
        else:
            mixed = sum(scales) / 3.0
        z = mixed + x  # the identity is the unfiltered input in every variant
        return z + self.projector(z)


class Mona(nn.Module):
    """One Mona adapter on [B, 1 + h*w, D] tokens (CLS first); returns the same shape."""

    def __init__(self, width: int, bottleneck: int = 64, dropout: float = 0.1,
                 variant: str = "baseline"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"Mona variant must be one of {VARIANTS}, got {variant!r}")
        if variant in NOISE_AWARE and bottleneck < 4:
            raise ValueError(f"the {variant} Mona's noise estimator has bottleneck // 4 channels: "
                             f"use a bottleneck >= 4, got {bottleneck}")
        self.norm = nn.LayerNorm(width)
        self.gamma = nn.Parameter(torch.full((width,), 1e-6))
        self.gammax = nn.Parameter(torch.ones(width))
        self.project1 = nn.Linear(width, bottleneck)
        self.adapter_conv = MonaOp(bottleneck, variant)
        self.dropout = nn.Dropout(dropout)
        self.project2 = nn.Linear(bottleneck, width)
        self.variant = variant

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
