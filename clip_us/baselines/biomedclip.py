"""BiomedCLIP whole (Zhang et al., "BiomedCLIP: a multimodal biomedical foundation model pretrained
from fifteen million scientific image-text pairs", 2023), image and text towers, as open_clip
builds `hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224` (a CustomTextCLIP). It is
one of the two baselines EchoCare-CLIP compares against.

    model, tokenizer = clip_us.load_biomedclip("path/to/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")
    text = model.encode_text(tokenizer(["breast ultrasound showing a benign lesion"]))   # [1, 512]
    image = model.encode_image(model.transform()("image.png")[None])                      # [1, 512]

Neither embedding is normalised, as open_clip's `encode_*` (normalize=False).
- image: timm's ViT-B/16 (`visual.trunk.*`), built as baselines/backbones.py builds BiomedCLIP's
  tower (model.py's VisionTransformer); its CLS token after the final norm goes through
  `visual.head.proj`, Linear(768 -> 512, no bias) (open_clip's TimmModel, timm_proj "linear").
- text: PubMedBERT (`text.transformer.*`, Hugging Face BERT names) as clip_us.echocare.bert's
  BertModel; attention mask ids != 0 (open_clip: `x != pad_token_id`, 0 in BERT's config); the
  CLS token of the last hidden state (`cls_last_hidden_state_pooler`; BERT's own pooler is not
  built, so the file has none), then `text.proj`: Linear(768 -> 640) -> GELU -> Linear(640 ->
  512), no biases (open_clip's HFTextEncoder, hf_proj_type "mlp", hidden (768 + 512) // 2).
- tokenizer: open_clip's HFTokenizer: ftfy, HTML unescaped twice, whitespace collapsed (its
  "whitespace" clean), then the folder's WordPiece (clip_us.echocare.bert's; uncased as
  tokenizer_config.json says), [CLS] ... [SEP], truncated and padded with [PAD] to 256 ids
  (open_clip_config.json's context_length).

The folder is laid out as published: open_clip_pytorch_model.bin, open_clip_config.json, vocab.txt,
tokenizer_config.json. BERT's head count is not in its tensors, so the text tower's shape comes
from a BERT config.json in the folder when there is one, else PubMedBERT-base's (BERT-base: 12
layers of width 768, 12 heads); the ViT's from its tensors (one head per 64 channels). The
checkpoint is read with weights_only=True (clip_us.weights); transformers, timm and open_clip are
never imported.
"""
from __future__ import annotations

import dataclasses
import html
import json
import os

import ftfy
import torch
from torch import nn

from ..echocare.bert import (
    BertConfig,
    BertModel,
    WordPieceTokenizer,
    bert_state_dict,
    read_bert_config,
    read_do_lower_case,
)
from ..fileio import cache_dir
from ..model import VisionTransformer
from ..transform import CLIP_MEAN, CLIP_STD, Preprocess
from ..weights import read_checkpoint, state_dict_problems, unwrap
from .backbones import _under, spec, timm_to_ours, vit_sizes

PUBLISHED = "https://huggingface.co/microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
CACHE_NAME = "BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
WEIGHTS, CONFIG = "open_clip_pytorch_model.bin", "open_clip_config.json"
FILES = (WEIGHTS, CONFIG, "vocab.txt", "tokenizer_config.json")
PAD_ID = 0   # open_clip masks `ids != config.pad_token_id`, 0 for BERT
# open_clip_config.json settings this module implements: (section, key, open_clip's default, value)
LAYOUT = (("text_cfg", "hf_proj_type", "mlp", "mlp"),
          ("text_cfg", "hf_pooler_type", "mean_pooler", "cls_last_hidden_state_pooler"),
          ("vision_cfg", "timm_pool", "avg", ""),
          ("vision_cfg", "timm_proj", "linear", "linear"),
          ("vision_cfg", "timm_proj_bias", False, False))
# The weight file's tensors, by where they go (the rest is an error).
KNOWN = ("visual.trunk.", "visual.head.proj.", "text.transformer.", "text.proj.", "logit_scale")


