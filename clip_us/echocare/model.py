"""EchoCare-CLIP's dual encoder: the EchoCare Swin image encoder and a CLIP or BERT text encoder,
MLP heads into a shared 256-d space, and a learnable temperature.

EchoCare-CLIP, as the authors' released code builds it
(`echocare_clip/models/{image_encoder,text_encoder,echocare_clip}.py`):
- image: the Swin's last map (B, 2048, 8, 8 at 256 px; swin.py) average-pooled, then
  Linear(2048, 2048) -> ReLU -> Linear(2048, 256), then L2 normalisation;
- text, CLIP family: OpenAI ViT-B/32's text tower, its end-of-text feature after ln_final and
  without text_projection (512-d, Hugging Face's pooler_output), then an MLP 512 -> 512 -> 256;
  77 tokens;
- text, BERT family: BioClinicalBERT's pooler_output (768-d; bert.py), then an MLP
  768 -> 768 -> 256; 128 tokens with an attention mask;
- loss: symmetric cross-entropy on cos / tau with tau = exp(log_temperature), learnable from
  log(0.07) and unclamped (losses.clip_loss with scale = model.scale()).

`--train heads|image|text|full`: the heads and the temperature always train; "image" adds the
Swin, "text" the text encoder, "full" both. As in the authors' code, `train()` mode switches
dropout on in BERT even when BERT is frozen; a frozen encoder runs without autograd.

Checkpoints hold the heads, the temperature and every encoder weight that trained. A frozen
encoder is not copied: its source file is named with its SHA256, and `load` checks the hash. An
encoder without a source file (random weights, `--weights none`) is always stored.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import identity
from ..contrastive import CaptionDataset
from ..fileio import load_checkpoint, save_checkpoint
from ..model import ARCHS as CLIP_ARCHS
from ..model import CLIP, CLIPConfig
from ..tokenizer import tokenize as clip_tokenize
from ..weights import file_sha256, load_state_dict
from .bert import (
    BertConfig,
    BertModel,
    WordPieceTokenizer,
    find_bert_folder,
    load_bert,
    weights_file,
)
from .data import (
    AUTHORS_MEAN,
    AUTHORS_STD,
    caption_dataset,
    image_transform,
    norm_stats,
    tiny_vocab,
)
from .swin import ARCHS as SWIN_ARCHS
from .swin import SwinConfig, SwinTransformer, find_echocare_encoder, load_echocare_encoder

PROJECTION_DIM = 256
TRAIN_MODES = ("heads", "image", "text", "full")
CONTEXT_LENGTH = {"clip": 77, "bert": 128}
HEADS = ("image_head.", "text_head.", "log_temperature")
TINY_BERT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                 max_position_embeddings=128)
# The authors' recipe: the defaults of `train_contrastive.py --model echocare`. betas are torch's
# AdamW defaults (their code passes none); CosineAnnealingLR(T_max=epochs) steps once an epoch
# down to 0; no clipping; no early stopping (the best validation loss picks the checkpoint); the
# 70/15/15 split of prepare_data.py with seed 42: BUSI and the liver set held out first (named as in
# training_experiments/config.json's held_out_datasets; prepare_data.py matches them exactly,
# clip_us.captions.manifest.make_split ignoring case), then scikit-learn's train_test_split twice
# stratified by data set (clip_us.splits.train_test_split_twice); captions keep every character
# (the NextGen-UIA whitelist is the ultrasound-CLIP paper's code's).
RECIPE = {"lr": 1e-4, "weight_decay": 1e-4, "betas": [0.9, 0.999], "schedule": "epoch",
          "min_lr": 0.0, "epochs": 20, "batch_size": 128, "grad_clip": 0.0, "patience": 20,
          "split": "70,15,15", "split_seed": 42, "hold_out": "Dataset_BUSI_with_GT,Liver_ultrasound",
          "image_size": 256, "ascii_only": False}


def recipe_hold_out(hold_out: str, datasets) -> tuple[list, str]:
    """(the recipe's held-out data sets that `datasets` has, the line saying so): a manifest
    without them (the phantom) holds nothing out, and the line says that too, never silently."""
    names = [h.strip() for h in hold_out.split(",") if h.strip()]
    have = {d.lower() for d in datasets}
    hold = [h for h in names if h.lower() in have]
    if hold:
        return hold, f"held out (the authors' recipe): {', '.join(hold)}"
    return hold, (f"held out: nothing; the manifest has none of the recipe's {', '.join(names)} "
                  f"(its data sets: {', '.join(sorted(set(datasets)))})")


def mlp(d_in: int, d_out: int) -> nn.Sequential:
    """Linear(d_in, d_in) -> ReLU -> Linear(d_in, d_out): the authors' projection heads."""
    return nn.Sequential(nn.Linear(d_in, d_in), nn.ReLU(), nn.Linear(d_in, d_out))


# ----------------------------------------------------------------------------- text towers
def clip_text_tower(cfg: CLIPConfig, sd: dict | None = None) -> CLIP:
    """A CLIP reduced to its text transformer (token_embedding, positional_embedding,
    transformer.*, ln_final.*: OpenAI's key names). The vision tower, text_projection and
    logit_scale are removed, since EchoCare-CLIP uses `encode_text_pooled`. With `sd`, the
    tower is built without initialisation and takes those tensors (strictly)."""
    with torch.device("meta") if sd is not None else contextlib.nullcontext():
        tower = CLIP(cfg)
    del tower.visual, tower.text_projection, tower.logit_scale
    if sd is not None:
        tower.load_state_dict(sd, assign=True)
    return tower


def load_clip_text(weights: str, download_root: str | None = None) -> tuple[CLIP, dict]:
    """OpenAI's text tower from any CLIP checkpoint weights.py reads (ViT-B/32 for EchoCare-CLIP)."""
    sd, info = load_state_dict(weights, download_root)
    text = {k: v.float() for k, v in sd.items()
            if not k.startswith("visual.") and k not in ("text_projection", "logit_scale")}
    source = {"family": "clip", "arch": weights, "config": asdict(info["config"]),
              "path": os.path.abspath(info["path"]), "sha256": file_sha256(info["path"])}
    return clip_text_tower(info["config"], text), source


def load_bert_text(folder: str | None, download_root: str | None = None):
    """(BertModel, WordPieceTokenizer, source) from a Hugging Face folder (BioClinicalBERT)."""
    folder = find_bert_folder(folder, download_root)
    model, tok = load_bert(folder)
    path = weights_file(folder)
    source = {"family": "bert", "arch": "bert", "config": model.config.to_dict(),
              "path": os.path.abspath(path), "sha256": file_sha256(path),
              "vocab": dict(tok.vocab), "do_lower_case": tok.do_lower_case}
    return model, tok, source


def random_text(family: str, arch: str, captions) -> tuple[nn.Module, object, dict]:
    """Random text encoder weights (tests, the phantom). A BERT's vocabulary comes from `captions`."""
    if family == "clip":
        cfg = CLIP_ARCHS["tiny" if arch == "tiny" else "ViT-B/32"]
        return clip_text_tower(cfg), None, {"family": "clip", "arch": arch, "config": asdict(cfg),
                                            "path": None, "sha256": None}
    vocab = {t: i for i, t in enumerate(tiny_vocab(captions))}
    sizes = TINY_BERT if arch == "tiny" else {}
    cfg = BertConfig(vocab_size=len(vocab), **sizes)
    source = {"family": "bert", "arch": arch, "config": cfg.to_dict(), "path": None,
              "sha256": None, "vocab": vocab, "do_lower_case": True}
    model = BertModel(cfg)
    # BERT's init (std 0.02) leaves an untrained BERT's pooled [CLS] feature the same for every
    # text (cosine ~1.0 between captions), which no head can learn from; std 0.2 spreads them
    # (mean cosine ~0.75 on phantom captions, like the random tiny CLIP text tower's).
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, 0.2)
    return model, WordPieceTokenizer(vocab, True), source


