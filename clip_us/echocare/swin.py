"""EchoCare's image encoder: MONAI's 2-D SwinTransformer (the "v2" layout), written from scratch.

EchoCare-CLIP encodes images with the EchoCare ultrasound foundation model, which its
authors build as MONAI's `SwinTransformer(spatial_dims=2, use_v2=True, embed_dim=128,
patch_size=2, window_size=8, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32])` (Liu et al.,
"Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", 2021; Hatamizadeh
et al., "SwinUNETR-V2", 2023, for the residual conv block in front of every stage).

Every parameter keeps MONAI's key name (`patch_embed.proj.weight`,
`layers1.0.blocks.0.attn.relative_position_bias_table`, `layers1c.0.layer.conv1.conv.weight`,
`layers1.0.downsample.reduction.weight`, ...), so the EchoCare checkpoint loads with strict=True.
`forward(x)` returns MONAI's five feature maps, each through a parameter-free layer norm over
channels (MONAI's `forward(normalize=True)`); at 256 px the last is [B, 2048, 8, 8].

The arithmetic follows MONAI exactly, including its quirks: windows shrink to the feature map
when the map is not larger than the window (and the shift is then dropped), padded tokens are
zeros after `norm1` and stay visible to attention, and a shrunk window reads the top-left corner
of the relative position index. Attention runs through `F.scaled_dot_product_attention`.
Only the 2-D model is written here (MONAI also builds 3-D ones).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..fileio import cache_dir
from ..weights import read_checkpoint, state_dict_problems


@dataclass
class SwinConfig:
    """Every size of the encoder. The defaults are EchoCare's."""
    in_chans: int = 3
    embed_dim: int = 128
    patch_size: int = 2
    window_size: int = 8
    depths: tuple = (2, 2, 18, 2)
    num_heads: tuple = (4, 8, 16, 32)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


# "tiny" keeps every code path (four stages, shifted windows, merging, the v2 conv blocks) at a
# fraction of the cost, for unit tests and the phantom demo.
ARCHS = {"echocare": SwinConfig(),
         "tiny": SwinConfig(embed_dim=16, window_size=4, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))}