# ----------------------------------------------------------------------------- tokenizer
def open_clip_clean(text: str) -> str:
    """open_clip's "whitespace" clean: ftfy, HTML unescaped twice, whitespace runs collapsed."""
    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split())


class BiomedCLIPTokenizer:
    """`tokenizer(texts) -> ids` LongTensor [N, context_length], as open_clip's HFTokenizer."""

    def __init__(self, wordpiece: WordPieceTokenizer, context_length: int = 256):
        self.wordpiece, self.context_length = wordpiece, context_length

    def __call__(self, texts) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids, _ = self.wordpiece([open_clip_clean(t) for t in texts], self.context_length)
        return ids


def _read_tokenizer(folder: str, context_length: int) -> BiomedCLIPTokenizer:
    """vocab.txt with tokenizer_config.json's casing; the options WordPieceTokenizer follows
    only at their defaults (accents stripped when lower-casing, CJK split) must be those."""
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    odd = {k: cfg[k] for k, ok in (("strip_accents", None), ("tokenize_chinese_chars", True))
           if cfg.get(k, ok) != ok}
    if odd:
        raise ValueError(f"{path}: {odd}; clip_us reads BERT tokenizers with strip_accents null and "
                         f"tokenize_chinese_chars true only (BiomedCLIP's, as published)")
    wordpiece = WordPieceTokenizer.from_file(os.path.join(folder, "vocab.txt"), read_do_lower_case(folder))
    if wordpiece.pad != PAD_ID:
        raise ValueError(f"{folder}/vocab.txt: [PAD] has id {wordpiece.pad}, but BiomedCLIP's text "
                         f"tower masks id {PAD_ID}: this vocabulary is not BiomedCLIP's")
    return BiomedCLIPTokenizer(wordpiece, context_length)


# ----------------------------------------------------------------------------- model
class BiomedCLIP(nn.Module):
    """Both towers; `image_features`/`text_features` are the pooled outputs before the heads
    `image_head` (open_clip's visual.head.proj) and `text_head` (text.proj)."""

    def __init__(self, vit: dict, bert: BertConfig, embed_dim: int, image_size: int = 224,
                 mean=CLIP_MEAN, std=CLIP_STD):
        super().__init__()
        self.visual = VisionTransformer(**vit, **spec("biomedclip").vit)   # output_dim 0: ln_post(CLS)
        self.image_head = nn.Linear(self.visual.width, embed_dim, bias=False)
        self.text = BertModel(bert)
        self.text.pooler = nn.Identity()   # open_clip: add_pooling_layer=False; BertModel returns (x, x)
        hidden = (bert.hidden_size + embed_dim) // 2
        self.text_head = nn.Sequential(nn.Linear(bert.hidden_size, hidden, bias=False), nn.GELU(),
                                       nn.Linear(hidden, embed_dim, bias=False))
        self.logit_scale = nn.Parameter(torch.tensor(1 / 0.07).log())   # open_clip's initial value
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] (normalised with self.mean/std) -> ln_post(CLS) [B, 768]."""
        return self.visual(pixels)

    def text_features(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] -> the CLS token of the last hidden state [B, 768]."""
        hidden, _ = self.text(ids, ids != PAD_ID)
        return hidden[:, 0]

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_head(self.image_features(pixels))

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_head(self.text_features(ids))

    def transform(self) -> Preprocess:
        """open_clip's eval transform for this model: bicubic resize of the shorter side, centre
        crop, open_clip_config.json's mean/std."""
        return Preprocess(self.image_size, self.mean, self.std)


