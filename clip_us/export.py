"""python -m clip_us.export CHECKPOINT --to open_clip|hf|openai OUT: a fine-tuned CLIP as a plain
checkpoint of another library, which loads it without clip_us.

    python -m clip_us.export runs/.../best.pt --to hf exported/         # config.json + model.safetensors
    python -m clip_us.export runs/.../best.pt --to open_clip clip.pt    # a plain state dict

What exports: train_contrastive.py's --train heads|image|text|full checkpoints, its --train
adapter --adapter lora ones, the LoRA checkpoints of train_seg.py / train_cls.py and the official
NextGen-UIA LoRA files (LoRA merged into the weights it adapts: lora.merge_lora). The fine-tuned CLIP is rebuilt exactly as `--init`
rebuilds it (the recorded --weights, then adapters.load_adapter), so the base weights must be
found. What does not: Mona adds a module after each vision block that no plain CLIP has, and
EchoCare-CLIP's dual encoder is not a CLIP. Each refusal is one line, exit status 2.

The activation travels with the file: `hidden_act` in the Hugging Face config.json, and for the
plain state dicts the printed line that loads it (an open_clip model name with or without
`-quickgelu`). docs/export.md has the details.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from .adapters import checkpoint_identity, describe, load_adapter
from .config import opt, parse_config, report_errors, required
from .fileio import load_checkpoint, save_checkpoint, write_json
from .lora import merge_lora
from .model import ARCHS, CLIP, CLIPConfig
from .weights import build_clip, hf_config_for, openai_to_hf, write_safetensors

FORMATS = ("open_clip", "hf", "openai")
# open_clip's names for our architectures; each also has a "-quickgelu" twin (open_clip's
# convention for OpenAI-trained weights), the same as create_model(name, force_quick_gelu=True).
OPEN_CLIP_NAMES = {"ViT-B/32": "ViT-B-32", "ViT-B/16": "ViT-B-16", "ViT-L/14": "ViT-L-14",
                   "ViT-L/14@336px": "ViT-L-14-336"}


@dataclass(kw_only=True)
class ExportCommand:
    """Write a fine-tuned CLIP as a plain open_clip, Hugging Face or OpenAI checkpoint."""
    checkpoint: str = required("a best.pt / last.pt of train_contrastive.py (--train "
                               "heads|image|text|full, or --adapter lora), a LoRA checkpoint of "
                               "train_seg.py / train_cls.py, or an official NextGen-UIA LoRA file "
                               "(with --weights)", positional=True)
    out: str = required("where to write: a folder (config.json + model.safetensors) for --to hf, "
                        "one file otherwise", positional=True)
    to: str = required("the library whose format to write: open_clip or openai (a plain state "
                       "dict with OpenAI's key names), hf (a transformers CLIPModel folder)",
                       choices=list(FORMATS))
    weights: str = opt("", "the base CLIP weights the checkpoint was fine-tuned from, when they "
                       "are no longer where it says (the same weights: a name, file or folder; "
                       "'' = the checkpoint's --weights)")
    debug: bool = opt(False, "show the traceback of an error")


# ----------------------------------------------------------------------------- what can be exported
def refusal(what: dict, path) -> str | None:
    """Why the checkpoint of record `what` has no plain-CLIP form (None: it has one)."""
    if what["backbone"] == "echocare":
        return (f"{path} is {describe(what)}: a Swin image encoder with its own text encoder and "
                f"projection heads, not a CLIP, so no CLIP library can load it; use it with "
                f"evaluate.py --checkpoint {path} (from Python: clip_us.echocare.load)")
    if what["adapter"] == "mona":
        return (f"{path} is {describe(what)}: Mona adds a module after each vision block "
                f"(convolutions over the patch grid) that no plain CLIP has and that cannot be "
                f"merged into the block's weights; only LoRA (merged) and the --train "
                f"heads|image|text|full checkpoints export")
    if what["backbone"] != "clip":
        return (f"{path} is {describe(what)}: only --backbone clip checkpoints hold a CLIP; "
                f"this one holds a {what['backbone']} vision tower")
    return None


def base_clip(ckpt: dict, path, weights: str = "") -> CLIP:
    """The CLIP the checkpoint was fine-tuned from: its config's --weights and --arch (`weights`
    replaces a file that moved). Weights that cannot be found are named, with what to do."""
    cfg = ckpt.get("config") or {}
    name = weights or cfg.get("weights")
    if not name:
        raise ValueError(f"{path} does not record the CLIP weights it was fine-tuned from: pass "
                         f"--weights NAME|PATH (the same weights it was trained on)")
    try:
        return build_clip(name, cfg.get("arch", "ViT-B/16"))
    except (FileNotFoundError, RuntimeError) as e:
        raise FileNotFoundError(f"{path} needs its base weights --weights {name}, which cannot "
                                f"be found ({e}); put them back, or pass --weights PATH to the "
                                f"same weights") from e


def init_file(ckpt: dict, path) -> str:
    """The --init a train_seg.py / train_cls.py run started from ('' = none). It is read again,
    as config.init_for_eval does, since it may hold a fine-tuned backbone (a vision tower the
    run kept frozen, a text tower the task model never had); gone, it is named."""
    init = (ckpt.get("config") or {}).get("init") or ""
    if init and not os.path.isfile(init):
        raise FileNotFoundError(f"{path} was trained on top of --init {init}, which is not "
                                f"there: it may hold the fine-tuned backbone this export needs. "
                                f"Put it back at that path")
    return init


def mapped_checkpoint(path) -> dict:
    """The checkpoint with its tensors memory-mapped, not read: fine_tuned_clip needs only its
    record and config, and load_adapter, which takes a path (not this dict), reads the tensors,
    so they are read once. A file torch cannot map (a legacy pickle) or not load at all is read
    by load_checkpoint, whose errors say what is wrong."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 -- load_checkpoint reads it again and names the problem
        return load_checkpoint(path)


