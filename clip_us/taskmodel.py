"""The model a training script trains: a CLIP backbone (weights or a random init), adapters,
`--init` adapter weights, a segmentation or classification head, and the freezing rule.

The ultrasound-CLIP paper (Qu et al., "Adapting Vision-Language Foundation Model for Next
Generation Medical Ultrasound Image Analysis") §3: CLIP ViT-B/16's vision tower with LoRA or Mona,
blocks 3/6/9 into the heads of heads.py. `--backbone` names the backbone; `clip` is the one built
here, the baselines in clip_us/baselines/.

The builders take a `ModelSpec` (what the model is), never a script's config: `model_spec(cfg,
adapter)` is the one place that reads a script config's model flags.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from .adapters import AdapterConfig, adapter_trains, apply_adapter, freeze_backbone, load_adapter
from .baselines import backbones
from .baselines import rows as rowmodels
from .baselines.clipseg import prompt_for
from .heads import build_task_model
from .weights import build_clip

BACKBONES = tuple(backbones.BACKBONES)  # clip and the baselines of backbones.py


@dataclass(frozen=True)
class ModelSpec:
    """What a task model is, and nothing else of a script's config (built by `model_spec`)."""
    backbone: str            # clip, a tower of baselines/backbones.py or a row of baselines/rows.py
    weights: str             # a published name, a file or folder, or "none" (random, announced)
    arch: str                # CLIP architecture ("tiny": tests and demos)
    adapter: AdapterConfig   # the adapter in the vision tower (kind "none": no adapter)
    train_adapters: bool     # the supervised stage trains the adapter (adapters.adapter_trains)
    init: str                # checkpoint whose adapter (and fine-tuned backbone) to start from
    clip_norm: bool          # input normalised with CLIP's mean/std, else [0, 1] pixels
    image_size: int          # model input side in pixels
    layers: tuple            # vision blocks (0-based) the head reads
    reduce_dim: int          # feature reducer width
    fuse: str                # how the reduced blocks are fused: sum or concat
    cls_head: str            # auto (the backbone's official head), mlp, pool or linear
    head: str                # dinov2: the official code's heads, or the proposed ones
    dinov2_official: bool    # dinov2 built as the official code did (no layer-scale)
    clipseg_weights: str     # CLIPSeg decoder: a folder, "default" (the cache's) or "none"
    prompt: str              # CLIPSeg's text: --prompt or the data set's description
    from_checkpoint: bool    # --eval-only: a checkpoint supplies the trained weights afterwards


def model_spec(cfg, adapter: AdapterConfig) -> ModelSpec:
    """The ModelSpec of a script config (train_seg.py's, train_cls.py's) and its adapter; the
    flags of the rows with heads of their own are refused here where they would change nothing."""
    rowmodels.check_flags(cfg)
    prompt = (prompt_for(cfg.nextgen_name or cfg.dataset, cfg.prompt, cfg.clipseg_prompts)
              if cfg.backbone == "clipseg" else "")
    return ModelSpec(
        backbone=cfg.backbone, weights=cfg.weights, arch=cfg.arch, adapter=adapter,
        train_adapters=adapter_trains(adapter.kind, cfg.adapter_train), init=cfg.init,
        clip_norm=cfg.clip_norm, image_size=cfg.image_size, layers=tuple(cfg.layers),
        reduce_dim=cfg.reduce_dim, fuse=cfg.fuse, cls_head=getattr(cfg, "cls_head", "auto"),
        head=cfg.head, dinov2_official=cfg.dinov2_official, clipseg_weights=cfg.clipseg_weights,
        prompt=prompt, from_checkpoint=cfg.eval_only)


def adapt(model, adapter_cfg: AdapterConfig, init: str | None = None,
          clip_norm: bool | None = None):
    """Apply `adapter_cfg`'s adapter to `model` (a CLIP) and freeze the rest. With `--init`, the
    adapter is the file's (its kind must be adapter_cfg's; its settings are the file's), with
    its weights and its fine-tuned backbone, if it has one; warns when --init's normalisation
    differs."""
    if not init:
        return apply_adapter(model, adapter_cfg)
    load_adapter(model, init, clip_norm, settings=adapter_cfg)
    return freeze_backbone(model) if adapter_cfg.kind != "none" else model


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


def _backbone_weights(spec: ModelSpec) -> str:
    """--weights' default names CLIP's ViT-B/16; for another backbone it means its own file."""
    return "default" if spec.weights == "ViT-B/16" else spec.weights


