"""Mona inside clip_us's CLIP: one Mona after each vision block, or two (after attention and MLP).

Seed 003 §3.1 / Fig. 2c puts Mona in CLIP's vision tower only. Placement "after_block" is what the
official code (jinggqu/NextGen-UIA) does, one Mona after each of the vision blocks (the default);
"attn_and_mlp" puts two per block, after the attention and after the MLP residuals, as in Mona's
original paper. The patch grid (h, w) comes from the input, through VisionTransformer.forward's
`grid=`, so non-square inputs and resized positional embeddings work. `MonaBlock` keeps the
block's ln_1, attn, ln_2 and mlp (same keys) and adds `mona1`/`mona2`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .model import CLIP, ResidualAttentionBlock, Transformer, VisionTransformer
from .mona import Mona

PLACEMENTS = ("after_block", "attn_and_mlp")


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

    In place; returns `model`. Base weights are not frozen here: adapters.freeze_backbone does.
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