def fine_tuned_clip(path, weights: str = "") -> tuple[CLIP, dict]:
    """(the fine-tuned CLIP with LoRA merged, in eval mode; the checkpoint's record): the base
    weights, then the --init file if any, then the checkpoint's adapter and fine-tuned backbone,
    as a later `--init path` run would build it."""
    ckpt = mapped_checkpoint(path)
    what = checkpoint_identity(ckpt, path)
    why = refusal(what, path)
    if why:
        raise ValueError(why)
    clip = base_clip(ckpt, path, weights)
    for source in (init_file(ckpt, path), path):
        if source:
            load_adapter(clip, source)
    return merge_lora(clip, remove=True).eval(), what


# ----------------------------------------------------------------------------- writers
def own_bytes(t: torch.Tensor) -> torch.Tensor:
    """`t` when its storage holds just its bytes, else a copy (torch.save writes a view's whole
    storage). clone keeps the strides, so both save the same bytes."""
    alone = t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes
    return t if alone else t.clone()


def plain_state_dict(model: CLIP) -> dict:
    """Tensors only, fp32, none holding more than its own bytes: the model's tensors themselves
    (not copies: they are written at once and never changed), a view copied."""
    return {k: own_bytes(v.detach().float()) for k, v in model.state_dict().items()}


def save_plain(model: CLIP, out: str) -> None:
    # open_clip's CLIP keeps OpenAI's key names, so one plain state dict serves both libraries
    save_checkpoint(out, plain_state_dict(model))


def save_hf(model: CLIP, out: str) -> None:
    """A transformers CLIPModel folder, as save_pretrained writes it: config.json and
    model.safetensors, whose {"format": "pt"} metadata from_pretrained checks."""
    os.makedirs(out, exist_ok=True)
    write_safetensors(os.path.join(out, "model.safetensors"),
                      openai_to_hf(plain_state_dict(model)), {"format": "pt"})
    write_json(os.path.join(out, "config.json"), hf_config_for(model.config))


SAVERS = {"open_clip": save_plain, "openai": save_plain, "hf": save_hf}


def check_out(out: str, checkpoint: str, to: str) -> None:
    """OUT must not be the checkpoint itself, nor a folder where a file goes (or the reverse)."""
    if os.path.exists(out) and os.path.exists(checkpoint) and os.path.samefile(out, checkpoint):
        raise ValueError(f"OUT {out} is the checkpoint itself: name a new file")
    if to == "hf" and os.path.isfile(out):
        raise NotADirectoryError(f"--to hf writes a folder, but {out} is a file: name a folder")
    if to != "hf" and os.path.isdir(out):
        raise IsADirectoryError(f"--to {to} writes one file, but {out} is a folder: name a file "
                                f"(e.g. {os.path.join(out, 'clip.pt')})")


