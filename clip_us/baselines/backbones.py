"""Baseline backbones of the ultrasound-CLIP paper's Tables 2 and 3 (Qu et al., "Adapting
Vision-Language Foundation Model for Next Generation Medical Ultrasound Image Analysis") behind the
interface of CLIP's vision tower.

    tower = build("biomedclip", weights="path/to/open_clip_pytorch_model.bin")
    pooled, blocks = tower(x, return_blocks=(3, 6, 9))            # blocks: [B, 1 + h*w, width]
    _, blocks = tower(x, return_blocks=(3, 6, 9), pool=False)     # stops after block 9

The ViT backbones are configurations of model.py's one VisionTransformer (no second transformer):
- clip:       OpenAI CLIP ViT-B/16 (weights.py reads OpenAI, open_clip and Hugging Face files).
- metaclip:   OpenAI's architecture with QuickGELU, in open_clip's keys (Xu et al., 2024).
              open_clip files default to GELU in weights.py; MetaCLIP was trained with
              QuickGELU, so it is forced.
- biomedclip: timm's ViT-B/16 (GELU, no ln_pre, LayerNorm eps 1e-6, patch bias) under
              `visual.trunk.*`, projected by `visual.head.proj` (Zhang et al., 2023).
- unimedclip: open_clip's ViT-B-16-quickgelu, the `visual.*` keys of unimed_clip_vit_b16.pt.
- dinov2:     ViT-B/14 in Meta's key names: patch 14, 518 px, layer-scale, no projection (Oquab
              et al., 2023). `official=True` builds it as NextGen-UIA did: without layer-scale,
              so its `strict=False` load silently dropped every ls1/ls2 gamma; we drop them too,
              and say so.
- resnet18:   torchvision's ResNet18, ImageNet weights, `fc` -> Linear(512, classes); a whole
              classifier (Table 3's reference row), not a token tower.

The conversion from each authors' key names to ours is done here; timm, open_clip and
transformers are never imported. Pickles are read with weights_only=True (weights.read_checkpoint).
A missing file gets an error naming where the authors publish it and where to put it; a checkpoint
of another kind gets an error listing the keys that do not fit.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters import ADAPTER_LABELS
from ..fileio import cache_dir
from ..model import VisionTransformer, build_model, init_transformer
from ..transform import CLIP_MEAN, CLIP_STD
from ..weights import download, file_sha256, hf_to_openai, is_hf, load_state_dict, read_checkpoint, unwrap

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET18_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
# torchvision names the file by the first 8 hex digits of its SHA256; this is the whole digest.
RESNET18_SHA256 = "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec"


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone: its table-row name, the authors' file format, input normalisation, and the
    ViT options (model.VisionTransformer keywords) that describe its architecture."""
    name: str
    row: str                      # the table-row name in results.json / row.csv
    keys: str                     # authors' key names: "openai" | "timm" | "torchvision"
    prefix: str                   # where the vision tower sits in the authors' file
    files: tuple                  # published file names, looked up in a folder and in the cache
    published: str                # where the authors publish the weights
    mean: tuple = CLIP_MEAN       # each family's own normalisation
    std: tuple = CLIP_STD
    cls_head: str = "mlp"         # default --cls-head
    tasks: tuple = ("seg", "cls")
    resolution: int = 224
    patch_size: int = 16
    output_dim: int = 512         # 0: no projection
    vit: dict = field(default_factory=dict)  # VisionTransformer keywords beyond CLIP's defaults


