"""BERT and its WordPiece tokenizer, written from scratch, reading a Hugging Face BERT folder.

EchoCare-CLIP offers BioClinicalBERT (Alsentzer et al., "Publicly Available Clinical
BERT Embeddings", 2019; the Hugging Face folder `emilyalsentzer/Bio_ClinicalBERT`) as its second
text encoder, and uses its `pooler_output`. The model is BERT-base (Devlin et al., "BERT:
Pre-training of Deep Bidirectional Transformers for Language Understanding", 2019): word +
position + token-type embeddings and a LayerNorm, post-LN encoder layers, and a pooler (dense +
tanh on [CLS]). Parameters keep Hugging Face's `BertModel` key names
(`embeddings.word_embeddings.weight`, `encoder.layer.N.attention.self.query.weight`, ...).

    model, tokenizer = load_bert("path/to/Bio_ClinicalBERT")
    ids, mask = tokenizer(["hypoechoic nodule"], max_length=128)
    hidden, pooled = model(ids, mask)

The tokenizer follows BERT's reference tokenizer (and Hugging Face's `BertTokenizer`): text
clean-up, CJK characters split apart, lower-casing with accents stripped, punctuation split,
then greedy longest-match-first WordPiece with `##` continuations. `do_lower_case` comes from
`tokenizer_config.json`; without one, Hugging Face lower-cases, and so do we. (Bio_ClinicalBERT
ships no tokenizer_config.json, so `AutoTokenizer`, which the EchoCare-CLIP authors used,
lower-cases although its vocabulary is cased.)
"""
from __future__ import annotations

import json
import os
import re
import unicodedata
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..fileio import cache_dir
from ..weights import read_checkpoint, state_dict_problems


# ----------------------------------------------------------------------------- model
@dataclass
class BertConfig:
    """The sizes in a Hugging Face BERT config.json (BERT-base defaults)."""
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    def to_dict(self) -> dict:
        return asdict(self)


_ACTS = {"gelu": F.gelu, "relu": F.relu,
         "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] ids -> [B, L, D]. One segment: every token has type 0."""
        L = input_ids.shape[1]
        x = self.word_embeddings(input_ids) + self.position_embeddings.weight[:L]
        x = x + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        D = cfg.hidden_size
        self.heads, self.p = cfg.num_attention_heads, cfg.attention_probs_dropout_prob
        self.query, self.key, self.value = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, L, D], mask [B, 1, 1, L] (True = attend) -> [B, L, D]."""
        B, L, D = x.shape

        def split(t):  # [B, L, D] -> [B, heads, L, hd]
            return t.view(B, L, self.heads, D // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)),
                                             split(self.value(x)), attn_mask=mask,
                                             dropout_p=self.p if self.training else 0.0)
        return out.transpose(1, 2).reshape(B, L, D)  # [B, heads, L, hd] -> [B, L, D]


class BertOutput(nn.Module):
    """Post-LN residual: LayerNorm(residual + dropout(dense(x)))."""

    def __init__(self, d_in: int, d_out: int, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(x)))


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg)  # sic: Hugging Face's key is `attention.self.query`
        self.output = BertOutput(cfg.hidden_size, cfg.hidden_size, cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        if cfg.hidden_act not in _ACTS:
            raise ValueError(f"config.json asks for hidden_act {cfg.hidden_act!r}; clip_us.echocare.bert "
                             f"supports {sorted(_ACTS)}")
        self.act = _ACTS[cfg.hidden_act]
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg.intermediate_size, cfg.hidden_size, cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(cfg) for _ in range(cfg.num_hidden_layers)])


class BertPooler(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class BertModel(nn.Module):
    """`model(input_ids, attention_mask) -> (last_hidden_state [B, L, D], pooler_output [B, D])`."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.pooler = BertPooler(cfg)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        """BERT's initialisation (normal, std 0.02), so a random tiny BERT behaves like one."""
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"{input_ids.shape[1]} tokens; this BERT takes at most "
                             f"{self.config.max_position_embeddings}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, L]: padding keys hidden
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x, self.pooler(x)


