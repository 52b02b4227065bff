"""CLIP's byte-level BPE tokenizer, written from scratch.

Follows OpenAI CLIP's `simple_tokenizer.py` and `clip.tokenize` (Radford et al., 2021), with
open_clip's conventions for the tensor it returns:
1. clean: ftfy, HTML unescaped twice, whitespace runs collapsed, lower case;
2. split with CLIP's regex (contractions, letter runs, single digits, punctuation runs);
3. map every UTF-8 byte to a printable character (`bytes_to_unicode`) and apply the BPE merges of
   `bpe_simple_vocab_16e6.txt.gz`, which ships beside this file;
4. `tokenize` wraps the ids in start/end-of-text tokens and zero-pads to 77: [N, 77] LongTensor.
Token ids equal OpenAI's and open_clip's (tests/test_tokenizer.py checks them against open_clip).
One deliberate difference from open_clip: as in OpenAI's code, the literal strings "<|startoftext|>"
and "<|endoftext|>" in a text become the special ids (open_clip renamed its specials
"<start_of_text>"/"<end_of_text>" and matches those instead).

Speed: the cache maps a whole whitespace-separated chunk ("cm,", "1.2", "hypoechoic") to its ids,
so a repeated word costs one dict lookup, with no regex and no BPE. Pure printable-ASCII text skips
ftfy, which provably leaves such text unchanged (see `clean_text`).

This file imports nothing else from clip_us, so it can be copied on its own (with the vocab file).
"""
from __future__ import annotations

import html
import re as stdlib_re
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence, Union

import ftfy
import numpy as np
import regex
import torch

VOCAB_PATH = Path(__file__).resolve().with_name("bpe_simple_vocab_16e6.txt.gz")
# CLIP keeps 49152 - 256 - 2 merges: 256 byte tokens + 256 "</w>" byte tokens + merges + 2 specials
# make the 49408-entry vocabulary.
N_MERGES = 49152 - 256 - 2
SOT_TEXT, EOT_TEXT = "<|startoftext|>", "<|endoftext|>"
# OpenAI's split pattern. No alternative can match whitespace, which is why chunks between spaces
# can be split (and cached) independently.
SPLIT_PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                 r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
# Anything outside printable ASCII, tab and newline, plus "&" (ftfy unescapes HTML entities once
# more on its own), sends a text through ftfy; everything else is left unchanged by ftfy.
_NEEDS_FTFY = stdlib_re.compile(r"[^\t\n\x20-\x25\x27-\x7e]")
# The cache is cleared when it reaches this many chunks, to bound memory on endless corpora.
CACHE_LIMIT = 1 << 18

TextInput = Union[str, Sequence[str]]


@lru_cache(maxsize=None)
def bytes_to_unicode() -> dict:
    """Byte value -> printable character, CLIP's reversible table.

    Printable Latin-1 bytes map to themselves; the 68 others (control characters, space, ...)
    map to chr(256 + n) so that BPE never sees whitespace or control characters.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in keep]
    chars = [chr(b) for b in keep] + [chr(256 + n) for n in range(len(shifted))]
    return dict(zip(keep + shifted, chars))


def clean_text(text: str) -> str:
    """ftfy, HTML unescape twice, collapse whitespace, lower case: exactly CLIP's clean-up.

    Printable ASCII (plus tab and newline) without "&" skips ftfy and unescaping: ftfy only alters
    non-ASCII text, control characters, "\\r" and HTML entities, and unescaping needs an "&".
    """
    if not text.isascii() or _NEEDS_FTFY.search(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def read_head_lines(path: Path, n_lines: int) -> list:
    """The first n_lines lines of a gzip text file, decompressing no further than needed.

    The vocab file holds 262k merges and CLIP uses the first 49k: stopping early makes loading ~3x
    faster than decompressing and splitting all of it.
    """
    stream, data = zlib.decompressobj(wbits=31), path.read_bytes()  # wbits=31: gzip container
    chunks, n_newlines = [], 0
    while n_newlines < n_lines and data:
        try:
            chunk = stream.decompress(data, 1 << 18)  # at most 256 KiB of text at a time
        except zlib.error as err:
            raise ValueError(f"{path} is not a readable gzip file ({err}). Replace it with the "
                             "bpe_simple_vocab_16e6.txt.gz shipped in clip_us.") from err
        data = stream.unconsumed_tail
        chunks.append(chunk)
        n_newlines += chunk.count(b"\n")
    blob = b"".join(chunks)
    if n_newlines >= n_lines:  # cut at a newline: the last chunk may end inside a character
        blob = blob[:blob.rfind(b"\n")]
    return blob.decode("utf-8").split("\n", n_lines)[:n_lines]


def load_merges(path: Union[str, Path] = VOCAB_PATH) -> list:
    """The N_MERGES merge pairs of a CLIP vocab file, in rank order (the first line is a header)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"CLIP BPE vocabulary not found at {path}. Copy bpe_simple_vocab_16e6.txt.gz "
            "(shipped in the clip_us package, also in OpenAI's CLIP repository) there, "
            "or pass bpe_path=.")
    lines = read_head_lines(path, N_MERGES + 1)[1:]
    merges = [tuple(line.split()) for line in lines]
    if len(merges) != N_MERGES or sum(map(len, merges)) != 2 * N_MERGES:
        raise ValueError(f"{path} is not a complete CLIP BPE vocabulary: expected {N_MERGES} merge "
                         "lines of two symbols each. Replace it with the file shipped in clip_us.")
    return merges