_TIMM_VIT = dict(quick_gelu=False, pre_norm=False, ln_eps=1e-6, patch_bias=True)
BACKBONES = {
    "clip": BackboneSpec(
        "clip", "CLIP", "openai", "visual.", ("ViT-B-16.pt",),
        "OpenAI (downloaded and SHA256-checked by clip_us.load('ViT-B/16'))"),
    "metaclip": BackboneSpec(
        "metaclip", "MetaCLIP", "openai", "visual.",
        ("b16_400m.pt", "open_clip_pytorch_model.bin", "open_clip_model.safetensors"),
        "https://dl.fbaipublicfiles.com/MMPT/metaclip/b16_400m.pt (or the Hugging Face repo "
        "timm/vit_base_patch16_clip_224.metaclip_400m)", cls_head="linear",
        vit=dict(quick_gelu=True)),
    "biomedclip": BackboneSpec(
        "biomedclip", "BiomedCLIP", "timm", "visual.trunk.",
        ("open_clip_pytorch_model.bin", "open_clip_model.safetensors"),
        "https://huggingface.co/microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 "
        "(open_clip_pytorch_model.bin)", cls_head="linear", vit=_TIMM_VIT),
    "unimedclip": BackboneSpec(
        "unimedclip", "UniMedCLIP", "openai", "visual.", ("unimed_clip_vit_b16.pt",),
        "https://github.com/mbzuai-oryx/UniMed-CLIP (unimed_clip_vit_b16.pt, linked from its "
        "README)", cls_head="linear", vit=dict(quick_gelu=True)),
    "dinov2": BackboneSpec(
        "dinov2", "DINOv2", "timm", "", ("dinov2_vitb14_pretrain.pth",),
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth",
        mean=IMAGENET_MEAN, std=IMAGENET_STD, cls_head="dinov2", resolution=518, patch_size=14,
        output_dim=0, vit=dict(_TIMM_VIT, layer_scale=True)),
    "resnet18": BackboneSpec(
        "resnet18", "ResNet18", "torchvision", "", ("resnet18-f37072fd.pth",),
        f"{RESNET18_URL} (torchvision's ResNet18_Weights.IMAGENET1K_V1)",
        mean=IMAGENET_MEAN, std=IMAGENET_STD, cls_head="fc", tasks=("cls",)),
}
# MetaCLIP's and UniMedCLIP's open_clip configs, and BiomedCLIP's open_clip_config.json, use
# OpenAI's CLIP mean/std, hence the default above; DINOv2 and ResNet18 were trained on ImageNet's.


def spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {sorted(BACKBONES)}")
    return BACKBONES[name]


# ----------------------------------------------------------------------------- key names
_TIMM_TOP = {"cls_token": "class_embedding", "pos_embed": "positional_embedding",
             "patch_embed.proj.weight": "conv1.weight", "patch_embed.proj.bias": "conv1.bias",
             "norm.weight": "ln_post.weight", "norm.bias": "ln_post.bias"}
_TIMM_BLOCK = {"norm1": "ln_1", "attn.proj": "attn.out_proj", "norm2": "ln_2",
               "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj", "ls1": "ls_1", "ls2": "ls_2"}
_TIMM_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias|gamma)$")
# Used only by DINOv2's masked-image pretraining; a feature extractor never reads it.
_TIMM_UNUSED = ("mask_token",)


def _timm_key(key: str) -> str | None:
    """A timm / Meta ViT key -> ours, e.g. 'blocks.3.mlp.fc1.weight' ->
    'transformer.resblocks.3.mlp.c_fc.weight'; None for a key with no place here."""
    if key in _TIMM_TOP:
        return _TIMM_TOP[key]
    m = _TIMM_BLOCK_KEY.fullmatch(key)
    if not m:
        return None
    n, module, leaf = m.groups()
    if module == "attn.qkv":  # one packed projection, rows q, k, v: OpenAI's in_proj
        return f"transformer.resblocks.{n}.attn.in_proj_{leaf}"
    if module not in _TIMM_BLOCK:
        return None
    return f"transformer.resblocks.{n}.{_TIMM_BLOCK[module]}.{leaf}"


def timm_to_ours(sd: dict) -> tuple[dict, list]:
    """timm / Meta ViT tensors -> (our keys and layouts, keys that fit nothing)."""
    out, bad = {}, []
    for k, v in sd.items():
        ours = _timm_key(k)
        if ours is None:
            if k not in _TIMM_UNUSED:
                bad.append(k)
            continue
        if ours == "class_embedding":
            v = v.reshape(-1)  # [1, 1, D] -> [D]
        elif ours == "positional_embedding":
            v = v.reshape(-1, v.shape[-1])  # [1, 1 + h*w, D] -> [1 + h*w, D]
        out[ours] = v
    return out, bad