# ----------------------------------------------------------------------------- tokenizer
SPECIALS = ("[UNK]", "[SEP]", "[PAD]", "[CLS]", "[MASK]")
_SPECIAL_RE = re.compile("(" + "|".join(map(re.escape, SPECIALS)) + ")")
# ASCII punctuation counts even where Unicode says symbol ($, ^, `, ...), as in BERT.
_ASCII_PUNCT = {chr(c) for c in (*range(33, 48), *range(58, 65), *range(91, 97), *range(123, 127))}
_CONTROL_ASCII = {c: None for c in (*range(0, 9), 11, 12, *range(14, 32), 127)}
_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
        (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _is_punct(ch: str) -> bool:
    return ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P")


def _clean_char(ch: str) -> str:
    """'' for NUL, U+FFFD and control characters; ' ' for whitespace; CJK padded with spaces."""
    if ch in " \t\n\r" or unicodedata.category(ch) == "Zs":
        return " "
    if ch in ("\x00", "\ufffd") or unicodedata.category(ch).startswith("C"):
        return ""
    cp = ord(ch)
    return f" {ch} " if any(lo <= cp <= hi for lo, hi in _CJK) else ch


def clean_text(text: str) -> str:
    """BERT's clean-up and CJK split. No Unicode normalisation, as in Google's BERT and Hugging
    Face's BertTokenizer (Rust); only the legacy Python tokenizer adds NFC, which changes cased
    tokens of decomposed text ("Cafe" + U+0301)."""
    if text.isascii():  # fast path: only control characters can change
        return text.translate(_CONTROL_ASCII).replace("\t", " ").replace("\n", " ").replace("\r", " ")
    return "".join(map(_clean_char, text))


def strip_accents(word: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")


def split_punct(word: str) -> list[str]:
    """'3.5cm,' -> ['3', '.', '5cm', ',']: every punctuation character is its own token."""
    out, current = [], ""
    for ch in word:
        if _is_punct(ch):
            out += [current, ch] if current else [ch]
            current = ""
        else:
            current += ch
    return out + [current] if current else out


class WordPieceTokenizer:
    """`tokenizer(texts, max_length=128) -> (input_ids, attention_mask)`, LongTensors [B, max_length].

    Each text becomes [CLS] pieces [SEP], truncated to max_length and padded with [PAD]. Results
    are cached per whitespace-separated chunk, since every step after clean-up works chunk by chunk.
    """

    def __init__(self, vocab: dict[str, int], do_lower_case: bool = True,
                 max_input_chars_per_word: int = 100):
        missing = [t for t in SPECIALS if t not in vocab]
        if missing:
            raise ValueError(f"the vocabulary lacks the special tokens {missing}")
        self.vocab, self.do_lower_case = vocab, do_lower_case
        self.max_chars = max_input_chars_per_word
        self.unk, self.cls, self.sep, self.pad = (vocab[t] for t in ("[UNK]", "[CLS]", "[SEP]", "[PAD]"))
        self.cache: dict[str, list[int]] = {}

    @classmethod
    def from_file(cls, vocab_file: str, do_lower_case: bool = True) -> "WordPieceTokenizer":
        """vocab.txt: one token per line, the line number is its id."""
        with open(vocab_file, encoding="utf-8") as f:
            tokens = f.read().split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()  # the final newline
        return cls({t: i for i, t in enumerate(tokens)}, do_lower_case)

    def wordpiece(self, word: str) -> list[int]:
        """Greedy longest-match-first; a word with any unmatched piece is one [UNK]."""
        if len(word) > self.max_chars:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
            else:
                return [self.unk]
            start = end
        return ids

    def chunk_ids(self, chunk: str) -> list[int]:
        """One whitespace-separated chunk -> ids (cached)."""
        if chunk not in self.cache:
            word = chunk
            if self.do_lower_case and chunk not in SPECIALS:
                word = strip_accents(chunk.lower())
            words = [word] if word in SPECIALS else split_punct(word)
            self.cache[chunk] = [i for w in words for i in self.wordpiece(w)]
        return self.cache[chunk]

    def encode(self, text: str) -> list[int]:
        """Ids without [CLS]/[SEP]. Special tokens written in the text stay whole."""
        ids = []
        for part in _SPECIAL_RE.split(text):
            if part in SPECIALS:
                ids.append(self.vocab[part])
            elif part:
                for chunk in clean_text(part).split():
                    ids.extend(self.chunk_ids(chunk))
        return ids

    def __call__(self, texts, max_length: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if max_length < 2:
            raise ValueError(f"max_length={max_length} leaves no room for [CLS] and [SEP]")
        ids = torch.full((len(texts), max_length), self.pad, dtype=torch.long)
        mask = torch.zeros((len(texts), max_length), dtype=torch.long)
        for row, text in enumerate(texts):
            seq = [self.cls] + self.encode(text)[: max_length - 2] + [self.sep]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        return ids, mask


# ----------------------------------------------------------------------------- loading
BERT_SOURCE = ("BioClinicalBERT is published by its authors at "
               "https://huggingface.co/emilyalsentzer/Bio_ClinicalBERT (config.json, vocab.txt, "
               "pytorch_model.bin)")


def find_bert_folder(folder: str | None = None, download_root: str | None = None) -> str:
    """`folder` if given, else `Bio_ClinicalBERT` in the cache; it must hold config.json and vocab.txt."""
    folder = folder or os.path.join(cache_dir(download_root), "Bio_ClinicalBERT")
    if not os.path.isdir(folder):
        what = "is a file, not a folder" if os.path.isfile(folder) else "does not exist"
        raise FileNotFoundError(f"BERT folder {folder} {what}. {BERT_SOURCE}: download the folder "
                                f"and pass its path, or put it at "
                                f"{os.path.join(cache_dir(download_root), 'Bio_ClinicalBERT')}.")
    missing = [n for n in ("config.json", "vocab.txt") if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        hint = (" It holds echocare_encoder.pth: that is the Swin image encoder, not BERT."
                if os.path.isfile(os.path.join(folder, "echocare_encoder.pth")) else "")
        raise FileNotFoundError(f"{folder} is not a Hugging Face BERT folder: no "
                                f"{' and no '.join(missing)}.{hint} {BERT_SOURCE}.")
    return folder


def read_bert_config(folder: str) -> BertConfig:
    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    if raw.get("model_type", "bert") != "bert" or raw.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{path}: model_type {raw.get('model_type')!r}, position_embedding_type "
                         f"{raw.get('position_embedding_type', 'absolute')!r}: clip_us.echocare.bert reads "
                         f"BERT with absolute positions only")
    return BertConfig(**{f.name: raw[f.name] for f in fields(BertConfig) if f.name in raw})


def read_do_lower_case(folder: str) -> bool:
    """tokenizer_config.json's do_lower_case; absent, Hugging Face's default (True)."""
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return True
    with open(path, encoding="utf-8") as f:
        return bool(json.load(f).get("do_lower_case", True))


def weights_file(folder: str) -> str:
    """The folder's model.safetensors, else its pytorch_model.bin."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise FileNotFoundError(f"{folder} has config.json but neither model.safetensors nor "
                            f"pytorch_model.bin. {BERT_SOURCE}.")


def bert_state_dict(raw: dict, path: str) -> dict:
    """BertModel keys from BertModel or BertForPreTraining checkpoints: the `bert.` prefix is
    removed, pre-training heads (`cls.*`) and index buffers (`position_ids`) are dropped, and old
    TensorFlow-converted LayerNorm names (gamma/beta) become weight/bias as Hugging Face does."""
    if not isinstance(raw, dict) or not all(torch.is_tensor(v) for v in raw.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, found {type(raw).__name__}")
    out = {}
    for key, value in raw.items():
        if key.startswith("cls.") or key.endswith(("position_ids", "token_type_ids")):
            continue
        key = key[len("bert."):] if key.startswith("bert.") else key
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
        out[re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)] = value
    return out


def check_bert_state_dict(sd: dict, model: BertModel, path: str) -> None:
    problems = state_dict_problems(sd, model)
    if problems:
        raise ValueError(f"{path}: not a BERT checkpoint matching its config.json {problems}")


def load_bert(folder: str | None = None, download_root: str | None = None):
    """(BertModel in eval mode, fp32; WordPieceTokenizer) from a Hugging Face BERT folder."""
    folder = find_bert_folder(folder, download_root)
    cfg = read_bert_config(folder)
    path = weights_file(folder)
    raw, _ = read_checkpoint(path)
    sd = bert_state_dict(raw, path)
    with torch.device("meta"):  # shapes only: the checkpoint supplies every tensor
        model = BertModel(cfg)
    check_bert_state_dict(sd, model, path)
    model.load_state_dict({k: v.float() for k, v in sd.items()}, assign=True)
    tokenizer = WordPieceTokenizer.from_file(os.path.join(folder, "vocab.txt"), read_do_lower_case(folder))
    if max(tokenizer.vocab.values()) >= cfg.vocab_size:
        raise ValueError(f"{folder}: vocab.txt has ids up to {max(tokenizer.vocab.values())} but "
                         f"config.json says vocab_size {cfg.vocab_size}: the files do not belong "
                         f"together")
    return model.eval(), tokenizer