# ----------------------------------------------------------------------------- windows
def window_and_shift(grid: tuple, window: int) -> tuple[tuple, tuple]:
    """MONAI's get_window_size: a map no larger than the window becomes one window, unshifted."""
    size = tuple(g if g <= window else window for g in grid)
    shift = tuple(0 if g <= window else window // 2 for g in grid)
    return size, shift


def window_partition(x: torch.Tensor, size: tuple) -> torch.Tensor:
    """[B, H, W, C] -> [B, nW, wh*ww, C], windows in row-major order (MONAI's order)."""
    B, H, W, C = x.shape
    wh, ww = size
    x = x.reshape(B, H // wh, wh, W // ww, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, (H // wh) * (W // ww), wh * ww, C)


def window_reverse(windows: torch.Tensor, size: tuple, H: int, W: int) -> torch.Tensor:
    """[B, nW, wh*ww, C] -> [B, H, W, C], the inverse of window_partition."""
    B, C = windows.shape[0], windows.shape[-1]
    wh, ww = size
    x = windows.view(B, H // wh, W // ww, wh, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)


def shift_mask(grid: tuple, size: tuple, shift: tuple, device) -> torch.Tensor:
    """Additive mask [nW, n, n] for shifted windows: -100 between tokens that came from different
    regions of the un-rolled map (MONAI's compute_mask), 0 elsewhere."""
    region = torch.zeros(1, *grid, 1, device=device)
    label = 0
    for hs in (slice(0, -size[0]), slice(-size[0], -shift[0]), slice(-shift[0], None)):
        for ws in (slice(0, -size[1]), slice(-size[1], -shift[1]), slice(-shift[1], None)):
            region[:, hs, ws, :] = label
            label += 1
    region = window_partition(region, size)[0, :, :, 0]  # [nW, n]
    diff = region[:, None, :] - region[:, :, None]  # [nW, n, n]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


def relative_position_index(window: int) -> torch.Tensor:
    """[n, n] index into the (2w-1)^2-row bias table for every pair of tokens in a w x w window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))
    coords = coords.flatten(1)  # [2, n]
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # [n, n, 2]
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


# ----------------------------------------------------------------------------- blocks
class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, plus a learned bias per relative offset."""

    def __init__(self, dim: int, heads: int, window: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)  # MONAI's init
        # A persistent buffer because MONAI's is, so the checkpoint holds (and strict loading
        # checks) it.
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def position_bias(self, n: int) -> torch.Tensor:
        """[heads, n, n]. A shrunk window (n < w*w) reads index[:n, :n], as MONAI does."""
        index = self.relative_position_index[:n, :n].reshape(-1)
        return self.relative_position_bias_table[index].view(n, n, -1).permute(2, 0, 1).contiguous()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, nW, n, C]; mask [nW, n, n] or None -> [B, nW, n, C]."""
        B, nW, n, C = x.shape
        hd = C // self.heads
        qkv = self.qkv(x).view(B, nW, n, 3, self.heads, hd)
        qkv = qkv.permute(3, 0, 1, 4, 2, 5).contiguous()  # [3, B, nW, heads, n, hd]
        bias = self.position_bias(n)  # [heads, n, n]
        # 4-D inputs with a mask that broadcasts over the batch take PyTorch's fused CPU kernel
        # (5-D inputs fall back to the unfused path, several times slower). Without the shift
        # mask, windows join the batch and the bias is [1, heads, n, n]; with it, windows join
        # the heads so that the [nW, n, n] mask needs no copy per image: [1, nW*heads, n, n].
        if mask is None:
            q, k, v = qkv.view(3, B * nW, self.heads, n, hd).unbind(0)
            bias = bias[None]
        else:
            q, k, v = qkv.view(3, B, nW * self.heads, n, hd).unbind(0)
            bias = (bias + mask[:, None]).reshape(1, nW * self.heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        out = out.view(B, nW, self.heads, n, hd).transpose(2, 3)  # [B, nW, n, heads, hd]
        return self.proj(out.reshape(B, nW, n, C))


class Mlp(nn.Module):
    """MONAI's MLPBlock: linear1 -> exact GELU -> linear2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.gelu(self.linear1(x)))


class SwinBlock(nn.Module):
    """Pre-LN block: x + W-MSA(norm1(x)) in (shifted) windows, then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, window: int, shifted: bool, mlp_ratio: float,
                 qkv_bias: bool):
        super().__init__()
        self.window, self.shifted = window, shifted
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def attend(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Window attention on norm1(x) [B, H, W, C]; MONAI pads after the norm, so the padded
        tokens are zeros that every window near the edge still attends to."""
        B, H, W, C = x.shape
        size, shift = window_and_shift((H, W), self.window)
        shift = shift if self.shifted else (0, 0)
        x = self.norm1(x)
        if H % size[0] or W % size[1]:
            x = F.pad(x, (0, 0, 0, -W % size[1], 0, -H % size[0]))
        Hp, Wp = x.shape[1], x.shape[2]
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        x = self.attn(window_partition(x, size), mask if any(shift) else None)
        x = window_reverse(x, size, Hp, Wp)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x[:, :H, :W]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attend(x, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbours -> one token: [B, H, W, C] -> [B, H/2, W/2, 2C] (LayerNorm(4C), Linear)."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[1], x.shape[2]
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        # MONAI's order (PatchMergingV2, which 2-D "merging" also uses): (row, col) offsets
        # (0,0), (1,0), (0,1), (1,1) along the channels.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class BasicLayer(nn.Module):
    """One stage: `depth` Swin blocks alternating plain and shifted windows, then merging."""

    def __init__(self, dim: int, depth: int, heads: int, window: int, mlp_ratio: float,
                 qkv_bias: bool):
        super().__init__()
        self.window = window
        self.blocks = nn.ModuleList([SwinBlock(dim, heads, window, i % 2 == 1, mlp_ratio, qkv_bias)
                                     for i in range(depth)])
        self.downsample = PatchMerging(dim)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, 2C, ceil(H/2), ceil(W/2)]."""
        # Contiguous once here: a permuted view would make every Linear below copy its input and
        # its output (measured: a third of the forward time at EchoCare's sizes).
        x = x.permute(0, 2, 3, 1).contiguous()  # [B, C, H, W] -> [B, H, W, C]
        grid = (x.shape[1], x.shape[2])
        size, shift = window_and_shift(grid, self.window)
        padded = tuple(-(-g // s) * s for g, s in zip(grid, size))
        mask = shift_mask(padded, size, shift, x.device).to(x.dtype) if any(shift) else None
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return self.downsample(x).permute(0, 3, 1, 2)  # [B, H', W', 2C] -> [B, 2C, H', W']


def _conv3x3(dim: int) -> nn.Sequential:
    # MONAI wraps each conv in a `Convolution` sequential whose only child is `conv`.
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(dim, dim, 3, padding=1, bias=False)))


class ResidualConvBlock(nn.Module):
    """SwinUNETR-V2's block before every stage (MONAI's UnetrBasicBlock(res_block=True)):
    conv3x3 -> InstanceNorm -> LeakyReLU(0.01) -> conv3x3 -> InstanceNorm, + x, LeakyReLU.
    The instance norms have no parameters; keys are `layer.conv1.conv.weight`, as in MONAI."""

    def __init__(self, dim: int):
        super().__init__()
        self.layer = nn.Module()
        self.layer.conv1 = _conv3x3(dim)
        self.layer.conv2 = _conv3x3(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(F.instance_norm(self.layer.conv1(x), eps=1e-5), 0.01)
        out = F.instance_norm(self.layer.conv2(out), eps=1e-5)
        return F.leaky_relu(out + x, 0.01)


def channel_norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free layer norm over the channels of [B, C, H, W] (MONAI's proj_out)."""
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2]).permute(0, 3, 1, 2)