def export(checkpoint: str, to: str, out: str, weights: str = "") -> tuple[CLIP, dict]:
    """Write the fine-tuned CLIP of `checkpoint` to `out` in format `to` (one of FORMATS);
    returns (the exported model, the checkpoint's record)."""
    if to not in SAVERS:
        raise ValueError(f"--to must be one of {FORMATS}, got {to!r}")
    check_out(out, checkpoint, to)
    model, what = fine_tuned_clip(checkpoint, weights)
    SAVERS[to](model, out)
    return model, what


# ----------------------------------------------------------------------------- how to load it
def activation(cfg: CLIPConfig) -> str:
    return "QuickGELU" if cfg.quick_gelu else "GELU"


def open_clip_line(cfg: CLIPConfig, out: str) -> str:
    """The open_clip call that loads `out`: a model name (with `-quickgelu` for QuickGELU) when
    one has these sizes, else open_clip's CLIP built from them."""
    arch = next((n for n, a in ARCHS.items()
                 if n in OPEN_CLIP_NAMES and replace(a, quick_gelu=cfg.quick_gelu) == cfg), None)
    if arch:
        name = OPEN_CLIP_NAMES[arch] + ("-quickgelu" if cfg.quick_gelu else "")
        return f"model = open_clip.create_model({name!r}, pretrained={out!r})"
    vision = {"image_size": cfg.image_resolution, "layers": cfg.vision_layers,
              "width": cfg.vision_width, "patch_size": cfg.vision_patch_size,
              "head_width": cfg.vision_width // cfg.vision_heads}  # open_clip counts heads by width
    text = {"context_length": cfg.context_length, "vocab_size": cfg.vocab_size,
            "width": cfg.transformer_width, "heads": cfg.transformer_heads,
            "layers": cfg.transformer_layers}
    return (f"model = open_clip.model.CLIP({cfg.embed_dim}, {vision}, {text}, quick_gelu="
            f"{cfg.quick_gelu}); model.load_state_dict(torch.load({out!r}, weights_only=True))")


def openai_line(cfg: CLIPConfig, out: str) -> str:
    """Whether OpenAI's clip.load builds this model right: it always uses QuickGELU and one head
    per 64 channels (its build_model)."""
    if cfg.quick_gelu and (cfg.vision_heads, cfg.transformer_heads) == (
            cfg.vision_width // 64, cfg.transformer_width // 64):
        return f"or with OpenAI's clip: model, preprocess = clip.load({out!r}, jit=False)"
    return (f"not with OpenAI's clip.load, which would build it with QuickGELU and one head per "
            f"64 channels (this one has {activation(cfg)}, {cfg.vision_heads}/"
            f"{cfg.transformer_heads} heads)")


def load_lines(to: str, cfg: CLIPConfig, out: str) -> list[str]:
    if to == "hf":
        act = hf_config_for(cfg)["text_config"]["hidden_act"]
        return [f"load it with: model = transformers.CLIPModel.from_pretrained({out!r})  "
                + f"(config.json says hidden_act {act})"]
    lines = [f"load it with: {open_clip_line(cfg, out)}"]
    return lines + [openai_line(cfg, out)] if to == "openai" else lines


def main(argv=None) -> None:
    a = parse_config(ExportCommand, argv, description=ExportCommand.__doc__,
                     epilog="\n\n".join(__doc__.split("\n\n")[1:]), prog="python -m clip_us.export")
    report_errors(a.debug)  # a refused or missing checkpoint: one line, exit status 2
    model, what = export(a.checkpoint, a.to, a.out, a.weights)
    print(f"exported {describe(what)} to {a.to}: {a.out} (activation {activation(model.config)}"
          f"{', LoRA merged' if what['adapter'] == 'lora' else ''})")
    print("\n".join(load_lines(a.to, model.config, a.out)))


if __name__ == "__main__":
    main()