# ----------------------------------------------------------------------------- the model
class EchoCareCLIP(nn.Module):
    """`encode_image(pixels)` and `encode_text(list of str)` -> L2-normalised [B, 256];
    `forward(pixels, tokens)` -> (image embeddings, text embeddings, scale = 1/tau) for training.

    Keys: image_encoder.* (MONAI's Swin names), image_head.{0,2}.*, text_encoder.* (OpenAI's or
    Hugging Face BertModel's names), text_head.{0,2}.*, log_temperature.
    """

    def __init__(self, image_encoder: SwinTransformer, text_encoder: nn.Module, tokenizer,
                 sources: dict, image_size: int = 256, mean=AUTHORS_MEAN, std=AUTHORS_STD,
                 projection_dim: int = PROJECTION_DIM, init_temperature: float = 0.07):
        super().__init__()
        self.text_family = sources["text_encoder"]["family"]
        self.image_encoder = image_encoder
        self.image_head = mlp(image_encoder.num_features, projection_dim)
        self.text_encoder = text_encoder
        self.text_head = mlp(self.text_width(), projection_dim)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(init_temperature)))
        self.tokenizer, self.sources = tokenizer, sources
        self.context_length = CONTEXT_LENGTH[self.text_family]
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
        self.train_mode = "full"

    def text_width(self) -> int:
        if self.text_family == "clip":
            return self.text_encoder.ln_final.normalized_shape[0]
        return self.text_encoder.config.hidden_size

    def scale(self) -> torch.Tensor:
        """1 / tau: the logits are cos / tau."""
        return torch.exp(-self.log_temperature)

    @staticmethod
    def _grad(module: nn.Module):
        """No autograd through a frozen encoder (saves its activations)."""
        trains = any(p.requires_grad for p in module.parameters())
        return torch.set_grad_enabled(torch.is_grad_enabled() and trains)

    # -- text
    def tokenize(self, texts) -> torch.Tensor:
        """Texts -> LongTensor [B, 2, L]: token ids and attention mask (1 up to [SEP] / EOT)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if self.text_family == "bert":
            ids, mask = self.tokenizer(texts, self.context_length)
        else:
            ids = clip_tokenize(texts, self.context_length, truncate=True)
            mask = torch.arange(ids.shape[1]) <= ids.argmax(dim=-1, keepdim=True)
        return torch.stack([ids, mask.long()], dim=1)

    def text_features_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, 2, L] -> pooled text features [B, 512 | 768], before the head."""
        # Columns after the longest text are padding in every row: cutting them changes nothing
        # (CLIP's tower is causal and pools at EOT; BERT masks padded keys) and saves time.
        L = max(int(tokens[:, 1].sum(dim=1).max()), 1)
        ids, mask = tokens[:, 0, :L], tokens[:, 1, :L]
        with self._grad(self.text_encoder):
            if self.text_family == "clip":
                return self.text_encoder.encode_text_pooled(ids)
            return self.text_encoder(ids, mask)[1]

    def text_features(self, texts) -> torch.Tensor:
        return self.text_features_from_tokens(self.tokenize(texts).to(self.log_temperature.device))

    def encode_text(self, texts) -> torch.Tensor:
        """A list of strings (or one string) -> L2-normalised [B, 256]."""
        return F.normalize(self.text_head(self.text_features(texts)), dim=-1)

    # -- images
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, S, S] (normalised with self.mean/std) -> pooled Swin features [B, 2048]."""
        with self._grad(self.image_encoder):
            return self.image_encoder(images)[-1].mean(dim=(2, 3))  # GAP of [B, 2048, S/32, S/32]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_head(self.image_features(images)), dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        img = self.encode_image(images)
        txt = F.normalize(self.text_head(self.text_features_from_tokens(tokens)), dim=-1)
        return img, txt, self.scale()

    def eval_transform(self):
        """PIL image -> normalised [3, S, S]: resize the shorter side to S, centre crop."""
        return image_transform(self.image_size, train=False, mean=self.mean, std=self.std)

    # -- checkpoints
    def _stored(self, key: str) -> bool:
        """Heads, temperature, and an encoder's tensors when it trains or has no source file."""
        for prefix in ("image_encoder", "text_encoder"):
            if key.startswith(prefix + "."):
                module = getattr(self, prefix)
                return (self.sources[prefix]["path"] is None
                        or any(p.requires_grad for p in module.parameters()))
        return True

    def checkpoint_tensors(self) -> dict:
        """The checkpoint entries this model owns (training scripts add config, epoch, ...)."""
        return {"model": "echocare", "image_encoder": self.sources["image_encoder"],
                "text_encoder": self.sources["text_encoder"], "image_size": self.image_size,
                "mean": list(self.mean), "std": list(self.std), "train": self.train_mode,
                "projection_dim": self.image_head[2].out_features,
                "state_dict": {k: v for k, v in self.state_dict().items() if self._stored(k)}}

    def load_checkpoint_tensors(self, ckpt: dict) -> "EchoCareCLIP":
        """Put a checkpoint's tensors back (resume, best weights): heads, temperature and the
        encoder weights it stored; the other encoder weights are already the model's."""
        self.load_state_dict(ckpt["state_dict"], strict=False)
        return self


