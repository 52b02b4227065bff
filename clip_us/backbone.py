"""Building the CLIP backbone the scripts share: weights (or a random init), adapters, `--init`.

Kept apart from engine.py so that the training loop pieces stay model-agnostic, and apart from
weights.py so that file stays about files and formats.
"""
from __future__ import annotations

import torch

from .adapters import AdapterConfig, apply_adapter, load_adapter_state_dict
from .engine import ADAPTER_KEYS, freeze_blocks_after, load_checkpoint
from .model import build_model


def load_clip_state(weights: str, arch: str, quick_gelu=None):
    """(state dict, config overrides) for `--weights NAME|PATH|none` and `--arch`.

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
    from .weights import load_state_dict  # file formats, downloads: only when weights are named
    sd, info = load_state_dict(weights, quick_gelu=quick_gelu)
    return sd, info


def build_clip(weights: str, arch: str, quick_gelu=None, cache=None):
    """A fresh fp32 CLIP for each call; `cache` (a dict) keeps the state dict between seeds."""
    key = (weights, arch, quick_gelu)
    if cache is None or key not in cache:
        state = load_clip_state(weights, arch, quick_gelu)
        if cache is not None:
            cache[key] = state
    else:
        state = cache[key]
    sd, meta = state
    config = meta if weights == "none" else meta.get("config")
    return build_model(sd, config=config)


def adapt(model, adapter_cfg: AdapterConfig, init: str | None = None):
    """Apply adapters to `model` (a CLIP) and load `--init` weights when given."""
    apply_adapter(model, adapter_cfg)
    if init:
        ckpt = load_checkpoint(init)
        if "adapter_config" not in ckpt or "adapter_state_dict" not in ckpt:
            raise KeyError(f"--init {init} has no adapter_config/adapter_state_dict; it must be a "
                           f"checkpoint written by a clip_us script")
        load_adapter_state_dict(model, ckpt["adapter_state_dict"], ckpt["adapter_config"])
    return model


def make_task_model(cfg, task: str, adapter_cfg: AdapterConfig, cache: dict, device, seed: int,
                    num_classes: int = 2):
    """CLIP (+ adapters, + --init) -> vision tower + head, with the official freezing rule.

    The official code trains every backbone parameter whose name has "mona" and nothing else of
    the backbone. `--adapter-train no` keeps the adapters at their initial or --init weights,
    which is how the official code ends up treating LoRA in the supervised stage.
    """
    from .heads import build_task_model
    torch.manual_seed(seed)
    clip = adapt(build_clip(cfg.weights, cfg.arch, cache=cache), adapter_cfg, cfg.init or None)
    model = build_task_model(clip.visual, task, tuple(cfg.layers), cfg.reduce_dim, cfg.fuse,
                             num_classes=num_classes,
                             cls_head=getattr(cfg, "cls_head", "mlp"))
    for name, p in model.named_parameters():
        is_adapter = any(a in name for a in ADAPTER_KEYS)
        p.requires_grad_(name.startswith("head.") or (is_adapter and cfg.adapter_train == "yes"))
    freeze_blocks_after(model.visual, max(cfg.layers))
    return model.to(device)