def _under(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def tower_state_dict(sd: dict, s: BackboneSpec) -> tuple[dict, list]:
    """The authors' whole checkpoint (text tower and all) -> (our vision-tower keys, misfits)."""
    if s.keys == "openai":
        sd = hf_to_openai(sd) if is_hf(sd) else sd  # MetaCLIP is also published for transformers
        return _under(sd, s.prefix), []
    out, bad = timm_to_ours(_under(sd, s.prefix))
    bad = [s.prefix + k for k in bad]
    if s.prefix.startswith("visual."):  # open_clip's TimmModel: Dropout -> Linear `head.proj`
        head = _under(sd, "visual.head.")
        if "proj.weight" in head:
            out["proj"] = head.pop("proj.weight").t()  # nn.Linear [out, in] -> x @ proj [in, out]
        if "proj.bias" in head:
            out["proj_bias"] = head.pop("proj.bias")
        bad += [f"visual.head.{k}" for k in head]
        bad += [k for k in sd if k.startswith("visual.") and not k.startswith(s.prefix)
                and not k.startswith("visual.head.")]
    return out, bad


def guess_kind(sd: dict) -> str | None:
    """Which published layout a checkpoint has, from its keys (for error messages)."""
    keys = set(sd)
    if any(k.startswith("visual.trunk.") for k in keys):
        return "biomedclip (open_clip with a timm trunk)"
    if "mask_token" in keys or any(".ls1.gamma" in k for k in keys):
        return "dinov2 (Meta's ViT keys)"
    if {"layer1.0.conv1.weight", "fc.weight"} <= keys:
        return "resnet18 (torchvision)"
    if "visual.conv1.weight" in keys or any(k.startswith("vision_model.") for k in keys):
        return "clip, metaclip or unimedclip (OpenAI / open_clip / Hugging Face CLIP keys)"
    if any(k.startswith("blocks.0.attn.qkv") for k in keys):
        return "a timm ViT without open_clip's visual.trunk. prefix"
    return None


# ----------------------------------------------------------------------------- files
def _missing_file(s: BackboneSpec, looked: list) -> FileNotFoundError:
    where = os.path.join(cache_dir(), s.files[0])
    return FileNotFoundError(
        f"no {s.row} weights found (looked for {', '.join(looked)}). The authors publish them at "
        f"{s.published}. Download that file and put it at {where} (the clip_us cache, "
        f"$CLIP_US_CACHE), or pass its path (or its folder) with --weights PATH; --weights none "
        f"gives random weights.")


def find_weights(s: BackboneSpec, weights: str) -> str:
    """`weights` ("default", a file, or a folder holding a published file name) -> a file path."""
    if weights == "default":
        folders = [cache_dir()]
        if s.name == "resnet18":  # torchvision's own download cache first
            folders.insert(0, os.path.join(torch.hub.get_dir(), "checkpoints"))
    elif os.path.isdir(weights):
        folders = [weights]
    elif os.path.isfile(weights):
        return weights
    else:
        raise _missing_file(s, [weights])
    looked = [os.path.join(f, n) for f in folders for n in s.files]
    for path in looked:
        if os.path.isfile(path):
            return path
    raise _missing_file(s, looked)


def read_weights(path: str) -> dict:
    """Any supported file (pickle with weights_only=True, safetensors) -> a flat tensor dict."""
    raw, _ = read_checkpoint(path)
    return unwrap(raw, path)


def _listing(items: list, n: int = 12) -> str:
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(map(str, items[:n])) + more


def check_fit(model: nn.Module, sd: dict, misfits: list, path: str, s: BackboneSpec,
              raw: dict) -> None:
    """Every key that does not fit `model`, listed in one error, with the layout it looks like."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    # The keys the file has and we cannot place come first: they say what the file is.
    bad = [f"unknown {k}" for k in misfits]
    shown = s.prefix if s.keys == "openai" else ""  # as the file names them
    bad += [f"unexpected {shown}{k}" for k in sd if k not in expected]
    bad += [f"{k}: shape {tuple(sd[k].shape)}, expected {tuple(shape)}"
            for k, shape in expected.items() if k in sd and sd[k].shape != shape]
    bad += [f"missing {k}" for k in expected if k not in sd]
    if not bad:
        return
    kind = guess_kind(raw)
    hint = f" Its keys look like {kind}: pass --backbone accordingly." if kind else ""
    raise ValueError(f"{path}: not a {s.row} checkpoint: {len(bad)} keys do not fit "
                     f"--backbone {s.name}: {_listing(bad)}.{hint}")


# ----------------------------------------------------------------------------- ViT backbones
def _announce_random(s: BackboneSpec, arch: str) -> None:
    print(f"!!! --weights none: {s.row} ({arch}) with RANDOM weights. Results say nothing about "
          f"{s.row}. !!!")


def vit_sizes(s: BackboneSpec, arch: str | None = None, sd: dict | None = None,
              heads: int | None = None) -> dict:
    """VisionTransformer sizes: read from our-keyed tensors when they have them, else the
    published ViT-B (or the tiny test architecture: 12 blocks at width 64, 2 heads)."""
    if sd and "conv1.weight" in sd and "positional_embedding" in sd:
        width, patch = sd["conv1.weight"].shape[0], sd["conv1.weight"].shape[-1]
        grid = round((sd["positional_embedding"].shape[0] - 1) ** 0.5)
        layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
        out = sd["proj"].shape[1] if "proj" in sd and s.output_dim else s.output_dim
        # Head counts are not in the tensors: one per 64 channels, as every published ViT-B.
        return dict(input_resolution=patch * grid, patch_size=patch, width=width, layers=layers,
                    heads=heads or max(1, width // 64), output_dim=out)
    tiny = arch == "tiny"
    return dict(input_resolution=s.resolution, patch_size=s.patch_size,
                width=64 if tiny else 768, layers=12, heads=heads or (2 if tiny else 12),
                output_dim=(64 if tiny else s.output_dim) if s.output_dim else 0)


def _random_vit(s: BackboneSpec, options: dict, sizes: dict) -> VisionTransformer:
    # The same random backbone for every seed and script, without touching the global RNG that
    # adapters and heads draw from (as for CLIP).
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tower = VisionTransformer(**sizes, **options)
        init_transformer(tower.transformer)
    return tower


def _drop_layer_scale(sd: dict, path: str) -> dict:
    """NextGen-UIA built DINOv2 without layer-scale and loaded with strict=False: every gamma
    was dropped without a word. `official=True` does the same, but says so."""
    gammas = [k for k in sd if k.endswith((".ls_1.gamma", ".ls_2.gamma"))]
    print(f"clip_us: dinov2 official=True: {len(gammas)} layer-scale gammas in {path} ignored, "
          f"as the official code's strict=False load did")
    return {k: v for k, v in sd.items() if k not in gammas}


def build_vit(s: BackboneSpec, weights: str | None, arch: str | None = None,
              official: bool = False, heads: int | None = None) -> VisionTransformer:
    options = dict(s.vit)
    if official:
        options["layer_scale"] = False
    if weights in (None, "none"):
        _announce_random(s, arch or "ViT-B")
        return _random_vit(s, options, vit_sizes(s, arch, heads=heads)).eval()
    path = find_weights(s, weights)
    raw = read_weights(path)
    sd, misfits = tower_state_dict(raw, s)
    if official:
        sd = _drop_layer_scale(sd, path)
    with torch.device("meta"):  # shapes only, to check the fit before allocating anything
        tower = VisionTransformer(**vit_sizes(s, arch, sd, heads), **options)
    check_fit(tower, sd, misfits, path, s, raw)
    tower = VisionTransformer(**vit_sizes(s, arch, sd, heads), **options)
    tower.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    print(f"clip_us: {s.row} weights from {path}")
    return tower.eval()


def build_clip_visual(weights: str | None, arch: str | None = None) -> VisionTransformer:
    """CLIP's own tower, through weights.py (OpenAI, open_clip and Hugging Face formats)."""
    arch = arch or "ViT-B/16"
    if weights in (None, "none"):
        _announce_random(BACKBONES["clip"], arch)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return build_model(config=arch).visual
    sd, info = load_state_dict("ViT-B/16" if weights == "default" else weights)
    return build_model(sd, config=info["config"]).visual


# ----------------------------------------------------------------------------- ResNet18
def _resnet18_state(path: str) -> dict:
    """The published file must have torchvision's SHA256; any other file is the user's own."""
    if os.path.basename(path) == os.path.basename(RESNET18_URL):
        got = file_sha256(path)
        if got != RESNET18_SHA256:
            raise ValueError(f"{path} has SHA256 {got}, but torchvision's {RESNET18_URL} has "
                             f"{RESNET18_SHA256}: the file is corrupt or not torchvision's. "
                             f"Delete it and download it again.")
    else:
        print(f"clip_us: {path} is not torchvision's published resnet18-f37072fd.pth; loading it "
              f"as a ResNet18 state dict without a hash check")
    return read_weights(path)


def _find_resnet18(weights: str) -> str:
    """Local path, torchvision's cache or ours; else the download (SHA256-checked)."""
    try:
        return find_weights(BACKBONES["resnet18"], weights)
    except FileNotFoundError:
        if weights != "default":
            raise
    return download(RESNET18_URL, RESNET18_SHA256)


def build_resnet18(weights: str | None, num_classes: int = 2) -> nn.Module:
    """torchvision's ResNet18 with ImageNet weights; `fc` -> Linear(512, num_classes), new."""
    from torchvision.models import resnet18  # optional heavy import: only this row needs torchvision
    s = BACKBONES["resnet18"]
    with torch.random.fork_rng():  # a fixed random trunk for --weights none, as for the ViTs
        torch.manual_seed(0)
        model = resnet18(weights=None)
    if weights in (None, "none"):
        _announce_random(s, "ResNet18")
    else:
        path = _find_resnet18(weights)
        sd = _resnet18_state(path)
        check_fit(model, sd, [], path, s, sd)
        model.load_state_dict(sd, strict=True)
        print(f"clip_us: ResNet18 weights from {path}")
    model.fc = nn.Linear(model.fc.in_features, num_classes)  # drawn from the run's seed
    return model


# ----------------------------------------------------------------------------- public
def build(name: str, weights: str | None = "default", arch: str | None = None,
          official: bool = False, heads: int | None = None, num_classes: int = 2) -> nn.Module:
    """The backbone `name` (a key of BACKBONES), in fp32 and eval mode.

    weights: "default" (the published file in the clip_us cache; for clip, OpenAI's ViT-B/16;
    for resnet18 also torchvision's cache, else downloaded), a file, a folder holding the
    published file, or None / "none" for random weights (announced). `arch="tiny"` gives the
    tiny test architecture with random weights. `official` (dinov2 only) drops layer-scale as
    NextGen-UIA did. `heads` overrides the head count (one per 64 channels otherwise).

    ViT backbones return a VisionTransformer: tower(x, return_blocks=(3, 6, 9), pool=False) ->
    (None, [block outputs [B, 1 + h*w, width], CLS first]); pool=True -> (pooled, blocks).
    resnet18 returns torchvision's ResNet, a classifier: model(x) -> logits [B, num_classes].
    """
    s = spec(name)
    if official and name != "dinov2":
        raise ValueError(f"official=True (--dinov2-official) is for --backbone dinov2, not {name}")
    if name == "resnet18":
        return build_resnet18(weights, num_classes)
    if name == "clip":
        return build_clip_visual(weights, arch)
    if arch not in (None, "tiny", "ViT-B/16"):
        raise ValueError(f"--backbone {name} is a ViT-B; --arch may only be 'tiny' (tests, "
                         f"random weights), got {arch!r}")
    return build_vit(s, weights, arch, official, heads)


# ----------------------------------------------------------------------------- for the scripts
OWN_HEAD_ROWS = {"unet": "UNet", "clipseg": "CLIPSeg"}


def row_label(name: str, adapter: str = "none") -> str:
    """The table row of `--backbone name --adapter adapter`, e.g. "BiomedCLIP (Mona)"."""
    # The rows with heads of their own (rows.py) are not vision towers, so not in BACKBONES.
    base = BACKBONES[name].row if name in BACKBONES else OWN_HEAD_ROWS.get(name, name)
    return base if adapter == "none" else f"{base} ({ADAPTER_LABELS[adapter]})"


class Renormalize(nn.Module):
    """CLIP-normalised pixels -> this backbone's normalisation (an exact per-channel affine map).

    The data pipeline normalises with CLIP's mean/std (or not at all with --no-clip-norm, the
    official [0, 1] input, which is left as it is). No parameters and no state-dict keys."""

    def __init__(self, mean, std, src_mean=CLIP_MEAN, src_std=CLIP_STD):
        super().__init__()
        # x_raw = x * src_std + src_mean; out = (x_raw - mean) / std = x * scale + shift
        scale = torch.tensor(src_std) / torch.tensor(std)
        shift = (torch.tensor(src_mean) - torch.tensor(mean)) / torch.tensor(std)
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


def input_norm(name: str, clip_norm: bool) -> nn.Module | None:
    """What turns the pipeline's input into what backbone `name` expects, or None when nothing
    needs to (CLIP's mean/std, or --no-clip-norm's [0, 1] pixels for every backbone)."""
    s = spec(name)
    if not clip_norm or (s.mean, s.std) == (CLIP_MEAN, CLIP_STD):
        return None
    return Renormalize(s.mean, s.std)


class ResNetClassifier(nn.Module):
    """torchvision's ResNet18 as a task model: `visual` (the trunk, fc removed) and `head` (the
    new fc), so checkpoints split like every other row's; every parameter trains."""

    def __init__(self, resnet: nn.Module, norm: nn.Module | None = None):
        super().__init__()
        self.head = resnet.fc
        resnet.fc = nn.Identity()
        self.visual = resnet
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x if self.norm is None else self.norm(x)
        return self.head(self.visual(x))  # [B, 512] -> [B, classes]
