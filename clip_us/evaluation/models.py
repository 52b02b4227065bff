"""The models evaluate.py judges, behind one interface: frozen encoders, then trainable heads.

EchoCare-CLIP's evaluation ("Ultrasound Vision-Language Alignment via Contrastive Learning")
compares vanilla OpenAI CLIP and BiomedCLIP, contrastively fine-tuned CLIPs and its own dual
encoders. Its end-to-end few-shot stage deep-copies the whole model and trains everything (both
encoders, heads, temperature): ``whole`` below, evaluate.py's default. Everything else scores
frozen encoders, and ``--e2e heads`` (ours) trains only the heads on cached features. So every
model is split in two here, and also kept whole:

- ``image_features(pixels)`` / ``text_features(texts)``: the frozen encoders' outputs, before any
  head. They are computed once and cached on disk; the probes and every few-shot seed reuse them.
- ``heads``: an ``nn.Module`` with ``embed_image(f)``, ``embed_text(f)`` (L2-normalised) and
  ``scale()`` = 1/τ capped at 100. A fresh copy trains in each ``--e2e heads`` run.
- ``whole``: the same three methods on pixels and strings (CLIPWhole, DualWhole), one module
  holding both encoders, both heads and the temperature; a deep copy trains in each whole-model
  end-to-end few-shot run.

Builders:
- ``from_weights``: a CLIP (``--weights NAME|PATH|none --arch``). Features = ``ln_post(CLS)`` and the
  pooled end-of-text feature after ``ln_final``; heads = ``visual.proj``, ``text_projection`` and
  ``logit_scale``, exactly CLIP's own.
- ``from_checkpoint``: a ``train_contrastive.py`` checkpoint (CLIP + adapters and/or trained
  weights, rebuilt from its config), or an EchoCare-CLIP dual encoder (``model: "echocare"``)
  through ``clip_us.echocare.load``.
- ``from_biomedclip``: BiomedCLIP (``--weights biomedclip|FOLDER``) through
  ``clip_us.load_biomedclip``, its tokenizer put in front of the text tower.
- ``from_dual_encoder``: anything else with ``encode_image(pixels)``, ``encode_text(list of str)``
  and a preprocessing; see the docstring for what makes its heads trainable.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .. import echocare
from ..adapters import (
    OFFICIAL,
    SUPERVISED,
    AdapterConfig,
    apply_adapter,
    checkpoint_identity,
    describe,
    load_adapter_state_dict,
)
from ..baselines.biomedclip import CONFIG as BIOMEDCLIP_CONFIG
from ..baselines.biomedclip import WEIGHTS as BIOMEDCLIP_WEIGHTS
from ..baselines.biomedclip import find_folder, load_biomedclip
from ..captions.manifest import Pair
from ..contrastive import MAX_LOGIT_SCALE, CaptionDataset
from ..echocare.data import FromPath, read_rgb
from ..fileio import atomic_path, load_checkpoint
from ..precision import inference, resolve_precision
from ..runs import row_name
from ..tokenizer import tokenize
from ..transform import Preprocess, mean_std
from ..weights import build_clip
from .data import read_split


class CLIPHeads(nn.Module):
    """CLIP's projections and logit scale, copied out of the model so they can train alone."""

    def __init__(self, visual_proj: torch.Tensor, text_projection: torch.Tensor, logit_scale: torch.Tensor):
        super().__init__()
        self.visual_proj = nn.Parameter(visual_proj.detach().clone().float())
        self.text_projection = nn.Parameter(text_projection.detach().clone().float())
        self.logit_scale = nn.Parameter(logit_scale.detach().clone().float().reshape(()))

    def embed_image(self, f: torch.Tensor) -> torch.Tensor:
        return F.normalize(f @ self.visual_proj, dim=-1)  # [B, width] @ [width, D] -> [B, D]

    def embed_text(self, f: torch.Tensor) -> torch.Tensor:
        return F.normalize(f @ self.text_projection, dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)