# ----------------------------------------------------------------------------- variants
def set_trainable(model: EchoCareCLIP, mode: str) -> list[str]:
    """requires_grad for a `--train` mode; returns the trainable parameter names."""
    if mode not in TRAIN_MODES:
        raise ValueError(f"--train {mode!r}: EchoCare-CLIP trains one of {TRAIN_MODES} (the "
                         f"heads and temperature always; image/text add that encoder; full both)")
    encoders = {"heads": (), "image": ("image_encoder.",), "text": ("text_encoder.",),
                "full": ("image_encoder.", "text_encoder.")}[mode]
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(HEADS + encoders))
    model.train_mode = mode
    return [n for n, p in model.named_parameters() if p.requires_grad]


def swin_parameters(c: SwinConfig) -> int:
    """Patch embedding; per stage: blocks (norms, bias table, qkv, proj, MLP), merging
    (LayerNorm(4d), Linear(4d, 2d) without bias) and the two bias-free 3x3 convolutions."""
    n = c.in_chans * c.embed_dim * c.patch_size ** 2 + c.embed_dim
    for i, (depth, heads) in enumerate(zip(c.depths, c.num_heads)):
        d, w = c.embed_dim * 2 ** i, c.window_size
        m = int(d * c.mlp_ratio)
        block = 4 * d + (2 * w - 1) ** 2 * heads + 4 * d * d + 3 * d * c.qkv_bias + d + 2 * d * m + m + d
        n += depth * block + (8 * d * d + 8 * d) + 18 * d * d
    return n