# ----------------------------------------------------------------------------- loading
def find_folder(folder: str | None = None) -> str:
    """`folder`, else the clip_us cache's copy; it must hold every published file."""
    folder = folder or os.path.join(cache_dir(), CACHE_NAME)
    missing = [n for n in FILES if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        what = "does not exist" if not os.path.isdir(folder) else f"has no {', no '.join(missing)}"
        raise FileNotFoundError(
            f"BiomedCLIP folder {folder} {what}. Its authors publish {', '.join(FILES)} at "
            f"{PUBLISHED}: download them into one folder and pass its path, or put it at "
            f"{os.path.join(cache_dir(), CACHE_NAME)} (the clip_us cache, $CLIP_US_CACHE).")
    return folder


def read_open_clip_config(folder: str) -> dict:
    """open_clip_config.json, checked to be the layout this module builds."""
    path = os.path.join(folder, CONFIG)
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    model_cfg = cfg.get("model_cfg", {})
    odd = [f"{section}.{key} is {model_cfg.get(section, {}).get(key, default)!r}, not {want!r}"
           for section, key, default, want in LAYOUT
           if model_cfg.get(section, {}).get(key, default) != want]
    if odd:
        raise ValueError(f"{path}: not BiomedCLIP's layout: {'; '.join(odd)}")
    return cfg


def to_ours(raw: dict, path: str) -> tuple[dict, list]:
    """open_clip's BiomedCLIP tensors -> (BiomedCLIP's keys, tensors that fit nowhere)."""
    trunk, bad = timm_to_ours(_under(raw, "visual.trunk."))
    parts = {"visual.": trunk, "image_head.": _under(raw, "visual.head.proj."),
             "text.": bert_state_dict(_under(raw, "text.transformer."), path),
             "text_head.": _under(raw, "text.proj.")}
    sd = {prefix + k: v for prefix, part in parts.items() for k, v in part.items()}
    if "logit_scale" in raw:
        sd["logit_scale"] = raw["logit_scale"].reshape(())
    return sd, [f"visual.trunk.{k}" for k in bad] + [k for k in raw if not k.startswith(KNOWN)]


def _text_config(folder: str) -> tuple[BertConfig, str]:
    """The text tower's shape: the folder's config.json, else PubMedBERT-base's."""
    if os.path.isfile(os.path.join(folder, "config.json")):
        return read_bert_config(folder), f"{folder}/config.json"
    return BertConfig(), "PubMedBERT-base's shape (the folder has no config.json)"


def _build(folder: str, sd: dict, bad: list, cfg: dict, path: str) -> BiomedCLIP:
    """The model, its shapes from the file and configs; one error lists every misfit."""
    bert, bert_source = _text_config(folder)
    vit = vit_sizes(dataclasses.replace(spec("biomedclip"), output_dim=0), sd=_under(sd, "visual."))
    pre = cfg.get("preprocess_cfg", {})
    with torch.device("meta"):  # shapes only: the file supplies every tensor
        model = BiomedCLIP(vit, bert, cfg["model_cfg"].get("embed_dim", 512),
                           cfg["model_cfg"].get("vision_cfg", {}).get("image_size", 224),
                           pre.get("mean", CLIP_MEAN), pre.get("std", CLIP_STD))
    problems = state_dict_problems(sd, model)
    if bad or problems:
        raise ValueError(f"{path}: not a BiomedCLIP checkpoint fitting {bert_source}: "
                         f"{'unknown ' + ', '.join(bad[:12]) + '; ' if bad else ''}{problems}")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, assign=True)
    return model


def load_biomedclip(folder: str | None = None) -> tuple[BiomedCLIP, BiomedCLIPTokenizer]:
    """(BiomedCLIP in eval mode, fp32; its tokenizer) from a folder laid out as published
    (None: the clip_us cache's `BiomedCLIP-PubMedBERT_256-vit_base_patch16_224`)."""
    folder = find_folder(folder)
    cfg = read_open_clip_config(folder)
    path = os.path.join(folder, WEIGHTS)
    raw, _ = read_checkpoint(path)
    model = _build(folder, *to_ours(unwrap(raw, path), path), cfg, path)
    tokenizer = _read_tokenizer(folder, cfg["model_cfg"].get("text_cfg", {}).get("context_length", 77))
    if max(tokenizer.wordpiece.vocab.values()) >= model.text.config.vocab_size:
        raise ValueError(f"{folder}: vocab.txt has more tokens than the text tower's "
                         f"{model.text.config.vocab_size} embeddings: the files do not belong together")
    print(f"clip_us: BiomedCLIP from {folder}")
    return model.eval(), tokenizer
