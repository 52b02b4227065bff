"""CLIPSeg's decoder on our CLIP (Lüddecke & Ecker, "Image Segmentation Using Text and Image
Prompts", CVPR 2022): the CLIPSeg row of Table 2 of the ultrasound-CLIP paper (Qu et al.,
"Adapting Vision-Language Foundation Model for Next Generation Medical Ultrasound Image Analysis").

Its official code (NextGen-UIA) conditions the `CIDAS/clipseg-rd64-refined` decoder on a frozen
OpenAI CLIP ViT-B/16 and trains the decoder alone. The decoder (reduce_dim 64):
- the activations of vision blocks 3, 6 and 9 (0-indexed, CLS included, before any final norm),
  deepest first, each reduced to 64 channels by a Linear and added to the running output;
- after the first reduction, FiLM conditioning on the prompt's CLIP text embedding:
  `x = film_mul(t) * x + film_add(t)`;
- after each reduction one post-norm transformer layer (4 heads, ReLU MLP of 2048, no dropout);
- CLS dropped, tokens reshaped to the patch grid, then the "refined" up-sampling: conv3x3 -> ReLU
  -> transposed conv (kernel = stride = patch/4, to 32 channels) -> ReLU -> transposed conv
  (patch/4, to 1 channel). With patch 16 that is x16: the output has the input's size.
- a single-channel output; `two_class_logits` turns it into [-z, z], as the official adapter does.
- the prompt (`prompt_for`): one description of benign and malignant findings per data set; by
  default the official row's (`OFFICIAL_PROMPTS`, NextGen-UIA's src/models/clipseg/prompt.py),
  with `--clipseg-prompts ours` the paper's §4.3 wording (`OUR_PROMPTS`).

Our decoder keeps the CLIPSeg authors' own parameter names (`film_mul`, `reduces.N`,
`blocks.N.self_attn.in_proj_weight`, `blocks.N.linear1`, `trans_conv.N`). `load_clipseg` reads a
Hugging Face `CLIPSegForImageSegmentation` folder and maps its `decoder.*` names to these; its
`clip.*` tensors go through weights.py's Hugging Face CLIP conversion. Unlike transformers, which
assumes a square patch grid, the grid comes from the image, so non-square inputs work.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..model import CLIP, build_model, config_from_state_dict
from ..weights import hf_settings, hf_to_openai, load_state_dict, read_checkpoint


@dataclass
class CLIPSegConfig:
    """The decoder's sizes; defaults are CIDAS/clipseg-rd64-refined's on a ViT-B/16."""
    extract_layers: list = field(default_factory=lambda: [3, 6, 9])
    reduce_dim: int = 64
    heads: int = 4
    mlp_dim: int = 2048
    cond_layer: int = 0             # FiLM after the first (deepest) reduction
    refined: bool = True            # "complex transposed convolution" of the rd64-refined weights
    vision_width: int = 768
    patch_size: int = 16
    cond_dim: int = 512             # CLIP's joint embedding size (text_projection's output)
    ln_eps: float = 1e-5


class DecoderBlock(nn.Module):
    """Post-norm transformer layer, nn.TransformerEncoderLayer's layout (ReLU, no dropout)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, eps: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(dim, mlp_dim), nn.Linear(mlp_dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.self_attn(x, x, x, need_weights=False)[0])
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