def clip_text_parameters(c: CLIPConfig) -> int:
    """Embeddings, 12 W^2 + 13 W per block, ln_final; no text_projection."""
    W_ = c.transformer_width
    return (c.vocab_size + c.context_length) * W_ + c.transformer_layers * (12 * W_ * W_ + 13 * W_) + 2 * W_


def bert_parameters(c: BertConfig) -> int:
    """Embeddings + LayerNorm, 4 H^2 + 2 H I + 9 H + I per layer, the pooler."""
    H, I_ = c.hidden_size, c.intermediate_size
    emb = (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * H + 2 * H
    return emb + c.num_hidden_layers * (4 * H * H + 2 * H * I_ + 9 * H + I_) + H * H + H


def head_parameters(d_in: int, d_out: int = PROJECTION_DIM) -> int:
    return d_in * d_in + d_in + d_in * d_out + d_out


def expected_counts(image_cfg: SwinConfig, text_family: str, text_cfg, mode: str,
                    projection_dim: int = PROJECTION_DIM) -> tuple[int, int]:
    """(trainable, total) in closed form. EchoCare + ViT-B/32, heads: 5,114,881 of 188,502,521."""
    image = swin_parameters(image_cfg)
    if text_family == "clip":
        text, width = clip_text_parameters(text_cfg), text_cfg.transformer_width
    else:
        text, width = bert_parameters(text_cfg), text_cfg.hidden_size
    heads = head_parameters(image_cfg.embed_dim * 2 ** len(image_cfg.depths), projection_dim)
    heads += head_parameters(width, projection_dim) + 1
    trainable = heads + image * (mode in ("image", "full")) + text * (mode in ("text", "full"))
    return trainable, heads + image + text


# ----------------------------------------------------------------------------- building
def _encoder_file(image_weights: str | None, download_root: str | None) -> str:
    """The EchoCare Swin file (swin.find_echocare_encoder); when missing, the message also names
    the flag that passes it."""
    try:
        return find_echocare_encoder(image_weights, download_root)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (train_contrastive.py --model echocare: --image-weights "
                                f"PATH; or --weights none for random encoders, tests only)") from e


def build(text_encoder: str = "clip", arch: str = "echocare", random_weights: bool = False,
          image_weights: str | None = None, text_weights: str | None = None, captions=(),
          image_size: int = 256, mean=AUTHORS_MEAN, std=AUTHORS_STD,
          gradient_checkpointing: bool = False, download_root: str | None = None) -> EchoCareCLIP:
    """The dual encoder. Published weights: echocare_encoder.pth (`image_weights`, else the
    cache) and ViT-B/32's text tower or a BioClinicalBERT folder (`text_weights`, else ViT-B/32 /
    the cache's Bio_ClinicalBERT). `random_weights`: random encoders of `arch` ("tiny" or the
    real sizes), loudly announced; a random BERT's vocabulary is built from `captions`."""
    if text_encoder not in CONTEXT_LENGTH:
        raise ValueError(f"--text-encoder {text_encoder!r}: choose clip or bert")
    if random_weights:
        print(f"!!! EchoCare-CLIP with RANDOM encoder weights ({arch} Swin, {arch} {text_encoder}"
              f" text): for tests and demos only, not the published models !!!")
        cfg = SWIN_ARCHS["tiny" if arch == "tiny" else "echocare"]
        with torch.random.fork_rng():  # fixed weights that leave the run's random stream alone
            torch.manual_seed(0)
            image = SwinTransformer(cfg, gradient_checkpointing)
            text, tok, text_source = random_text(text_encoder, arch, captions)
        image_source = {"family": "echocare-swin", "arch": arch, "config": cfg.to_dict(),
                        "path": None, "sha256": None}
    else:
        path = _encoder_file(image_weights, download_root)
        image = load_echocare_encoder(path, gradient_checkpointing=gradient_checkpointing)
        image_source = {"family": "echocare-swin", "arch": "echocare", "config": image.config.to_dict(),
                        "path": os.path.abspath(path), "sha256": file_sha256(path)}
        if text_encoder == "clip":
            text, text_source = load_clip_text(text_weights or "ViT-B/32", download_root)
            tok = None
        else:
            text, tok, text_source = load_bert_text(text_weights, download_root)
    sources = {"image_encoder": image_source, "text_encoder": text_source}
    return EchoCareCLIP(image, text, tok, sources, image_size, mean, std)


def _swin_config(d: dict) -> SwinConfig:
    return SwinConfig(**{**d, "depths": tuple(d["depths"]), "num_heads": tuple(d["num_heads"])})


def _checked_source(source: dict, override: str | None, what: str) -> str:
    """The recorded (or given) source file, refused unless its SHA256 is the recorded one."""
    path = override or source["path"]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the checkpoint's frozen {what} comes from {source['path']} "
                                f"(SHA256 {source['sha256']}), which does not exist here; pass "
                                f"the file's new path to clip_us.echocare.load")
    got = file_sha256(path)
    if got != source["sha256"]:
        raise ValueError(f"{path} has SHA256 {got}, but the checkpoint's frozen {what} was "
                         f"trained from a file with SHA256 {source['sha256']}: the file changed, "
                         f"so the embeddings would not be the trained model's")
    return path


