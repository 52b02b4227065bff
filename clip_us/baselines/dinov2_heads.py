"""DINOv2's official heads in the code (NextGen-UIA) of the ultrasound-CLIP paper (Qu et al.,
"Adapting Vision-Language Foundation Model for Next Generation Medical Ultrasound Image Analysis"),
the defaults of `--backbone dinov2`.

Both heads read the frozen ViT's last blocks after its final norm, as DINOv2's
`get_intermediate_layers(x, n, norm=True)` returns them; our vision tower gives the same with
`tower(x, return_blocks=..., pool=False, norm=True)`: tokens [B, 1 + h*w, width], CLS first.

- `DINOv2SegHead`, a U-Net-style decoder on the last 5 blocks' patch tokens as h x w maps (37 x 37
  at 518 px). The deepest block is the input; the other four, deepest first, are the skips. Each
  of four up-blocks: a transposed conv (kernel 2, stride 2) that halves the channels (768 -> 384
  -> 192 -> 96, and to the classes in the last block); the skip through conv3x3 -> BatchNorm ->
  ReLU to the same channels, resized bilinearly (corners aligned) to the up-sampled size;
  concatenation [up, skip]; conv3x3 -> BatchNorm -> ReLU. The 16x output (592 px at 518) is
  resized bicubic, antialiased as torchvision's Resize does on tensors, to the input size.
  The official decoder ends in that ReLU, so its logits are never negative: reproduced here, as
  the code behind the paper's DINOv2 rows ran it (softmax still ranks the two classes).
- `DINOv2ClsHead`, DINOv2's linear classifier: the CLS tokens of the last 4 blocks and the mean of
  the last block's patch tokens, concatenated (5 x width), then a Linear to the classes with
  weights N(0, 0.01) and zero bias.

Module names follow the official file (`up1.upconv`, `up1.skip_conv`, `up1.conv`, `linear`).
`DINOv2TaskModel` joins a frozen tower and a head for the training scripts. Imports nothing from
clip_us (the tower is any module with our VisionTransformer's interface), so it can be copied.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel_size=3, padding=1), nn.BatchNorm2d(cout),
                         nn.ReLU())


class UpBlock(nn.Module):
    """x [B, cin, s, s] -> [B, cout, 2s, 2s], joined with a skip map [B, skip_dim, h, w]."""

    def __init__(self, cin: int, cout: int, skip_dim: int):
        super().__init__()
        self.upconv = nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2)
        self.conv = _conv_bn_relu(2 * cout, cout)
        self.skip_conv = _conv_bn_relu(skip_dim, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.upconv(x)
        # The skip is convolved at its own size, then resized (the official order).
        skip = F.interpolate(self.skip_conv(skip), size=x.shape[-2:], mode="bilinear",
                             align_corners=True)
        return self.conv(torch.cat([x, skip], dim=1))  # [B, 2*cout, 2s, 2s] -> [B, cout, ...]


def _maps(feats: list[torch.Tensor], grid: tuple[int, int]) -> list[torch.Tensor]:
    """Block tokens [B, 1 + h*w, C] -> patch maps [B, C, h, w] (CLS dropped)."""
    B, N, C = feats[0].shape
    if N != 1 + grid[0] * grid[1]:
        raise ValueError(f"{N} tokens do not make a CLS token and a {grid[0]}x{grid[1]} grid")
    return [f[:, 1:].transpose(1, 2).reshape(B, C, *grid) for f in feats]  # [B, C, h*w] -> maps


class DINOv2SegHead(nn.Module):
    """Last 5 normed blocks -> logits [B, num_classes, H, W] (non-negative: final ReLU)."""
    n_blocks = 5

    def __init__(self, width: int = 768, num_classes: int = 2):
        super().__init__()
        self.up1 = UpBlock(width, width // 2, width)
        self.up2 = UpBlock(width // 2, width // 4, width)
        self.up3 = UpBlock(width // 4, width // 8, width)
        self.up4 = UpBlock(width // 8, num_classes, width)

    def forward(self, feats: list[torch.Tensor], grid: tuple[int, int], size) -> torch.Tensor:
        """feats: the last 5 blocks, oldest first; size: the input's (H, W)."""
        if len(feats) != self.n_blocks:
            raise ValueError(f"DINOv2SegHead takes the last {self.n_blocks} blocks, got {len(feats)}")
        maps = _maps(feats, grid)
        x = maps[-1]
        for up, skip in zip((self.up1, self.up2, self.up3, self.up4), maps[-2::-1]):
            x = up(x, skip)
        return F.interpolate(x, size=tuple(size), mode="bicubic", align_corners=False,
                             antialias=True)


class DINOv2ClsHead(nn.Module):
    """Last 4 normed blocks -> logits [B, num_classes] from [CLS x 4, mean patch token]."""
    n_blocks = 4

    def __init__(self, width: int = 768, num_classes: int = 2):
        super().__init__()
        self.linear = nn.Linear((self.n_blocks + 1) * width, num_classes)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)  # DINOv2's linear-probe init
        nn.init.zeros_(self.linear.bias)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        if len(feats) != self.n_blocks:
            raise ValueError(f"DINOv2ClsHead takes the last {self.n_blocks} blocks, got {len(feats)}")
        x = torch.cat([f[:, 0] for f in feats] + [feats[-1][:, 1:].mean(dim=1)], dim=-1)
        return self.linear(x)  # [B, 5*width] -> [B, num_classes]


def last_blocks(depth: int, n: int) -> tuple[int, ...]:
    """Indices of a `depth`-block tower's last `n` blocks, as `return_blocks` takes them."""
    if not 0 < n <= depth:
        raise ValueError(f"cannot take the last {n} blocks of a {depth}-block tower")
    return tuple(range(depth - n, depth))


class DINOv2TaskModel(nn.Module):
    """A frozen ViT (`visual`: our VisionTransformer) and one of the heads above (`head`):
    images -> seg logits [B, classes, H, W] or cls logits [B, classes]. `norm`, when given, maps
    the pipeline's normalisation to DINOv2's own (ImageNet mean/std) first."""

    def __init__(self, visual: nn.Module, head: nn.Module, norm: nn.Module | None = None):
        super().__init__()
        self.visual, self.head, self.norm = visual.requires_grad_(False), head, norm
        self.blocks = last_blocks(len(visual.transformer.resblocks), head.n_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # frozen, as in the official code
            y = x if self.norm is None else self.norm(x)
            _, feats = self.visual(y, return_blocks=self.blocks, pool=False, norm=True)
        if isinstance(self.head, DINOv2ClsHead):
            return self.head(feats)
        p = self.visual.patch_size
        return self.head(feats, (x.shape[-2] // p, x.shape[-1] // p), x.shape[-2:])