class PatchEmbed(nn.Module):
    """Non-overlapping patch x patch convolution; the input is zero-padded right/bottom to a
    multiple of the patch (MONAI's PatchEmbed without its optional norm)."""

    def __init__(self, in_chans: int, dim: int, patch: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_chans, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        return self.proj(F.pad(x, (0, -W % self.patch, 0, -H % self.patch)))


class SwinTransformer(nn.Module):
    """MONAI's SwinTransformer(spatial_dims=2, use_v2=True): patch embedding, then four stages,
    each a residual conv block (`layersNc.0`) and a Swin stage with merging (`layersN.0`)."""

    def __init__(self, cfg: SwinConfig = SwinConfig(), gradient_checkpointing: bool = False):
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg.in_chans, cfg.embed_dim, cfg.patch_size)
        dims = [cfg.embed_dim * 2 ** i for i in range(len(cfg.depths))]
        # ModuleLists of one, because MONAI's keys are `layers1.0.*` and `layers1c.0.*`; all Swin
        # stages first, then the conv blocks, in MONAI's registration (and state dict) order.
        for i, (dim, depth, heads) in enumerate(zip(dims, cfg.depths, cfg.num_heads)):
            setattr(self, f"layers{i + 1}", nn.ModuleList(
                [BasicLayer(dim, depth, heads, cfg.window_size, cfg.mlp_ratio, cfg.qkv_bias)]))
        for i, dim in enumerate(dims):
            setattr(self, f"layers{i + 1}c", nn.ModuleList([ResidualConvBlock(dim)]))
        self.set_gradient_checkpointing(gradient_checkpointing)

    @property
    def num_features(self) -> int:
        """Channels of the last feature map (2048 for EchoCare)."""
        return self.config.embed_dim * 2 ** len(self.config.depths)

    def stages(self) -> list[tuple[nn.Module, nn.Module]]:
        n = len(self.config.depths)
        return [(getattr(self, f"layers{i}c")[0], getattr(self, f"layers{i}")[0]) for i in range(1, n + 1)]

    def set_gradient_checkpointing(self, on: bool = True) -> None:
        """Recompute each Swin block in backward instead of storing its activations (the
        authors trained with MONAI's use_checkpoint=True: batch 128 at 256 px is heavy)."""
        for _, layer in self.stages():
            layer.gradient_checkpointing = on

    def forward(self, x: torch.Tensor, normalize: bool = True) -> list[torch.Tensor]:
        """Pixels [B, 3, H, W] -> five maps [B, C*2^i, H/2^(i+1), W/2^(i+1)], i = 0..4."""
        x = self.patch_embed(x)
        outs = [x]
        for conv, layer in self.stages():
            x = layer(conv(x))
            outs.append(x)
        return [channel_norm(o) for o in outs] if normalize else outs


# ----------------------------------------------------------------------------- loading
ECHOCARE_FILE = "echocare_encoder.pth"
ECHOCARE_SOURCE = ("EchoCare's authors publish echocare_encoder.pth (the MAE-pretrained Swin "
                   "encoder) through https://github.com/CAIR-HKISI/EchoCare")


def _folder_kind(folder: str) -> str:
    names = set(os.listdir(folder))
    if {"config.json", "vocab.txt"} & names:
        return " It looks like a Hugging Face BERT folder (config.json/vocab.txt), not EchoCare's."
    return ""