def _image_encoder(source: dict, sd: dict, override: str | None) -> SwinTransformer:
    cfg = _swin_config(source["config"])
    if any(k.startswith("image_encoder.") for k in sd):  # stored: a skeleton, filled below
        with torch.device("meta"):
            return SwinTransformer(cfg)
    return load_echocare_encoder(_checked_source(source, override, "image encoder"), config=cfg)


def _text_encoder(source: dict, sd: dict, override: str | None):
    """(text encoder, tokenizer or None) as the checkpoint describes them."""
    tok = WordPieceTokenizer(source["vocab"], source["do_lower_case"]) if "vocab" in source \
        else None
    stored = any(k.startswith("text_encoder.") for k in sd)
    if source["family"] == "clip":
        cfg = CLIPConfig(**source["config"])
        if stored:
            with torch.device("meta"):
                return clip_text_tower(cfg), None
        return load_clip_text(_checked_source(source, override, "CLIP text tower"))[0], None
    if stored:
        with torch.device("meta"):
            return BertModel(BertConfig(**source["config"])), tok
    path = _checked_source(source, override, "BERT")
    return load_bert(os.path.dirname(path))[0], tok


def load(path, image_weights: str | None = None, text_weights: str | None = None,
         device="cpu") -> EchoCareCLIP:
    """An EchoCare-CLIP checkpoint -> the model in eval mode. Frozen encoders are read from the
    files the checkpoint names (or `image_weights` / `text_weights`, e.g. after moving them),
    refused when their SHA256 differs from the recorded one."""
    ck = load_checkpoint(path)
    if ck.get("model") != "echocare":
        raise ValueError(f"{path} is not an EchoCare-CLIP checkpoint (model: {ck.get('model')!r})")
    sd = ck["state_dict"]
    image = _image_encoder(ck["image_encoder"], sd, image_weights)
    text, tok = _text_encoder(ck["text_encoder"], sd, text_weights)
    sources = {"image_encoder": ck["image_encoder"], "text_encoder": ck["text_encoder"]}
    model = EchoCareCLIP(image, text, tok, sources, ck["image_size"], ck["mean"], ck["std"],
                         ck.get("projection_dim", PROJECTION_DIM))
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    heads = [k for k in missing if k.startswith(HEADS)]  # frozen encoders' keys may be missing
    unfilled = [k for k, v in model.state_dict().items() if v.is_meta]
    if unexpected or heads or unfilled:
        raise ValueError(f"{path}: its state_dict does not fit the model it describes: "
                         f"unexpected {unexpected[:5]}, missing {(heads + unfilled)[:5]}")
    set_trainable(model, ck["train"])
    return model.to(device).eval()