def build_tower(spec: ModelSpec, cache: dict | None = None) -> nn.Module:
    """A --backbone other than CLIP (backbones.py), held as `.visual` like CLIP's tower, so its
    adapter keys read `visual.*` as CLIP's do. The loaded tower is cached between seeds."""
    key = ("tower", spec.backbone, spec.weights, spec.arch, spec.dinov2_official)
    if cache is None or key not in cache:
        arch = spec.arch if spec.arch == "tiny" else None  # the baselines are ViT-B
        tower = backbones.build(spec.backbone, _backbone_weights(spec), arch,
                                official=spec.dinov2_official)
        if cache is None:
            cache = {}
        cache[key] = tower
    holder = nn.Module()
    holder.visual = copy.deepcopy(cache[key])
    return holder


def cls_head_of(spec: ModelSpec) -> str:
    """--cls-head auto: the backbone's official head (backbones.BackboneSpec.cls_head): the MLP
    for CLIP, Dropout(0.5) + Linear for MetaCLIP, BiomedCLIP and UniMedCLIP."""
    if spec.cls_head != "auto":
        return spec.cls_head
    kind = backbones.spec(spec.backbone).cls_head
    return kind if kind in ("mlp", "pool", "linear") else "mlp"  # dinov2 --head proposed


def build_resnet18(spec: ModelSpec, task: str, num_classes: int) -> nn.Module:
    """Table 3's reference row: torchvision's ResNet18, fc -> Linear(512, classes), every
    parameter trained (so its checkpoints hold model_state_dict)."""
    if task != "cls":
        raise ValueError("--backbone resnet18 is Table 3's classification reference: run it "
                         "with train_cls.py")
    if spec.adapter.kind != "none" or spec.init:
        raise ValueError("--backbone resnet18 trains every weight, without adapters, as the "
                         "paper's row: pass --adapter none and no --init")
    if spec.arch not in ("ViT-B/16", "tiny"):
        raise ValueError(f"--arch {spec.arch} names a CLIP ViT; --backbone resnet18 has one size")
    resnet = backbones.build("resnet18", _backbone_weights(spec), num_classes=num_classes)
    return backbones.ResNetClassifier(resnet, backbones.input_norm("resnet18", spec.clip_norm))


def vit_task_model(spec: ModelSpec, task: str, cache: dict, num_classes: int) -> nn.Module:
    """A ViT (CLIP, or a tower of baselines/backbones.py) with its adapter and --init, the head
    on its tapped blocks, and the freezing: the official rule (adapters.freeze_backbone), and
    the blocks past the deepest tapped one, which never run (freeze_blocks_after)."""
    holder = build_clip(spec.weights, spec.arch, cache=cache) if spec.backbone == "clip" else \
        build_tower(spec, cache)
    visual = adapt(holder, spec.adapter, spec.init or None, spec.clip_norm).visual
    model = build_task_model(visual, task, spec.layers, spec.reduce_dim, spec.fuse,
                             num_classes=num_classes, cls_head=cls_head_of(spec),
                             norm=backbones.input_norm(spec.backbone, spec.clip_norm))
    freeze_backbone(model, train_adapters=spec.train_adapters)
    freeze_blocks_after(model.visual, max(spec.layers))
    return model


def make_task_model(spec: ModelSpec, task: str, cache: dict, device, seed: int,
                    num_classes: int = 2):
    """CLIP (+ adapters, + --init) -> vision tower + head, with the official freezing rule
    (adapters.freeze_backbone): the head trains, the adapters unless `--adapter-train no`."""
    torch.manual_seed(seed)
    if rowmodels.owns(spec):  # U-Net, CLIPSeg, DINOv2 with its official heads
        clip_fn = partial(build_clip, spec.weights, spec.arch, cache=cache)
        tower_fn = lambda: build_tower(spec, cache).visual  # noqa: E731
        return rowmodels.build_row_model(spec, task, clip_fn, tower_fn, num_classes).to(device)
    if spec.backbone not in BACKBONES:
        raise ValueError(f"--backbone {spec.backbone!r} cannot be built; choose from "
                         f"{BACKBONES + rowmodels.SEG_ONLY}")
    if spec.backbone == "resnet18":
        return build_resnet18(spec, task, num_classes).to(device)
    return vit_task_model(spec, task, cache, num_classes).to(device)
