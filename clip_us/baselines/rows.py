"""The rows of the ultrasound-CLIP paper's Tables 2 and 3 (Qu et al., "Adapting Vision-Language
Foundation Model for Next Generation Medical Ultrasound Image Analysis") with heads of their own, as
the training scripts build them.

- `--backbone unet` (Table 2): the official vendored U-Net (unet.py), trained from scratch, every
  parameter; its checkpoint therefore holds `model_state_dict`. Segmentation only.
- `--backbone clipseg` (Table 2): CLIPSeg's rd64-refined decoder (clipseg.py) on the frozen CLIP
  of `--weights` (OpenAI's ViT-B/16 by default, as the official code), conditioned on the data
  set's description of benign and malignant findings: the official row's text by default,
  `--clipseg-prompts ours` for the paper's §4.3 wording, `--prompt TEXT` for free text. The decoder starts
  from `--clipseg-weights` (a Hugging Face CIDAS/clipseg-rd64-refined folder; "default" looks in
  the clip_us cache) or, with `none`, from random weights, announced. Segmentation only.
- `--backbone dinov2 --head official` (Tables 2 and 3): the frozen DINOv2 ViT-B/14 of
  backbones.py with the official code's heads (dinov2_heads.py); `--dinov2-official` builds it as
  that code did, without layer-scale. `--head proposed` is not built here: it is the generic
  backbone path (feature-reducing heads on blocks 3/6/9).

The builders take taskmodel.ModelSpec (`spec`: backbone, weights, adapter, head settings, ...);
`check_flags` alone reads the script's config, since it judges the flags given. `clip_fn` and
`tower_fn` are passed in by taskmodel.py (functions returning the run's CLIP and its --backbone
tower), so this file does not import the module that imports it.
"""
from __future__ import annotations

import os

from torch import nn

from ..fileio import cache_dir
from ..tokenizer import tokenize
from .backbones import OWN_HEAD_ROWS, input_norm
from .backbones import spec as backbone_spec
from .clipseg import CLIPSeg, CLIPSegTaskModel, load_decoder
from .dinov2_heads import DINOv2ClsHead, DINOv2SegHead, DINOv2TaskModel
from .unet import UNet

SEG_ONLY = tuple(OWN_HEAD_ROWS)  # U-Net and CLIPSeg: segmentation rows, not towers
CLIPSEG_FOLDER = "clipseg-rd64-refined"  # its folder in the clip_us cache
CLIPSEG_PUBLISHED = "https://huggingface.co/CIDAS/clipseg-rd64-refined (config.json, model.safetensors)"


def check_flags(cfg):
    """The flags of these rows name what they change: refused on rows they would not change."""
    given = [flag for flag, used, wanted in (
        ("--head proposed", cfg.head != "official", cfg.backbone == "dinov2"),
        ("--dinov2-official", cfg.dinov2_official, cfg.backbone == "dinov2"),
        ("--clipseg-weights", cfg.clipseg_weights != "default", cfg.backbone == "clipseg"),
        ("--prompt", bool(cfg.prompt), cfg.backbone == "clipseg"),
        ("--clipseg-prompts ours", cfg.clipseg_prompts != "official", cfg.backbone == "clipseg"))
        if used and not wanted]
    if given:
        raise ValueError(f"{', '.join(given)} do(es) nothing for --backbone {cfg.backbone}; "
                         "drop it, or pick the backbone it is for (dinov2, clipseg)")


def owns(spec) -> bool:
    """True when the spec's row is built here rather than from a ViT and the feature-reducing
    heads."""
    return spec.backbone in SEG_ONLY or (spec.backbone == "dinov2" and spec.head == "official")


def _check(spec, task: str):
    if spec.backbone in SEG_ONLY and task != "seg":
        raise ValueError(f"--backbone {spec.backbone} is a segmentation row (Table 2); "
                         "train_cls.py takes clip, dinov2 and the other backbones")
    if spec.adapter.kind != "none" or spec.init:
        raise ValueError(f"--backbone {spec.backbone} runs without adapters, as the paper's row; "
                         "pass --adapter none and no --init")


def _clipseg_folder(weights: str) -> str:
    folder = os.path.join(cache_dir(), CLIPSEG_FOLDER) if weights == "default" else weights
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(
            f"no CLIPSeg decoder in {folder}: download {CLIPSEG_PUBLISHED} into "
            f"{os.path.join(cache_dir(), CLIPSEG_FOLDER)} (or pass --clipseg-weights FOLDER), or "
            "pass --clipseg-weights none for a random decoder")
    return folder


def build_clipseg(spec, clip_fn) -> CLIPSegTaskModel:
    clip = clip_fn()
    if spec.from_checkpoint:  # --eval-only: the checkpoint holds the trained decoder (rd64's sizes)
        model = CLIPSeg(clip)
    elif spec.clipseg_weights == "none":
        print("!!! --clipseg-weights none: the CLIPSeg decoder starts from RANDOM weights; the "
              "paper's row starts from CIDAS/clipseg-rd64-refined. !!!")
        model = CLIPSeg(clip)
    else:
        model = load_decoder(_clipseg_folder(spec.clipseg_weights), clip)
    print(f"clip_us: CLIPSeg prompt: {spec.prompt!r}")
    return CLIPSegTaskModel(model, tokenize([spec.prompt]))


def build_dinov2(spec, task: str, num_classes: int, tower_fn) -> DINOv2TaskModel:
    tower = tower_fn()
    if spec.image_size != backbone_spec("dinov2").resolution:
        print(f"note: the official DINOv2 rows ran at {backbone_spec('dinov2').resolution} px; "
              f"this run uses {spec.image_size} px (--image-size)")
    head = (DINOv2SegHead if task == "seg" else DINOv2ClsHead)(tower.width, num_classes)
    # The pipeline normalises with CLIP's mean/std; DINOv2 was trained with ImageNet's.
    return DINOv2TaskModel(tower, head, input_norm("dinov2", spec.clip_norm))


def build_row_model(spec, task: str, clip_fn, tower_fn, num_classes: int = 2) -> nn.Module:
    """The task model of an `owns(spec)` row: images -> logits [B, classes, H, W] or [B, classes].
    `clip_fn()` gives the run's CLIP (CLIPSeg), `tower_fn()` the run's --backbone tower (DINOv2,
    with --dinov2-official applied)."""
    _check(spec, task)
    if spec.backbone == "unet":
        if spec.image_size % 16:
            raise ValueError(f"--backbone unet needs --image-size divisible by 16 (it pools 4 "
                             f"times), got {spec.image_size}; 224 and 128 work")
        return UNet(3, num_classes)
    if spec.backbone == "clipseg":
        return build_clipseg(spec, clip_fn)
    return build_dinov2(spec, task, num_classes, tower_fn)