def save(model: EchoCareCLIP, path, config: dict | None = None, **extra) -> None:
    """Write an EchoCare-CLIP checkpoint atomically (what train_contrastive.py's best.pt holds),
    with its record (`what`, adapters.identity; `extra` may give its own): evaluate.py
    --checkpoint takes it, --init refuses it."""
    what = identity("clip_us.echocare.save", "contrastive", "echocare", "none", model.train_mode)
    save_checkpoint(path, {"what": what, **extra, **model.checkpoint_tensors(),
                           "config": config or {}})


# ----------------------------------------------------------------------------- the training script
def normalisation(stats: str, train_pairs, size: int) -> tuple[tuple, tuple]:
    """(mean, std) of `--norm-stats`: "authors" (their training set's) or "train" (computed from
    this run's training pairs, after the evaluation resize and crop)."""
    if stats not in ("authors", "train"):
        raise ValueError(f"--norm-stats {stats!r}: choose authors (their training-set statistics) "
                         f"or train (computed from this run's training split)")
    if stats == "authors":
        return AUTHORS_MEAN, AUTHORS_STD
    mean, std = norm_stats([p.image for p in train_pairs], size)
    print(f"normalisation from the training split: mean {mean}, std {std}")
    return mean, std


def for_contrastive(parts: dict, device, train: str, *, text_encoder: str = "clip",
                    arch: str = "echocare", random_weights: bool = False,
                    image_weights: str | None = None, text_weights: str | None = None,
                    norm: str = "authors", image_size: int = 256,
                    grad_checkpointing: bool = False,
                    augment: bool = True) -> tuple[EchoCareCLIP, CaptionDataset, CaptionDataset]:
    """`train_contrastive.py --model echocare`: the model (`build`, requires_grad as `train`
    names it) on `device`, and its training and validation data sets from `parts`' pairs.
    `norm`: --norm-stats (normalisation); `augment=False` trains on the evaluation transform."""
    mean, std = normalisation(norm, parts["train"], image_size)
    model = build(text_encoder, arch, random_weights, image_weights, text_weights,
                  [p.caption for p in parts["train"]], image_size, mean, std, grad_checkpointing)
    set_trainable(model, train)
    train_set = caption_dataset(parts["train"], model.tokenize, image_size, augment, mean, std)
    val_set = caption_dataset(parts["val"], model.tokenize, image_size, False, mean, std)
    return model.to(device), train_set, val_set
