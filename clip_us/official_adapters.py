"""The official NextGen-UIA adapter files (seed 003's code, jinggqu/NextGen-UIA) in clip_us keys.

Two formats come out of the official fine-tuning and supervised scripts:

- Mona: ``best_model.pth``, a plain dict of every vision-block Mona tensor under the name the
  official injection gives it, ``visual.transformer.resblocks.N.mona.<part>`` (one Mona after
  each block, our ``after_block`` placement, which calls it ``mona2``). The part names match ours
  (project1, project2, norm, gamma, gammax, adapter_conv.conv1/2/3, adapter_conv.projector).
  The official scripts default to the ``noise_aware`` variant (an extra
  ``adapter_conv.noise_estimator``) or ``freq_enhanced`` (``adapter_conv.freq_filter``); seed 003
  describes the baseline Mona, which is what clip_us builds, so other variants are refused with
  the keys that do not fit.
- LoRA: a dict ``{"adapter_type": "lora", "lora_r", "lora_alpha", "lora_dropout",
  "lora_state_dict"}``. The official attention splits q, k, v into ``attn.q_proj`` ... and names
  the output projection ``attn.proj``; each LoRA pair is ``<layer>.w_lora_A`` [r, in] and
  ``<layer>.w_lora_B`` [out, r], scaled by alpha / sqrt(r) (our "rslora" scaling). They map onto
  ``attn.lora_A_q`` ... and ``attn.out_proj.lora_A`` without any change to the values.

Each converter returns ``(adapter settings as a dict of AdapterConfig fields, state dict in
clip_us keys)``. Stand-alone: nothing else from clip_us.
"""
from __future__ import annotations

import re

__all__ = ["is_official_mona", "is_official_lora", "convert_official_mona",
           "convert_official_lora", "MONA_PARTS"]

MONA_KEY = re.compile(r"^visual\.transformer\.resblocks\.(\d+)\.mona\.(.+)$")
MONA_PARTS = {"norm.weight", "norm.bias", "gamma", "gammax", "project1.weight", "project1.bias",
              "project2.weight", "project2.bias", "adapter_conv.projector.weight",
              "adapter_conv.projector.bias"} | {
    f"adapter_conv.conv{i}.{t}" for i in (1, 2, 3) for t in ("weight", "bias")}
VARIANT_HINTS = {"noise_estimator": "noise_aware", "freq_filter": "freq_enhanced"}
LORA_KEY = re.compile(r"^(.*\.attn)\.(q|k|v)?_?proj\.w_lora_(A|B)$")


def is_official_mona(obj) -> bool:
    """A plain dict whose keys are all `visual.transformer.resblocks.N.mona.*` tensors."""
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and MONA_KEY.match(k) for k in obj)


def is_official_lora(obj) -> bool:
    return isinstance(obj, dict) and obj.get("adapter_type") == "lora" and "lora_state_dict" in obj


def _variant(keys) -> str:
    found = {v for k in keys for hint, v in VARIANT_HINTS.items() if hint in k}
    return " or ".join(sorted(found)) or "an unknown variant"


def convert_official_mona(sd: dict) -> tuple[dict, dict]:
    """best_model.pth -> (Mona settings, state dict with `...resblocks.N.mona2.<part>` keys)."""
    unknown = [k for k in sd if MONA_KEY.match(k).group(2) not in MONA_PARTS]
    if unknown:
        raise ValueError(
            f"this Mona file is the official code's {_variant(unknown)} Mona, not the baseline "
            f"Mona of seed 003 that clip_us builds: {len(unknown)} keys do not fit, e.g. "
            f"{unknown[:4]}. Re-run the official fine-tuning with --mona_variant baseline, or "
            f"use a clip_us checkpoint.")
    out = {}
    for k, v in sd.items():
        block, part = MONA_KEY.match(k).groups()
        out[f"visual.transformer.resblocks.{block}.mona2.{part}"] = v
    first = next(k for k in sd if k.endswith("project1.weight"))
    settings = {"kind": "mona", "bottleneck": int(sd[first].shape[0]), "placement": "after_block"}
    return settings, out


def convert_official_lora(ckpt: dict) -> tuple[dict, dict]:
    """The official LoRA dict -> (LoRA settings, state dict with clip_us LoRA keys).

    Only the LoRA tensors are taken; any frozen base weights the dict may also hold are the
    CLIP weights the model already has, and are left out.
    """
    out, targets = {}, set()
    for k, v in ckpt["lora_state_dict"].items():
        m = LORA_KEY.match(k)
        if m is None:
            if "lora" in k:
                raise ValueError(f"official LoRA file: key {k!r} is not a q/k/v/out projection "
                                 f"LoRA tensor of the vision tower; clip_us cannot place it")
            continue
        attn, target, ab = m.groups()
        target = target or "o"
        targets.add(target)
        name = f"{attn}.lora_{ab}_{target}" if target != "o" else f"{attn}.out_proj.lora_{ab}"
        out[name] = v
    if not out:
        raise ValueError("official LoRA file: lora_state_dict holds no `*_proj.w_lora_A/B` tensors")
    settings = {"kind": "lora", "r": int(ckpt.get("lora_r", 16)),
                "alpha": float(ckpt.get("lora_alpha", 32)),
                "lora_dropout": float(ckpt.get("lora_dropout", 0.1)), "scaling": "rslora",
                "targets": tuple(t for t in ("q", "k", "v", "o") if t in targets)}
    return settings, out