def find_echocare_encoder(path: str | None = None, download_root: str | None = None) -> str:
    """The checkpoint file: `path` (a file, or a folder holding echocare_encoder.pth), else
    echocare_encoder.pth in the cache (`download_root`, $CLIP_US_CACHE or ~/.cache/clip_us)."""
    if path is not None and os.path.isfile(path):
        return path
    if path is not None and os.path.isdir(path):
        inside = os.path.join(path, ECHOCARE_FILE)
        if os.path.isfile(inside):
            return inside
        raise FileNotFoundError(f"folder {path} has no {ECHOCARE_FILE}.{_folder_kind(path)} "
                                f"{ECHOCARE_SOURCE}; put the file there or pass its path.")
    cached = os.path.join(cache_dir(download_root), ECHOCARE_FILE)
    if path is None and os.path.isfile(cached):
        return cached
    where = f"{path!r} does not exist" if path is not None else f"{cached} does not exist"
    raise FileNotFoundError(f"EchoCare encoder weights not found: {where}. {ECHOCARE_SOURCE} "
                            f"(there is no direct download URL to fetch it automatically); save it "
                            f"as {cached} or pass its path.")


def _check_family(sd: dict, path: str) -> None:
    bert = [k for k in sd if "word_embeddings" in k or k.startswith(("bert.", "encoder.layer."))]
    clip = [k for k in sd if k.startswith(("visual.", "transformer.resblocks."))]
    for keys, family in ((bert, "BERT"), (clip, "CLIP")):
        if keys:
            raise ValueError(f"{path} holds {family} weights ({', '.join(keys[:3])}, ...), not the "
                             f"EchoCare Swin encoder. {ECHOCARE_SOURCE}.")


def check_swin_state_dict(sd: dict, model: SwinTransformer, path: str) -> None:
    """Missing, unexpected and wrongly shaped keys, listed in one error."""
    problems = state_dict_problems(sd, model)
    if problems:
        raise ValueError(f"{path}: not an EchoCare Swin checkpoint of this configuration "
                         f"{problems}")


def config_from_state_dict(sd: dict, path: str = "state dict") -> SwinConfig:
    """Every size of the encoder from MONAI-named tensors (EchoCare's file gives EchoCare's)."""
    need = ("patch_embed.proj.weight", "layers1.0.blocks.0.attn.relative_position_index",
            "layers1.0.blocks.0.mlp.linear1.weight")
    if any(k not in sd for k in need):
        raise ValueError(f"{path}: not a MONAI SwinTransformer state dict (no {need[0]} / "
                         f"layers1.0.blocks.0.*); its keys start {', '.join(sorted(sd)[:5])}")
    proj = sd["patch_embed.proj.weight"]  # [embed_dim, in_chans, patch, patch]
    depths, heads, i = [], [], 1
    while f"layers{i}.0.blocks.0.norm1.weight" in sd:
        depths.append(len({k.split(".")[3] for k in sd if k.startswith(f"layers{i}.0.blocks.")}))
        heads.append(sd[f"layers{i}.0.blocks.0.attn.relative_position_bias_table"].shape[1])
        i += 1
    window = round(sd["layers1.0.blocks.0.attn.relative_position_index"].shape[0] ** 0.5)
    hidden = sd["layers1.0.blocks.0.mlp.linear1.weight"].shape[0]
    return SwinConfig(in_chans=proj.shape[1], embed_dim=proj.shape[0], patch_size=proj.shape[-1],
                      window_size=window, depths=tuple(depths), num_heads=tuple(heads),
                      mlp_ratio=hidden / proj.shape[0],
                      qkv_bias="layers1.0.blocks.0.attn.qkv.bias" in sd)


def load_echocare_encoder(path: str | None = None, download_root: str | None = None,
                          config: SwinConfig | None = None,
                          gradient_checkpointing: bool = False) -> SwinTransformer:
    """EchoCare's Swin encoder (fp32, eval mode) from `echocare_encoder.pth`.

    The file is read with weights_only=True. Its `mask_token` (left over from MAE pre-training,
    as the authors' loader notes) is dropped; every other key must fit, as with strict=True.
    Without `config`, the sizes are read from the tensors (EchoCare's file gives EchoCare's).
    """
    path = find_echocare_encoder(path, download_root)
    raw, _ = read_checkpoint(path)
    if not isinstance(raw, dict) or not all(torch.is_tensor(v) for v in raw.values()):
        raise ValueError(f"{path}: expected a flat state dict of tensors (EchoCare's format), "
                         f"found a {type(raw).__name__}")
    sd = {k: v for k, v in raw.items() if k != "mask_token"}
    _check_family(sd, path)
    config = config or config_from_state_dict(sd, path)
    with torch.device("meta"):  # shapes only: the checkpoint supplies every tensor
        model = SwinTransformer(config, gradient_checkpointing)
    check_swin_state_dict(sd, model, path)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, assign=True)
    return model.eval()
