"""The model a training script trains: a CLIP backbone (weights or a random init), adapters,
`--init` adapter weights, a segmentation or classification head, and the freezing rule.

Seed 003 §3: CLIP ViT-B/16's vision tower with LoRA or Mona, blocks 3/6/9 into the heads of
heads.py. `--backbone` names the backbone; `clip` is the one built here.
"""
from __future__ import annotations

import copy
from functools import partial

import torch
from torch import nn

from .adapters import AdapterConfig, adapter_trains, apply_adapter, freeze_backbone, load_adapter
from .baselines import backbones
from .baselines import rows as rowmodels
from .heads import build_task_model
from .model import build_model
from .weights import load_state_dict

BACKBONES = tuple(backbones.BACKBONES)  # clip and the baselines of backbones.py


def load_clip_state(weights: str, arch: str, quick_gelu=None):
    """(state dict, CLIPConfig or None) for `--weights NAME|PATH|none` and `--arch`.

    `none` is a random initialisation of `arch`: it is announced loudly, since any number it
    produces says nothing about CLIP.
    """
    if weights == "none":
        print(f"!!! --weights none: {arch} with RANDOM weights. Results are not CLIP's. !!!")
        # The same random backbone for every seed and script, without touching the global RNG
        # that the adapters and heads draw from.
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = build_model(config=arch, quick_gelu=quick_gelu)
        return model.state_dict(), model.config
    sd, info = load_state_dict(weights, quick_gelu=quick_gelu)
    return sd, info.get("config")


def build_clip(weights: str, arch: str, quick_gelu=None, cache=None):
    """A fresh fp32 CLIP for each call; `cache` (a dict) keeps the state dict between seeds."""
    key = (weights, arch, quick_gelu)
    if cache is None or key not in cache:
        state = load_clip_state(weights, arch, quick_gelu)
        if cache is not None:
            cache[key] = state
    else:
        state = cache[key]
    sd, config = state
    return build_model(sd, config=config)


def adapt(model, adapter_cfg: AdapterConfig, init: str | None = None,
          clip_norm: bool | None = None):
    """Apply adapters to `model` (a CLIP) and load `--init` adapter weights when given (and
    its fine-tuned backbone, if it has one); warns when --init's normalisation differs."""
    apply_adapter(model, adapter_cfg)
    if init:
        load_adapter(model, init, clip_norm)
    return model


def freeze_blocks_after(visual: nn.Module, deepest: int):
    """Blocks past the deepest one a head reads never run (pool=False), so their adapters would
    get no gradient; keeping them out of the optimiser spares DDP find_unused_parameters."""
    for i, block in enumerate(visual.transformer.resblocks):
        if i > deepest:
            block.requires_grad_(False)
    for p in (visual.ln_post.weight, visual.ln_post.bias, visual.proj,
              getattr(visual, "proj_bias", None)):
        if p is not None:  # a tower without projection (output_dim=0) has proj None
            p.requires_grad_(False)


def _backbone_weights(cfg) -> str:
    """--weights' default names CLIP's ViT-B/16; for another backbone it means its own file."""
    return "default" if cfg.weights == "ViT-B/16" else cfg.weights


def build_tower(cfg, cache: dict | None = None) -> nn.Module:
    """A --backbone other than CLIP (backbones.py), held as `.visual` like CLIP's tower, so its
    adapter keys read `visual.*` as CLIP's do. The loaded tower is cached between seeds."""
    key = ("tower", cfg.backbone, cfg.weights, cfg.arch, getattr(cfg, "dinov2_official", False))
    if cache is None or key not in cache:
        arch = cfg.arch if cfg.arch == "tiny" else None  # the baselines are ViT-B
        tower = backbones.build(cfg.backbone, _backbone_weights(cfg), arch,
                                official=getattr(cfg, "dinov2_official", False))
        if cache is None:
            cache = {}
        cache[key] = tower
    holder = nn.Module()
    holder.visual = copy.deepcopy(cache[key])
    return holder


def cls_head_of(cfg) -> str:
    """--cls-head auto: the backbone's official head (backbones.BackboneSpec.cls_head): the MLP
    for CLIP, Dropout(0.5) + Linear for MetaCLIP, BiomedCLIP and UniMedCLIP."""
    kind = getattr(cfg, "cls_head", "auto")
    if kind != "auto":
        return kind
    kind = backbones.spec(cfg.backbone).cls_head
    return kind if kind in ("mlp", "pool", "linear") else "mlp"  # dinov2 --head proposed


def build_resnet18(cfg, task: str, num_classes: int) -> nn.Module:
    """Table 3's reference row: torchvision's ResNet18, fc -> Linear(512, classes), every
    parameter trained (so its checkpoints hold model_state_dict)."""
    if task != "cls":
        raise ValueError("--backbone resnet18 is Table 3's classification reference: run it "
                         "with train_cls.py")
    if cfg.adapter != "none" or cfg.init:
        raise ValueError("--backbone resnet18 trains every weight, without adapters, as the "
                         "paper's row: pass --adapter none and no --init")
    arch = getattr(cfg, "arch", None)
    if arch not in (None, "ViT-B/16", "tiny"):
        raise ValueError(f"--arch {arch} names a CLIP ViT; --backbone resnet18 has one size")
    resnet = backbones.build("resnet18", _backbone_weights(cfg), num_classes=num_classes)
    return backbones.ResNetClassifier(resnet, backbones.input_norm("resnet18", cfg.clip_norm))


def make_task_model(cfg, task: str, adapter_cfg: AdapterConfig, cache: dict, device, seed: int,
                    num_classes: int = 2):
    """CLIP (+ adapters, + --init) -> vision tower + head, with the official freezing rule
    (adapters.freeze_backbone): the head trains, the adapters unless `--adapter-train no`."""
    rowmodels.check_flags(cfg)
    torch.manual_seed(seed)
    if rowmodels.owns(cfg):  # U-Net, CLIPSeg, DINOv2 with its official heads
        clip_fn = partial(build_clip, cfg.weights, cfg.arch, cache=cache)
        tower_fn = lambda: build_tower(cfg, cache).visual  # noqa: E731
        return rowmodels.build_row_model(cfg, task, clip_fn, tower_fn, num_classes).to(device)
    if cfg.backbone not in BACKBONES:
        raise ValueError(f"--backbone {cfg.backbone!r} cannot be built; choose from "
                         f"{BACKBONES + rowmodels.SEG_ONLY}")
    if cfg.backbone == "resnet18":
        return build_resnet18(cfg, task, num_classes).to(device)
    holder = build_clip(cfg.weights, cfg.arch, cache=cache) if cfg.backbone == "clip" else \
        build_tower(cfg, cache)
    visual = adapt(holder, adapter_cfg, cfg.init or None, cfg.clip_norm).visual
    model = build_task_model(visual, task, tuple(cfg.layers), cfg.reduce_dim, cfg.fuse,
                             num_classes=num_classes, cls_head=cls_head_of(cfg),
                             norm=backbones.input_norm(cfg.backbone, cfg.clip_norm))
    freeze_backbone(model, train_adapters=adapter_trains(cfg.adapter, cfg.adapter_train))
    freeze_blocks_after(model.visual, max(cfg.layers))
    return model.to(device)