def _up_sampler(cfg: CLIPSegConfig) -> nn.Module:
    if not cfg.refined:  # the plain variant: one transposed conv by the patch size
        return nn.ConvTranspose2d(cfg.reduce_dim, 1, cfg.patch_size, stride=cfg.patch_size)
    k, d = cfg.patch_size // 4, cfg.reduce_dim
    return nn.Sequential(nn.Conv2d(d, d, kernel_size=3, padding=1), nn.ReLU(),
                         nn.ConvTranspose2d(d, d // 2, kernel_size=k, stride=k), nn.ReLU(),
                         nn.ConvTranspose2d(d // 2, 1, kernel_size=k, stride=k))


class CLIPSegDecoder(nn.Module):
    """Block activations [B, 1 + h*w, width] (as extracted) + prompt embedding [B, cond_dim]
    -> logits [B, H', W'] (H' = h * patch with patch 16)."""

    def __init__(self, cfg: CLIPSegConfig):
        super().__init__()
        self.cfg = cfg
        self.film_mul = nn.Linear(cfg.cond_dim, cfg.reduce_dim)
        self.film_add = nn.Linear(cfg.cond_dim, cfg.reduce_dim)
        n = len(cfg.extract_layers)
        self.reduces = nn.ModuleList(nn.Linear(cfg.vision_width, cfg.reduce_dim) for _ in range(n))
        self.blocks = nn.ModuleList(DecoderBlock(cfg.reduce_dim, cfg.heads, cfg.mlp_dim, cfg.ln_eps)
                                    for _ in range(n))
        self.trans_conv = _up_sampler(cfg)

    def forward(self, feats: list[torch.Tensor], cond: torch.Tensor, grid: tuple[int, int]):
        x = None
        for i, (act, reduce, block) in enumerate(zip(feats[::-1], self.reduces, self.blocks)):
            x = reduce(act) if x is None else reduce(act) + x
            if i == self.cfg.cond_layer:  # FiLM: one scale and shift per channel, per image
                x = self.film_mul(cond)[:, None] * x + self.film_add(cond)[:, None]
            x = block(x)
        x = x[:, 1:].transpose(1, 2)  # drop CLS: [B, h*w, D] -> [B, D, h*w]
        x = x.reshape(x.shape[0], x.shape[1], *grid)  # [B, D, h, w]
        return self.trans_conv(x).squeeze(1)  # [B, 1, H', W'] -> [B, H', W']


class CLIPSeg(nn.Module):
    """A frozen CLIP and a trainable CLIPSeg decoder: `model(images, input_ids)` -> [B, H', W']."""

    def __init__(self, clip: CLIP, cfg: CLIPSegConfig | None = None):
        super().__init__()
        cfg = cfg or CLIPSegConfig(vision_width=clip.visual.width,
                                   patch_size=clip.visual.patch_size,
                                   cond_dim=clip.text_projection.shape[1])
        _check_sizes(clip, cfg)
        self.config = cfg
        self.clip = clip.requires_grad_(False)  # frozen, as in the official code
        self.decoder = CLIPSegDecoder(cfg)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] (CLIP-normalised); input_ids [B, L] or [1, L] (one prompt for all)."""
        return decode(self.clip, self.decoder, images, input_ids)


def decode(clip: CLIP, decoder: CLIPSegDecoder, images: torch.Tensor, input_ids: torch.Tensor):
    """The frozen CLIP's blocks and prompt embedding through the decoder: logits [B, H', W']."""
    if input_ids.shape[0] not in (1, images.shape[0]):
        raise ValueError(f"{input_ids.shape[0]} prompts for {images.shape[0]} images; pass "
                         "one prompt per image or one for the whole batch")
    with torch.no_grad():  # CLIP is frozen: no activations kept for its backward
        _, feats = clip.visual(images, return_blocks=tuple(decoder.cfg.extract_layers), pool=False)
        cond = clip.encode_text(input_ids).expand(images.shape[0], -1)  # [B, cond_dim]
    p = clip.visual.patch_size
    return decoder(feats, cond, (images.shape[-2] // p, images.shape[-1] // p))


def _check_sizes(clip: CLIP, cfg: CLIPSegConfig):
    have = (clip.visual.width, clip.visual.patch_size, clip.text_projection.shape[1])
    want = (cfg.vision_width, cfg.patch_size, cfg.cond_dim)
    if have != want:
        raise ValueError(f"the CLIPSeg decoder expects a CLIP with vision width, patch size and "
                         f"embedding size {want}, but this CLIP has {have}; pass the CLIP "
                         "weights the decoder was trained on")


def two_class_logits(logits: torch.Tensor, size) -> torch.Tensor:
    """Single-channel [B, H', W'] -> [B, 2, H, W] as the official adapter: background -z,
    foreground z (softmax then gives sigmoid(2z)); bilinearly resized when the sizes differ."""
    z = logits[:, None]  # [B, 1, H', W']
    if tuple(z.shape[-2:]) != tuple(size):
        z = F.interpolate(z, size=tuple(size), mode="bilinear", align_corners=False)
    return torch.cat([-z, z], dim=1)


class CLIPSegTaskModel(nn.Module):
    """The CLIPSeg row as train_seg.py trains it: images -> two-class logits [B, 2, H, W] at the
    input size, conditioned on one fixed prompt. The decoder sits under `head`, so a checkpoint's
    head_state_dict holds everything that trains; the CLIP stays frozen."""

    def __init__(self, model: CLIPSeg, prompt_ids: torch.Tensor):
        super().__init__()
        self.clip, self.head = model.clip, model.decoder
        self.register_buffer("prompt_ids", prompt_ids[:1].clone(), persistent=False)  # [1, L]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        z = decode(self.clip, self.head, images, self.prompt_ids)
        return two_class_logits(z, images.shape[-2:])


# ----------------------------------------------------------------------------- prompts

# The official CLIPSeg row's prompts (NextGen-UIA src/models/clipseg/prompt.py, chosen per data
# set by get_prompt in src/models/clipseg/segmentation.py: LN-INT and LN-EXT -> ln, BUSI -> busi,
# DDTI and TN3K -> thyroid, Prostate -> prostate). Data: copied character for character.
_OFFICIAL_THYROID = ("Benign thyroid nodule: oval, wider-than-tall, homogeneous, smooth margins, "
                     "intact capsule. Malignant thyroid nodule: taller-than-wide, hypoechoic, "
                     "irregular margins, microcalcifications, capsular/extra-thyroidal invasion.")
OFFICIAL_PROMPTS = {
    "ln": ("Benign lymph node: Oval shape, preserved echogenic hilum, thin homogeneous cortex. "
           "Malignant lymph node: Round, lost hilum, thickened/heterogeneous cortex, "
           "microcalcifications, irregular margins."),
    "busi": ("Benign breast lesion: Oval shape, smooth margins, parallel orientation, homogeneous "
             "hypoechoic echotexture, posterior enhancement. Malignant breast lesion: Irregular "
             "shape, spiculated margins, non-parallel orientation, heterogeneous hypoechoic "
             "echotexture, microcalcifications, posterior shadowing."),
    "ddti": _OFFICIAL_THYROID, "tn3k": _OFFICIAL_THYROID,
    "prostate": ("Benign prostate: smooth, symmetric TZ enlargement with heterogeneous nodules and "
                 "intact capsule; Malignant prostate: focal peripheral-zone hypoechoic lesion with "
                 "irregular margins, capsular breach and increased Doppler flow."),
}

# Ours (--clipseg-prompts ours): the ultrasound-CLIP paper's §4.3 zero-shot prompts without their final
# sentence ("The abnormality in this ... scan is {label}"), which names a class and so cannot
# condition a class-agnostic mask. LN and BUSI: the paper's words. Thyroid and prostate: the same
# form from the standard sonographic criteria (ACR TI-RADS; transrectal ultrasound of the
# prostate). Phantom: the features clip_us.phantom draws; the official code has no phantom, so
# both sets use this one for it.
_THYROID = ("Benign: Oval, wider-than-tall, smooth margins, isoechoic or spongiform, thin uniform "
            "halo. Malignant: Taller-than-wide, markedly hypoechoic, solid, irregular or lobulated "
            "margins, microcalcifications, extrathyroidal extension.")
OUR_PROMPTS = {
    "ln": ("Benign: Oval shape, preserved echogenic hilum, thin homogeneous cortex. Malignant: "
           "Round, absent hilum, thickened/heterogeneous cortex, microcalcifications, irregular "
           "margins."),
    "busi": ("Benign: Oval shape, smooth margins, parallel orientation, homogeneous hypoechoic "
             "echotexture, posterior enhancement. Malignant: Irregular shape, spiculated margins, "
             "non-parallel orientation, heterogeneous hypoechoic echotexture, microcalcifications, "
             "posterior acoustic shadowing."),
    "ddti": _THYROID, "tn3k": _THYROID,
    "prostate": ("Benign: Smooth symmetric transition-zone enlargement, well-defined nodules, "
                 "intact capsule. Malignant: Hypoechoic peripheral-zone lesion, irregular margins, "
                 "asymmetry, capsular bulge or breach, increased vascularity."),
    "phantom": ("Benign: Oval shape, smooth margins, posterior enhancement. Malignant: Irregular "
                "shape, spiculated margins, microcalcifications, posterior acoustic shadowing."),
}
PROMPT_SETS = {"official": {**OUR_PROMPTS, **OFFICIAL_PROMPTS}, "ours": OUR_PROMPTS}


def prompt_key(dataset: str) -> str:
    """A data set's key in the prompt tables: --dataset, or a NextGen-UIA name (--nextgen-name)
    in any case and spelling: 'LN-1', 'ln2', 'LN-INT', 'LN-EXT' -> 'ln'; 'BUSI' -> 'busi'."""
    key = re.sub(r"[-_ ]", "", dataset.lower())
    return "ln" if key in ("ln", "ln1", "ln2", "lnint", "lnext") else key


def prompt_for(dataset: str, override: str = "", prompts: str = "official") -> str:
    """The CLIPSeg prompt of a data set (prompt_key) in `prompts` (--clipseg-prompts: official =
    NextGen-UIA's prompt.py, ours = the paper's §4.3 wording). `override` (--prompt) replaces it,
    so it cannot be combined with --clipseg-prompts ours."""
    if prompts not in PROMPT_SETS:
        raise ValueError(f"--clipseg-prompts must be one of {sorted(PROMPT_SETS)}, got "
                         f"{prompts!r}")
    if override:
        if prompts != "official":
            raise ValueError("--prompt replaces the prompt set's text; pass --prompt or "
                             "--clipseg-prompts ours, not both")
        return override
    key = prompt_key(dataset)
    if key not in PROMPT_SETS[prompts]:
        raise ValueError(f"no CLIPSeg prompt for data set {dataset!r} (known: "
                         f"{sorted(PROMPT_SETS[prompts])}); name the data set with --nextgen-name "
                         "(e.g. LN-1), or describe its benign and malignant findings with --prompt")
    return PROMPT_SETS[prompts][key]


# ----------------------------------------------------------------------------- loading

def _read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} has no config.json; pass a Hugging Face "
                                "CLIPSegForImageSegmentation folder (e.g. CIDAS/clipseg-rd64-refined)")
    with open(path, encoding="utf-8") as f:
        hf = json.load(f)
    if hf.get("model_type") != "clipseg":
        raise ValueError(f"{path}: model_type is {hf.get('model_type')!r}, not 'clipseg'; pass "
                         "a CLIPSegForImageSegmentation folder")
    return hf


def config_from_hf(hf: dict) -> CLIPSegConfig:
    """Our decoder config from an HF CLIPSegConfig dict; absent fields take HF's defaults
    (save_pretrained may write only the fields that differ from them)."""
    vis = hf.get("vision_config") or {}
    return CLIPSegConfig(
        extract_layers=list(hf.get("extract_layers", [3, 6, 9])),
        reduce_dim=hf.get("reduce_dim", 64), heads=hf.get("decoder_num_attention_heads", 4),
        mlp_dim=hf.get("decoder_intermediate_size", 2048),
        cond_layer=hf.get("conditional_layer", 0),
        refined=hf.get("use_complex_transposed_convolution", False),
        vision_width=vis.get("hidden_size", 768), patch_size=vis.get("patch_size", 32),
        cond_dim=hf.get("projection_dim", 512), ln_eps=vis.get("layer_norm_eps", 1e-5))


# HF decoder names -> the CLIPSeg authors' names (ours), per module.
_HF_DECODER = {"layer_norm1": "norm1", "layer_norm2": "norm2", "mlp.fc1": "linear1",
               "mlp.fc2": "linear2", "self_attn.out_proj": "self_attn.out_proj"}


def _decoder_key(key: str) -> str:
    """'layers.0.mlp.fc1.weight' -> 'blocks.0.linear1.weight'; 'transposed_convolution.2.bias'
    -> 'trans_conv.2.bias'; film_mul/film_add/reduces keep their names."""
    if key.startswith("transposed_convolution"):
        return "trans_conv" + key[len("transposed_convolution"):]
    if key.startswith("layers."):
        _, n, rest = key.split(".", 2)
        module, leaf = rest.rsplit(".", 1)
        return f"blocks.{n}.{_HF_DECODER.get(module, module)}.{leaf}"
    return key


def decoder_from_hf(sd: dict) -> dict:
    """HF `decoder.*` tensors (prefix stripped) -> our decoder's state dict; q, k, v packed into
    in_proj (rows q, k, v, as nn.MultiheadAttention)."""
    out = {}
    for k, v in sd.items():
        if ".self_attn." in k and k.split(".")[-2] in ("q_proj", "k_proj", "v_proj"):
            continue
        out[_decoder_key(k)] = v
    layers = {k.split(".")[1] for k in sd if k.startswith("layers.")}
    for n in sorted(layers, key=int):
        for leaf in ("weight", "bias"):
            parts = [sd[f"layers.{n}.self_attn.{p}_proj.{leaf}"] for p in "qkv"]
            out[f"blocks.{n}.self_attn.in_proj_{leaf}"] = torch.cat(parts)
    return out


def _clip_from_folder(clip_sd: dict, hf: dict, folder: str) -> CLIP:
    """The folder's own CLIP towers, through weights.py's Hugging Face CLIP conversion."""
    sd = hf_to_openai(clip_sd)
    heads = hf_settings(hf, folder)
    cfg = config_from_state_dict(sd, quick_gelu=heads["quick_gelu"],
                                 vision_heads=heads["vision_heads"],
                                 transformer_heads=heads["transformer_heads"])
    return build_model(sd, config=cfg)


def _split(raw: dict, folder: str) -> tuple[dict, dict]:
    """(clip.* tensors, decoder.* tensors), prefixes stripped; anything else is an error."""
    parts = {"clip.": {}, "decoder.": {}}
    other = []
    for k, v in raw.items():
        prefix = next((p for p in parts if k.startswith(p)), None)
        if prefix is None:
            other.append(k)
        else:
            parts[prefix][k[len(prefix):]] = v
    if other or not parts["decoder."]:
        raise ValueError(f"{folder}: not a CLIPSegForImageSegmentation checkpoint (expected "
                         f"clip.* and decoder.* tensors; found {sorted(other)[:5]} and "
                         f"{len(parts['decoder.'])} decoder tensors)")
    return parts["clip."], parts["decoder."]


def _decoder_onto(clip: CLIP, hf: dict, dec_sd: dict, folder: str) -> CLIPSeg:
    model = CLIPSeg(clip, config_from_hf(hf))
    missing, unexpected = model.decoder.load_state_dict(decoder_from_hf(dec_sd), strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder}: decoder tensors do not match its config.json: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    return model.float().eval()


def load_clipseg(folder: str, clip_weights: str | None = None) -> CLIPSeg:
    """A CLIPSeg model from a Hugging Face CLIPSegForImageSegmentation folder (config.json, then
    model.safetensors or pytorch_model.bin, read with weights_only).

    With `clip_weights=None` the CLIP towers are the folder's own; otherwise they come from
    `clip_weights` (a name such as "ViT-B/16" or a path, through `clip_us.load_state_dict`), as
    the ultrasound-CLIP paper's official code pairs the decoder with OpenAI's CLIP. Returns an fp32
    model in eval mode.
    """
    hf = _read_config(folder)
    clip_sd, dec_sd = _split(read_checkpoint(folder)[0], folder)
    if clip_weights is None:
        clip = _clip_from_folder(clip_sd, hf, folder)
    else:
        sd, info = load_state_dict(clip_weights)
        clip = build_model(sd, config=info["config"])
    return _decoder_onto(clip, hf, dec_sd, folder)


def load_decoder(folder: str, clip: CLIP) -> CLIPSeg:
    """The folder's decoder on a CLIP the caller already has (the folder's CLIP is not built)."""
    hf = _read_config(folder)
    _, dec_sd = _split(read_checkpoint(folder)[0], folder)
    return _decoder_onto(clip, hf, dec_sd, folder)