class ModuleHeads(nn.Module):
    """A dual encoder's own head modules and log-temperature (EchoCare-CLIP: MLPs, log τ)."""

    def __init__(self, image_head: nn.Module, text_head: nn.Module, log_temperature: torch.Tensor):
        super().__init__()
        self.image_head, self.text_head = copy.deepcopy(image_head), copy.deepcopy(text_head)
        self.log_temperature = nn.Parameter(log_temperature.detach().clone().float().reshape(()))

    def embed_image(self, f):
        return F.normalize(self.image_head(f), dim=-1)

    def embed_text(self, f):
        return F.normalize(self.text_head(f), dim=-1)

    def scale(self):
        return (-self.log_temperature).exp().clamp(max=MAX_LOGIT_SCALE)  # 1/τ, capped alike


class CLIPWhole(nn.Module):
    """A CLIP (adapters allowed) as one trainable model: embeddings of pixels and of strings
    through the encoders and projections, scale = exp(logit_scale) capped at 100."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def embed_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(pixels).float(), dim=-1)

    def embed_text(self, texts) -> torch.Tensor:
        tokens = tokenize(list(texts), context_length=self.clip.context_length, truncate=True)
        return F.normalize(self.clip.encode_text(tokens.to(self.clip.logit_scale.device)).float(), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)


class DualWhole(nn.Module):
    """A dual encoder as one trainable model: with ``image_features``/``text_features`` and
    ``image_head``/``text_head`` (EchoCare-CLIP, BiomedCLIP) the heads follow the encoders,
    otherwise ``encode_image``/``encode_text`` are the embeddings. Its own ``log_temperature``
    (the model's value, 0.07 without one): scale = 1/τ capped at 100."""

    def __init__(self, model, log_temperature: torch.Tensor):
        super().__init__()
        self.model = model
        self.log_temperature = nn.Parameter(log_temperature.detach().clone().float().reshape(()))
        self.split = all(hasattr(model, a) for a in ("image_features", "text_features",
                                                     "image_head", "text_head"))

    def embed_image(self, pixels: torch.Tensor) -> torch.Tensor:
        m = self.model
        return F.normalize((m.image_head(m.image_features(pixels)) if self.split
                            else m.encode_image(pixels)).float(), dim=-1)

    def embed_text(self, texts) -> torch.Tensor:
        m, texts = self.model, list(texts)
        return F.normalize((m.text_head(m.text_features(texts)) if self.split
                            else m.encode_text(texts)).float(), dim=-1)

    def scale(self) -> torch.Tensor:
        return (-self.log_temperature).exp().clamp(max=MAX_LOGIT_SCALE)


@dataclass
class EvalModel:
    """One model under evaluation. ``trained_on``: image keys its training used (train + val of
    its split.json), for the overlap check; ``split_path``: that split.json, if any."""
    name: str
    kind: str                      # "clip", "contrastive", "echocare", "biomedclip" or "dual"
    vanilla: bool                  # picks the end-to-end few-shot learning rate
    preprocess: object             # path or PIL image -> [3, S, S] tensor
    image_features: object         # [B, 3, S, S] -> [B, F] (frozen)
    text_features: object          # list of str -> [T, F'] (frozen)
    heads: nn.Module
    identity: dict                 # what the embedding cache is keyed on
    split_path: str | None = None
    trained_on: set = field(default_factory=set)
    source: dict = field(default_factory=dict)
    whole: nn.Module | None = None  # CLIPWhole / DualWhole: what the whole-model e2e trains
    device: object = "cpu"          # where `whole` lives

    def fingerprint(self) -> str:
        text = json.dumps(self.identity, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _file_identity(path) -> dict:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


@contextlib.contextmanager
def _identity_projections(model):
    """Swap CLIP's two projections for identity matrices, so ``encode_image``/``encode_text``
    return the pre-projection features (``ln_post(CLS)``, pooled ``ln_final``) through the
    model's own forward, adapters included; the originals come back afterwards."""
    vis, txt = model.visual.proj, model.text_projection
    try:
        model.visual.proj = nn.Parameter(torch.eye(vis.shape[0], dtype=vis.dtype, device=vis.device),
                                         requires_grad=False)
        model.text_projection = nn.Parameter(torch.eye(txt.shape[0], dtype=txt.dtype, device=txt.device),
                                             requires_grad=False)
        yield model
    finally:
        model.visual.proj, model.text_projection = vis, txt


def clip_model(model, name: str, kind: str, vanilla: bool, preprocess, identity: dict, device,
               source: dict | None = None, precision: str = "fp32") -> EvalModel:
    """Wrap a CLIP (clip_us.model.CLIP, adapters allowed) as an EvalModel; its encoders run
    under `precision` (--precision, resolved here once), part of the feature cache's identity."""
    model = model.eval().to(device)
    precision = resolve_precision(precision, device)
    identity = {**identity, "precision": precision}

    def image_features(x):
        with inference(model, precision, device), _identity_projections(model):
            return model.encode_image(x.to(device)).float().cpu()

    def text_features(texts):
        tokens = tokenize(list(texts), context_length=model.context_length, truncate=True).to(device)
        with inference(model, precision, device), _identity_projections(model):
            return model.encode_text(tokens).float().cpu()

    heads = CLIPHeads(model.visual.proj.cpu(), model.text_projection.cpu(), model.logit_scale.cpu())
    return EvalModel(name, kind, vanilla, preprocess, image_features, text_features, heads, identity,
                     source=source or {}, whole=CLIPWhole(model), device=device)


def from_weights(weights: str, arch: str, image_size: int, device, name: str = "",
                 clip_norm: bool = True, precision: str = "fp32") -> EvalModel:
    """Vanilla CLIP from a weights name or file, or random weights (``none``) of ``arch``;
    BiomedCLIP for ``biomedclip`` or a folder with open_clip_config.json (:func:`from_biomedclip`)."""
    if is_biomedclip(weights):
        return from_biomedclip(weights, device, name, precision)
    model = build_clip(weights, arch)
    ident = {"weights": _file_identity(weights) if os.path.isfile(weights) else weights,
             "arch": arch if weights == "none" else None, "image_size": image_size, "clip_norm": clip_norm}
    row = name or ("CLIP (random weights)" if weights == "none" else f"CLIP {weights} (vanilla)")
    pre = Preprocess(image_size, *mean_std(clip_norm))
    return clip_model(model, row, "clip", True, pre, ident, device,
                      {"weights": weights, "arch": arch}, precision)


def is_biomedclip(weights: str) -> bool:
    """--weights biomedclip (the clip_us cache's folder) or a folder laid out as published."""
    return weights == "biomedclip" or os.path.isfile(os.path.join(weights, BIOMEDCLIP_CONFIG))


class BiomedCLIPTexts(nn.Module):
    """BiomedCLIP (clip_us.baselines.biomedclip) as from_dual_encoder reads a dual encoder: the
    text side takes strings (its tokenizer: open_clip's HFTokenizer, 256 ids), and
    ``log_temperature`` = -logit_scale, so the heads' scale is exp(logit_scale) capped at 100."""

    def __init__(self, model, tokenizer):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.image_head, self.text_head = model.image_head, model.text_head
        self.log_temperature = -model.logit_scale.detach()

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.image_features(pixels)   # [B, 3, S, S] -> ln_post(CLS) [B, width]

    def text_features(self, texts) -> torch.Tensor:
        ids = self.tokenizer(list(texts)).to(self.model.logit_scale.device)  # [T, 256]
        return self.model.text_features(ids)       # the CLS token of the last hidden state

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_head(self.image_features(pixels))

    def encode_text(self, texts) -> torch.Tensor:
        return self.text_head(self.text_features(texts))


def from_biomedclip(weights: str, device, name: str = "", precision: str = "fp32") -> EvalModel:
    """BiomedCLIP, one of the two baselines EchoCare-CLIP compares against, text included:
    open_clip's eval transform (``model.transform()``), the towers' pooled outputs as features,
    its own heads; vanilla, so the end-to-end few-shot lr is 5e-6 as for OpenAI's CLIP. The
    feature cache is keyed on its weight file."""
    folder = find_folder(None if weights == "biomedclip" else weights)
    model, tokenizer = load_biomedclip(folder)
    ident = {"weights": _file_identity(os.path.join(folder, BIOMEDCLIP_WEIGHTS))}
    ev = from_dual_encoder(BiomedCLIPTexts(model, tokenizer), name or "BiomedCLIP",
                           model.transform(), ident, device, {"weights": folder}, precision)
    ev.kind, ev.vanilla = "biomedclip", True
    return ev


def find_split(checkpoint) -> Path | None:
    """The run folder's split.json: beside the checkpoint, or one or two folders up
    (train_contrastive.py may keep checkpoints in a sub-folder of its run)."""
    folder = Path(checkpoint).resolve().parent
    for d in (folder, folder.parent, folder.parent.parent):
        if (d / "split.json").is_file():
            return d / "split.json"
    return None


def trained_keys(split_path) -> set:
    """The images a run trained on or selected its checkpoint with: its train and val lists."""
    if split_path is None:
        return set()
    saved = read_split(split_path)
    return set(saved["train"]) | set(saved["val"])


def _contrastive(ckpt: dict, path: str, device, name: str, precision: str) -> EvalModel:
    """A train_contrastive.py checkpoint: CLIP from its config's --weights/--arch, its adapter,
    then every trained tensor it holds (model_state_dict when backbone weights trained)."""
    cfg = ckpt.get("config") or {}
    if "weights" not in cfg or "arch" not in cfg:
        raise ValueError(f"{path}: checkpoint config has no weights/arch; it was not written by "
                         f"train_contrastive.py (or any clip_us script)")
    model = build_clip(cfg["weights"], cfg["arch"])
    adapter = AdapterConfig.from_dict(dict(ckpt.get("adapter_config") or {"kind": "none"}))
    if adapter.kind != "none":
        apply_adapter(model, adapter)
        load_adapter_state_dict(model, ckpt.get("adapter_state_dict", {}), adapter)
    trained = dict(ckpt.get("model_state_dict") or {})
    missing = set(trained) - set(model.state_dict())
    if missing:
        raise ValueError(f"{path}: checkpoint tensors {sorted(missing)[:5]} do not fit the model "
                         f"rebuilt from its config ({cfg['arch']}, adapter {ckpt.get('adapter_config')})")
    model.load_state_dict(trained, strict=False)
    size = int(cfg.get("image_size", 224))
    row = name or ckpt.get("row") or row_name("clip", adapter.kind, True,
                                              train=cfg.get("train", "adapter"))
    pre = Preprocess(size, *mean_std(cfg.get("clip_norm", True)))
    ev = clip_model(model, row, "contrastive", False, pre,
                    {"checkpoint": _file_identity(path)}, device,
                    {"checkpoint": str(path), "adapter": adapter.kind, "train": cfg.get("train")},
                    precision)
    fixed = float(ckpt.get("temperature") or cfg.get("temperature") or 0)  # None/0: learnt
    if fixed > 0:  # trained with a fixed τ (0.07 with --train adapter): start the heads from it
        ev.heads.logit_scale.data.fill_(math.log(1.0 / fixed))
        ev.whole.clip.logit_scale.data.fill_(math.log(1.0 / fixed))  # the features never use it
    return ev


def from_dual_encoder(model, name: str, preprocess, identity: dict, device, source=None,
                      precision: str = "fp32") -> EvalModel:
    """A dual encoder with ``encode_image(pixels)`` and ``encode_text(list of str)``.

    Its heads train in end-to-end few-shot when it also has ``image_features``/``text_features``
    (the frozen encoders' outputs), ``image_head``/``text_head`` modules and ``log_temperature``,
    as clip_us.echocare's model does. Without them its embeddings are its features, the heads are
    identities and only the temperature (starting at 0.07) trains; the results say so.
    """
    model = model.eval().to(device)
    precision = resolve_precision(precision, device)  # once: the encoders then run in it
    identity = {**identity, "precision": precision}
    split = all(hasattr(model, a) for a in ("image_features", "text_features", "image_head", "text_head"))
    enc_i = model.image_features if split else model.encode_image
    enc_t = model.text_features if split else model.encode_text

    def image_features(x):
        with inference(model, precision, device):
            return enc_i(x.to(device)).float().cpu()

    def text_features(texts):
        with inference(model, precision, device):
            return enc_t(list(texts)).float().cpu()

    log_t = getattr(model, "log_temperature", torch.tensor(0.07).log())
    heads = ModuleHeads(model.image_head, model.text_head, log_t) if split else \
        ModuleHeads(nn.Identity(), nn.Identity(), log_t)
    source = {**(source or {}), "heads_trainable": split}
    return EvalModel(name, "dual", False, preprocess, image_features, text_features, heads,
                     identity, source=source, whole=DualWhole(model, log_t).to(device), device=device)


def _echocare(path: str, device, name: str, precision: str) -> EvalModel:
    """An EchoCare-CLIP dual-encoder checkpoint through clip_us.echocare.load."""
    model = echocare.load(path)
    # The authors' evaluation transform (bilinear resize of the shorter side to 256, centre crop,
    # their mean/std), not CLIP's bicubic one.
    preprocess = FromPath(model.eval_transform(), read_rgb)
    row = name or f"EchoCare-CLIP ({model.text_family} text, {model.train_mode})"
    ev = from_dual_encoder(model, row, preprocess, {"checkpoint": _file_identity(path)}, device,
                           {"checkpoint": str(path)}, precision)
    ev.kind = "echocare"
    return ev


def _refusal(what: dict, path) -> str | None:
    """Why evaluate.py does not take a checkpoint (adapters.checkpoint_identity's record), and
    what to type instead; None when it does (a contrastive model: CLIP or EchoCare-CLIP)."""
    if what["task"] in SUPERVISED.values():
        return (f"{path} is {describe(what)}: evaluate.py compares contrastive models "
                f"(train_contrastive.py, EchoCare-CLIP); score it with {what['script']}.py "
                f"--eval-only --checkpoint {path}")
    if what["script"] == OFFICIAL:
        return (f"{path} is {describe(what)}, with no record of the CLIP it adapts: use it as "
                f"--init of train_seg.py, train_cls.py or zeroshot.py")
    return None


def from_checkpoint(path: str, device, name: str = "", precision: str = "fp32") -> EvalModel:
    """A train_contrastive.py checkpoint, CLIP-based or EchoCare-CLIP, with its run's split;
    its encoders run under `precision` (an already resolved --precision). Other checkpoints
    (train_seg/train_cls models, the official adapter files) are refused before any work."""
    ckpt = load_checkpoint(path)
    what = checkpoint_identity(ckpt, path)
    refused = _refusal(what, path)
    if refused:
        raise ValueError(refused)
    model = _echocare(path, device, name, precision) if what["backbone"] == "echocare" else \
        _contrastive(ckpt, path, device, name, precision)
    split = find_split(path)
    model.split_path, model.trained_on = (str(split) if split else None), trained_keys(split)
    return model


# ----------------------------------------------------------------------------- the feature cache
def cached_features(model: EvalModel, path, keys, paths, texts, batch_size: int = 32,
                    workers: int = 0) -> tuple[dict, dict]:
    """({image key: feature}, {text: feature}) of the frozen encoders, read from the cache file
    `path` when the same model made it (``fingerprint``); what is missing is computed and added,
    so each image and caption text is encoded once per model, whatever the split or seed. An
    image is looked up by its key and its file (path, size, time): another manifest's image with
    the same key, or a changed file, is encoded afresh."""
    path = Path(path)
    cache = torch.load(path, weights_only=True) if path.is_file() else {}
    if cache.get("fingerprint") != model.fingerprint():
        cache = {"fingerprint": model.fingerprint(), "images": {}, "texts": {}}
    files = cache.setdefault("files", {})
    todo = [(k, p) for k, p in zip(keys, paths) if files.get(k) != _file_identity(p)]
    images = CaptionDataset([Pair(k, p, "", 0) for k, p in todo], model.preprocess)  # no captions
    loader = torch.utils.data.DataLoader(images, batch_size, num_workers=workers)
    done = 0
    for batch in tqdm(loader, f"embedding images ({model.name})", disable=not todo):
        feats = model.image_features(batch["image"])
        cache["images"].update(zip([k for k, _ in todo[done:done + len(feats)]], feats))
        done += len(feats)
    files.update({k: _file_identity(p) for k, p in todo})
    new = [t for t in dict.fromkeys(texts) if t not in cache["texts"]]
    for i in tqdm(range(0, len(new), batch_size), f"embedding texts ({model.name})", disable=not new):
        chunk = new[i:i + batch_size]
        cache["texts"].update(zip(chunk, model.text_features(chunk)))
    if todo or new:
        with atomic_path(path) as tmp:
            torch.save(cache, tmp)
    return cache["images"], cache["texts"]