def merge_pair(word: list, first: str, second: str) -> list:
    """Merge every non-overlapping (first, second) in `word`, left to right."""
    merged, i, last = [], 0, len(word) - 1
    while i <= last:
        if i < last and word[i] == first and word[i + 1] == second:
            merged.append(first + second)
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged


class SimpleTokenizer:
    """CLIP's BPE tokenizer: `encode(text) -> ids`, `decode(ids) -> text`, and
    `tokenizer(texts, context_length=77, truncate=False) -> LongTensor [N, context_length]`."""

    def __init__(self, bpe_path: Union[str, Path] = VOCAB_PATH):
        merges = load_merges(bpe_path)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        byte_tokens = list(self.byte_encoder.values())
        vocab = byte_tokens + [c + "</w>" for c in byte_tokens]
        vocab += [a + b for a, b in merges] + [SOT_TEXT, EOT_TEXT]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        self.bpe_ranks = {pair: i for i, pair in enumerate(merges)}
        self.sot_token, self.eot_token = self.encoder[SOT_TEXT], self.encoder[EOT_TEXT]
        self.vocab_size = len(vocab)
        self.pattern = regex.compile(SPLIT_PATTERN, regex.IGNORECASE)
        # Latin-1 decoding turns byte b into chr(b); these tables then map it to CLIP's character.
        self._to_bpe_chars = str.maketrans({b: c for b, c in self.byte_encoder.items()})
        self._from_bpe_chars = str.maketrans({c: b for b, c in self.byte_encoder.items()})
        self.cache: dict = {}

    def bpe(self, token: str) -> list:
        """BPE symbols of one split piece, already mapped to CLIP's byte characters."""
        word = [*token[:-1], token[-1] + "</w>"]
        ranks, never = self.bpe_ranks, len(self.bpe_ranks)
        while len(word) > 1:
            # the lowest-ranked (earliest learned) pair present is merged first
            best = min(zip(word, word[1:]), key=lambda pair: ranks.get(pair, never))
            if best not in ranks:
                break
            word = merge_pair(word, *best)
        return word

    def _encode_chunk(self, chunk: str) -> tuple:
        """Ids of one whitespace-free chunk of cleaned text (the cache's unit)."""
        ids = []
        for piece in self.pattern.findall(chunk):
            if piece in (SOT_TEXT, EOT_TEXT):  # OpenAI's tokenizer treats these as the specials
                ids.append(self.encoder[piece])
                continue
            token = piece.encode("utf-8").decode("latin-1").translate(self._to_bpe_chars)
            ids.extend(self.encoder[symbol] for symbol in self.bpe(token))
        if len(self.cache) >= CACHE_LIMIT:
            self.cache.clear()
        self.cache[chunk] = ids = tuple(ids)
        return ids

    def encode(self, text: str) -> list:
        """BPE ids of `text` (no start/end tokens)."""
        if not isinstance(text, str):
            raise TypeError(f"the tokenizer encodes str, got {type(text).__name__}: {text!r:.80}")
        ids, cache = [], self.cache
        for chunk in clean_text(text).split(" "):  # cleaned text has single spaces only
            chunk_ids = cache.get(chunk)
            ids.extend(chunk_ids if chunk_ids is not None else self._encode_chunk(chunk))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (a list or a 1-D tensor); word ends become spaces, as OpenAI's decode."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        try:
            symbols = "".join(self.decoder[i] for i in ids)
        except KeyError as err:
            raise ValueError(f"token id {err.args[0]!r} is outside CLIP's vocabulary (0.."
                             f"{self.vocab_size - 1}); pass ids made by this tokenizer") from None
        raw = symbols.translate(self._from_bpe_chars).encode("latin-1")
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")

    def _row(self, text: str, context_length: int, truncate: bool) -> list:
        """[sot, ids..., eot, 0, ...] of length context_length."""
        ids = [self.sot_token, *self.encode(text), self.eot_token]
        if len(ids) > context_length:
            if not truncate:
                shown = text if len(text) <= 60 else text[:57] + "..."
                raise ValueError(
                    f"Text {shown!r} is {len(ids)} tokens long (with start and end tokens), "
                    f"more than context_length={context_length}. Pass truncate=True to cut it "
                    "(the end-of-text token stays last), or shorten the text.")
            ids = ids[:context_length - 1] + [self.eot_token]
        return ids + [0] * (context_length - len(ids))

    def __call__(self, texts: TextInput, context_length: int = 77,
                 truncate: bool = False) -> torch.Tensor:
        """LongTensor [N, context_length] of sot + ids + eot, zero padded. A str gives N = 1."""
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (start and end tokens), "
                             f"got {context_length}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = [self._row(text, context_length, truncate) for text in texts]
        # numpy converts nested int lists ~3x faster than torch.tensor does
        return torch.from_numpy(np.array(rows, dtype=np.int64).reshape(len(rows), context_length))


@lru_cache(maxsize=None)
def default_tokenizer() -> SimpleTokenizer:
    """The shared tokenizer over the shipped vocab, built on first use (the vocab is read once)."""
    return SimpleTokenizer()


def tokenize(texts: TextInput, context_length: int = 77, truncate: bool = False,
             tokenizer: SimpleTokenizer | None = None) -> torch.Tensor:
    """OpenAI's `clip.tokenize`: LongTensor [N, context_length] of sot + BPE ids + eot, zero padded.

    A text longer than context_length raises ValueError, unless truncate=True, which cuts it and
    keeps the end-of-text token last (the text tower pools there).
    """
    return (tokenizer or default_tokenizer())(texts, context_length, truncate)
