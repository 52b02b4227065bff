"""Feature reducer, segmentation head and classification head of the ultrasound-CLIP paper (Qu et
al., "Adapting Vision-Language Foundation Model for Next Generation Medical Ultrasound Image
Analysis", §3.2 and Fig. 3).

Its official code (NextGen-UIA, `CLIPAdapter`) is followed by default:
- Feature reducing: the outputs of vision blocks 3, 6 and 9 (CLS dropped) are each reduced by
  Linear(width -> 512) and a LayerNorm -> Linear -> GELU -> Linear block, then fused deepest first
  by summation. The paper's text says concatenation: `fuse="concat"`.
- Segmentation: bilinear up-sampling to the input size, then a 1x1 conv to the classes.
- Classification: `kind="mlp"` is the code's adaptive average pool -> Linear -> ReLU -> Dropout(0.1)
  -> Linear. `kind="pool"` is the paper's text: bilinear up-sampling and adaptive average pooling.
  The paper does not say how pooled features become class logits; our assumption is a 1x1 conv to
  the classes (dim*classes + classes parameters, 1,026 at dim 512), which is the only trainable
  part of that head.
  `kind="linear"` is the official head of the MetaCLIP, BiomedCLIP and UniMedCLIP rows (NextGen-UIA's
  baselines): adaptive average pool -> Dropout(0.5) -> Linear(512, classes), on the same reducer.

Both heads apply their 1x1 conv *before* up-sampling. Bilinear weights are a convex combination,
so conv(up(x)) == up(conv(x)) exactly in real arithmetic, and the small order costs 2 channels of
up-sampling instead of 512 (a test checks the equality).

`TaskModel` joins a vision tower (with or without adapters) and a head kept under the attribute
`head`, which the adapter helpers' default freezing patterns rely on.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeatureReducer(nn.Module):
    """Chosen blocks' tokens [B, 1 + h*w, width] -> one feature map [B, out_dim, h, w]."""

    def __init__(self, width: int, layers=(3, 6, 9), dim: int = 512, fuse: str = "sum"):
        super().__init__()
        if fuse not in ("sum", "concat"):
            raise ValueError(f"fuse must be 'sum' or 'concat', got {fuse!r}")
        self.layers, self.dim, self.fuse = tuple(layers), dim, fuse
        self.reduces = nn.ModuleList(nn.Linear(width, dim) for _ in self.layers)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
            for _ in self.layers)

    @property
    def out_dim(self) -> int:
        return self.dim * (len(self.layers) if self.fuse == "concat" else 1)

    def forward(self, feats: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        if len(feats) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} block outputs, got {len(feats)}")
        # Deepest first, as the official code fuses (the order matters only for concat).
        reduced = [block(reduce(f[:, 1:]))  # drop CLS: [B, h*w, dim]
                   for f, reduce, block in zip(feats[::-1], self.reduces[::-1], self.blocks[::-1])]
        x = torch.cat(reduced, dim=-1) if self.fuse == "concat" else torch.stack(reduced).sum(0)
        B, N, C = x.shape
        if N != grid[0] * grid[1]:
            raise ValueError(f"{N} patch tokens do not fill a {grid[0]}x{grid[1]} grid")
        return x.transpose(1, 2).reshape(B, C, grid[0], grid[1])  # [B, h*w, C] -> [B, C, h, w]


class SegHead(nn.Module):
    """Reducer -> 1x1 conv -> bilinear up-sampling to the input size: logits [B, classes, H, W]."""

    def __init__(self, width: int, layers=(3, 6, 9), dim: int = 512, fuse: str = "sum",
                 num_classes: int = 2):
        super().__init__()
        self.reducer = FeatureReducer(width, layers, dim, fuse)
        self.conv = nn.Conv2d(self.reducer.out_dim, num_classes, kernel_size=1)

    @property
    def layers(self) -> tuple[int, ...]:
        return self.reducer.layers

    def forward(self, feats, grid, size) -> torch.Tensor:
        x = self.conv(self.reducer(feats, grid))  # [B, classes, h, w]
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


CLS_KINDS = ("mlp", "pool", "linear")
_DROPOUT = {"mlp": 0.1, "linear": 0.5}  # the official code's rates for each head


class ClsHead(nn.Module):
    """Reducer -> class logits [B, classes]. kind="mlp" (official code), "pool" (paper text) or
    "linear" (the official MetaCLIP/BiomedCLIP/UniMedCLIP head)."""

    def __init__(self, width: int, layers=(3, 6, 9), dim: int = 512, fuse: str = "sum",
                 num_classes: int = 2, kind: str = "mlp", dropout: float | None = None):
        super().__init__()
        if kind not in CLS_KINDS:
            raise ValueError(f"kind must be one of {CLS_KINDS}, got {kind!r}")
        self.kind = kind
        self.reducer = FeatureReducer(width, layers, dim, fuse)
        d = self.reducer.out_dim
        p = _DROPOUT.get(kind) if dropout is None else dropout
        if kind == "mlp":
            self.mlp = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Dropout(p),
                                     nn.Linear(d, num_classes))
        elif kind == "linear":
            self.fc = nn.Sequential(nn.Dropout(p), nn.Linear(d, num_classes))
        else:
            self.conv = nn.Conv2d(d, num_classes, kernel_size=1)

    @property
    def layers(self) -> tuple[int, ...]:
        return self.reducer.layers

    def forward(self, feats, grid, size) -> torch.Tensor:
        x = self.reducer(feats, grid)  # [B, C, h, w]
        if self.kind != "pool":  # adaptive average pool to 1x1, flattened: [B, C]
            return (self.mlp if self.kind == "mlp" else self.fc)(x.mean(dim=(2, 3)))
        x = F.interpolate(self.conv(x), size=tuple(size), mode="bilinear", align_corners=False)
        return x.mean(dim=(2, 3))  # [B, classes]


class TaskModel(nn.Module):
    """A vision tower (CLIP's `model.visual`, adapters included) plus a dense head."""

    def __init__(self, visual: nn.Module, head: nn.Module, norm: nn.Module | None = None):
        super().__init__()
        self.visual = visual
        self.head = head
        self.norm = norm  # e.g. backbones.Renormalize for a backbone trained on ImageNet's mean/std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x if self.norm is None else self.norm(x)
        # pool=False stops the tower after the deepest block the head uses: about a sixth less
        # compute for blocks 3/6/9 of 12, and later blocks' adapters get no gradient.
        _, feats = self.visual(x, return_blocks=self.head.layers, pool=False)
        patch = self.visual.patch_size
        grid = (x.shape[-2] // patch, x.shape[-1] // patch)
        return self.head(feats, grid, x.shape[-2:])


def build_task_model(visual: nn.Module, task: str, layers=(3, 6, 9), dim: int = 512,
                     fuse: str = "sum", num_classes: int = 2, cls_head: str = "mlp",
                     norm: nn.Module | None = None) -> TaskModel:
    """TaskModel for task "seg" or "cls"; widths are read from the tower, never hard-coded."""
    width = visual.width
    if task == "seg":
        head = SegHead(width, layers, dim, fuse, num_classes)
    elif task == "cls":
        head = ClsHead(width, layers, dim, fuse, num_classes, kind=cls_head)
    else:
        raise ValueError(f"task must be 'seg' or 'cls', got {task!r}")
    return TaskModel(visual, head, norm)
