"""Mona (multi-cognitive visual adapter) for ViT token sequences [CLS, patches], vision tower only.

Mona (Yin et al., 2023) was made for Swin. Seed 003 §3.1 / Fig. 2c embeds it in CLIP's ViT; its
official code (jinggqu/NextGen-UIA, `BaselineMona`) does, for x [B, 1 + h*w, D]:

    x' = LN(x) * gamma + x * gammax            gamma init 1e-6, gammax init 1 (per channel)
    p  = project1(x')                          Linear(D -> bottleneck)
    patches of p -> [B, c, h, w]; the CLS token skips the convolutions
    z  = (dw3(p) + dw5(p) + dw7(p)) / 3 + p;  z = z + conv1x1(z)
    out = x + project2(dropout(gelu(z)))       Linear(bottleneck -> D), not zero-initialised

Placement (DESIGN.md, "Mona in CLIP"): "after_block", one Mona after each vision block, as the
official code does (default); "attn_and_mlp", two per block after the attention and after the MLP
residuals, as in Mona's original paper. The grid (h, w) comes from the input, through
VisionTransformer.forward's `grid=`, so non-square inputs and resized positional embeddings work.
Submodule names follow the official code (project1, adapter_conv.conv1, ...) to ease porting.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import CLIP, ResidualAttentionBlock, Transformer, VisionTransformer

PLACEMENTS = ("after_block", "attn_and_mlp")


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

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, N, _ = x.shape
        h, w = grid
        if N != 1 + h * w:
            raise ValueError(f"Mona got {N} tokens but grid {h}x{w} needs 1 + {h * w} "
                             f"(CLS first, then the patches row by row)")
        p = self.project1(self.norm(x) * self.gamma + x * self.gammax)  # [B, N, c]
        c = p.shape[-1]
        patches = p[:, 1:].reshape(B, h, w, c).permute(0, 3, 1, 2)  # [B, c, h, w]
        patches = self.adapter_conv(patches).permute(0, 2, 3, 1).reshape(B, h * w, c)
        z = torch.cat([p[:, :1], patches], dim=1)  # CLS skipped the convolutions: [B, N, c]
        return x + self.project2(self.dropout(F.gelu(z)))


class MonaBlock(ResidualAttentionBlock):
    """A vision block with Mona: `mona1` after attention (placement "attn_and_mlp" only) and
    `mona2` after the MLP. It keeps the block's ln_1, attn, ln_2 and mlp (same keys)."""

    def __init__(self, block: ResidualAttentionBlock, bottleneck: int = 64,
                 placement: str = "after_block", dropout: float = 0.1):
        nn.Module.__init__(self)  # not ResidualAttentionBlock's: it would build fresh weights
        for name, child in block.named_children():
            self.add_module(name, child)
        width = block.ln_1.normalized_shape[0]
        like = block.ln_1.weight
        self.placement = placement
        if placement == "attn_and_mlp":
            self.mona1 = Mona(width, bottleneck, dropout).to(like.device, like.dtype)
        self.mona2 = Mona(width, bottleneck, dropout).to(like.device, like.dtype)
        self.train(block.training)

    def forward(self, x: torch.Tensor, causal: bool = False, grid: tuple | None = None):
        if grid is None or causal:
            raise ValueError("MonaBlock needs the patch grid of a vision sequence: call it "
                             "through VisionTransformer.forward (which passes grid=); Mona is "
                             "for the vision tower only")
        x = self.attn_residual(x)  # the block's own residual (with its layer-scale, if any)
        if self.placement == "attn_and_mlp":
            x = self.mona1(x, grid)
        x = self.mlp_residual(x)
        return self.mona2(x, grid)


def _vision_tower(model: nn.Module) -> VisionTransformer:
    if isinstance(model, CLIP):
        return model.visual
    if isinstance(model, VisionTransformer):
        return model
    if isinstance(model, Transformer):
        raise TypeError("Mona is for the vision tower only: pass a CLIP model or its "
                        "VisionTransformer (model.visual), not a Transformer such as the text "
                        "tower (model.transformer), which has no patch grid")
    raise TypeError(f"add_mona takes a CLIP model or a VisionTransformer, got "
                    f"{type(model).__name__}; Mona is for the vision tower only")


def add_mona(model: nn.Module, bottleneck: int = 64, placement: str = "after_block",
             dropout: float = 0.1) -> nn.Module:
    """Add Mona to every block of the vision tower of `model` (a CLIP or VisionTransformer).

    In place; returns `model`. Base weights are not frozen here: call mark_only_trainable.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"Mona placement must be one of {PLACEMENTS}, got {placement!r}")
    if bottleneck < 1:
        raise ValueError(f"Mona bottleneck must be >= 1, got {bottleneck}")
    blocks = _vision_tower(model).transformer.resblocks
    if any(isinstance(b, MonaBlock) for b in blocks):
        raise ValueError("this vision tower already has Mona; build a fresh model to re-add it")
    for i, block in enumerate(blocks):
        blocks[i] = MonaBlock(block, bottleneck, placement, dropout)
    return model


def mona_settings(model: nn.Module) -> dict | None:
    """The Mona settings found in `model` (bottleneck, placement, dropout), or None."""
    block = next((m for m in model.modules() if isinstance(m, MonaBlock)), None)
    if block is None:
        return None
    return {"bottleneck": block.mona2.project1.out_features, "placement": block.placement,
            "dropout": block.mona2.dropout.p}
