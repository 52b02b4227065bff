"""Tests for clip_us/tokenizer.py: vocab hash, id parity with open_clip's tokenizer, truncation,
round trips, the ftfy fast path, the chunk cache, and bad inputs."""
import ast
import gzip
import hashlib
import importlib.util
import random
import shutil

import pytest
import torch

from clip_us import tokenizer as T

open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")

VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"

# The ultrasound-CLIP paper (§4.3), with {benign/malignant} filled in each way.
LN_PROMPT = ("Benign: Oval shape, preserved echogenic hilum, thin homogeneous cortex. "
             "Malignant: Round, absent hilum, thickened/heterogeneous cortex, "
             "microcalcifications, irregular margins.The abnormality in this lymph node scan is {}")
BUSI_PROMPT = ("Benign: Oval shape, smooth margins, parallel orientation, homogeneous hypoechoic "
               "echotexture, posterior enhancement. Malignant: Irregular shape, spiculated "
               "margins, non-parallel orientation, heterogeneous hypoechoic echotexture, "
               "microcalcifications, posterior acoustic shadowing. The abnormality in this breast "
               "scan is {}")
SEED_PROMPTS = [prompt.format(label) for prompt in (LN_PROMPT, BUSI_PROMPT)
                for label in ("benign", "malignant")]

CORPUS = [
    "An ultrasound image of breast with benign findings.",
    "Hypoechoic mass measuring 1.2 x 0.8 cm at 10 o'clock, 3 cm from the nipple. BI-RADS 4a.",
    "Irregular, taller-than-wide nodule (TI-RADS 5); 2.35x1.7x0.9cm; vascularity ++.",
    "Lymph node 8mm short-axis, loss of fatty hilum; f/u in 6-12 mo. Impression: BI-RADS 3",
    "甲状腺右叶低回声结节，大小约1.2×0.8厘米，边界不清。",
    "乳腺超声 shows 混合 echo 😀 👍🏽 🫀❤️ done",
    "AT&amp;T &lt;tag&gt; it&#39;s &quot;quoted&quot; &amp;amp; double &amp;lt;escaped&amp;gt;",
    "<b>bold</b> &amp; <i>italic</i>",
    # ftfy unescapes once itself unless the line has a literal "<"; CLIP then unescapes twice more
    "<p>double &amp;amp; escaped</p>", "triple &amp;amp;amp; escaped",
    "MiXeD CaSe BREAST Ultrasound DOPPLER ÀÉÎõü Straße ﬁle",
    "  leading and   trailing\t\ttabs\nnewlines\r\n and \u00a0nbsp\u2003em-space  ",
    "mojibake: doesnâ€™t â€œworkâ€\x9d",
    "it's they're we've I'm you'll he'd don't ISN'T",
    "numbers 1234567890 3.14159 -42 +7 1e-5 50%",
    "punctuation!!! ??? ... --- ((())) [x] {y} @#$^*~`|\\/",
    "",
    "   ",
    *SEED_PROMPTS,
]

LONG_TEXTS = [
    " ".join(["Hypoechoic mass with spiculated margins and posterior shadowing."] * 12),
    "1.2 x 0.8 cm, " * 40,
    "超声" * 200,
    "😀" * 100,
]


@pytest.fixture(scope="module")
def ours():
    return T.default_tokenizer()


@pytest.fixture(scope="module")
def peer():
    return open_clip_tokenizer.SimpleTokenizer()


def test_shipped_vocab_sha256():
    assert hashlib.sha256(T.VOCAB_PATH.read_bytes()).hexdigest() == VOCAB_SHA256


def test_vocab_layout_matches_open_clip(ours, peer):
    assert len(T.bytes_to_unicode()) == 256 and len(set(T.bytes_to_unicode().values())) == 256
    assert T.bytes_to_unicode() == open_clip_tokenizer.bytes_to_unicode()
    assert ours.vocab_size == len(ours.encoder) == 49408
    assert (ours.sot_token, ours.eot_token) == (49406, 49407)
    assert (ours.sot_token, ours.eot_token) == (peer.sot_token_id, peer.eot_token_id)
    # same token strings at the same ids, except the specials that open_clip renamed
    peer_vocab = {i: s for s, i in peer.encoder.items() if i < 49406}
    assert {i: s for i, s in ours.decoder.items() if i < 49406} == peer_vocab
    assert all(ours.encoder[s] == i for i, s in ours.decoder.items())


@pytest.mark.parametrize("text", CORPUS + LONG_TEXTS)
def test_encode_matches_open_clip(ours, peer, text):
    assert ours.encode(text) == peer.encode(text)


def test_tokenize_batch_matches_open_clip(ours):
    ids = T.tokenize(CORPUS)
    assert ids.dtype == torch.long and ids.shape == (len(CORPUS), 77)
    assert torch.equal(ids, open_clip_tokenizer.tokenize(CORPUS))


def test_seed_prompts_fit_in_77_tokens(ours):
    # the paper says its prompts were kept within 77 tokens: they must tokenize without truncation
    ids = T.tokenize(SEED_PROMPTS)
    assert (ids == ours.eot_token).sum(1).tolist() == [1] * len(SEED_PROMPTS)


def test_truncation_matches_open_clip_and_keeps_eot_last(ours):
    ids = T.tokenize(LONG_TEXTS, truncate=True)
    peer_ids = open_clip_tokenizer.tokenize(LONG_TEXTS)
    assert torch.equal(ids, peer_ids)
    assert (ids[:, 0] == ours.sot_token).all() and (ids[:, -1] == ours.eot_token).all()
    assert (ids != 0).all()  # every position used, no padding
    for row, text in zip(ids, LONG_TEXTS):
        assert row[1:-1].tolist() == ours.encode(text)[:75]


def test_too_long_text_raises_with_token_count(ours):
    text = LONG_TEXTS[0]
    n_tokens = len(ours.encode(text)) + 2
    with pytest.raises(ValueError) as err:
        T.tokenize(["short caption", text])
    message = str(err.value)
    assert str(n_tokens) in message and "truncate=True" in message
    assert text[:40] in message and text not in message  # named, but shortened


@pytest.mark.parametrize("context_length", [8, 16, 77, 100])
def test_context_length_respected(ours, context_length):
    texts = ["a b c d e f", "breast", ""]
    ids = T.tokenize(texts, context_length=context_length)
    assert ids.shape == (3, context_length)
    assert torch.equal(ids, open_clip_tokenizer.tokenize(texts, context_length=context_length))
    # a text of exactly context_length tokens fits; one more token needs truncate=True
    exact = " ".join(["x"] * (context_length - 2))
    assert T.tokenize(exact, context_length=context_length)[0, -1] == ours.eot_token
    with pytest.raises(ValueError, match=str(context_length + 1)):
        T.tokenize(exact + " x", context_length=context_length)
    cut = T.tokenize(exact + " x y", context_length=context_length, truncate=True)
    peer_cut = open_clip_tokenizer.tokenize(exact + " x y", context_length=context_length)
    assert torch.equal(cut, peer_cut)


@pytest.mark.parametrize("text", CORPUS + LONG_TEXTS)
def test_decode_round_trip(ours, peer, text):
    ids = ours.encode(text)
    decoded = ours.decode(ids)
    assert decoded == peer.decode(ids)
    # decode puts a space after every word piece; otherwise the normalised text comes back
    assert decoded.replace(" ", "") == T.clean_text(text).replace(" ", "")
    assert ours.encode(decoded) == ids


def test_decode_of_plain_words_is_exact(ours):
    text = "An Ultrasound   image of\tthe BREAST"
    assert ours.decode(ours.encode(text)) == "an ultrasound image of the breast "
    assert ours.decode(torch.tensor(ours.encode(text))) == "an ultrasound image of the breast "


def _random_text(rng, alphabet, n):
    return "".join(rng.choice(alphabet) for _ in range(n))


def test_clean_text_fast_path_equals_ftfy(peer):
    # printable ASCII skips ftfy; it must clean exactly as ftfy + double unescape would
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(32, 127)] + ["\t", "\n", " ", "&amp;", "&lt;", "&#39;", "\r"]
    for _ in range(2000):
        text = _random_text(rng, alphabet, rng.randint(0, 40))
        assert T.clean_text(text) == open_clip_tokenizer._clean_lower(text), repr(text)


def test_random_unicode_matches_open_clip(peer):
    # fresh tokenizer: every chunk is a cache miss first, then a hit on the second pass
    rng = random.Random(1)
    alphabet = list("abcXYZ019 .,'-&;\t\n") + ["é", "ß", "ﬁ", "中", "文", "😀", "🏽", "\u200b",
                                                "\x85", "\u3000", "Ⅻ", "٣", "&amp;", "'S", "'ll"]
    texts = [_random_text(rng, alphabet, rng.randint(0, 30)) for _ in range(500)]
    tokenizer = T.SimpleTokenizer()
    for _ in range(2):
        assert [tokenizer.encode(t) for t in texts] == [peer.encode(t) for t in texts]


def test_cache_is_used_and_bounded(monkeypatch, peer):
    tokenizer = T.SimpleTokenizer()
    tokenizer.encode("hypoechoic nodule")
    assert tokenizer.cache["hypoechoic"] == tuple(peer.encode("hypoechoic"))
    tokenizer.cache["hypoechoic"] = (1, 2, 3)  # a cached chunk is served without re-encoding
    assert tokenizer.encode("hypoechoic") == [1, 2, 3]
    monkeypatch.setattr(T, "CACHE_LIMIT", 4)
    words = [f"word{i}" for i in range(20)]
    assert [tokenizer.encode(w) for w in words] == [peer.encode(w) for w in words]
    assert len(tokenizer.cache) <= 4


def test_special_token_text_follows_openai(ours):
    # OpenAI's tokenizer maps the literal special strings to their ids (open_clip renamed them)
    expected = [*ours.encode("a"), ours.eot_token, *ours.encode("b")]
    assert ours.encode("a <|endoftext|> b") == expected
    assert ours.decode([ours.sot_token, ours.eot_token]) == "<|startoftext|><|endoftext|>"


def test_single_string_empty_list_and_tokenizer_override(ours):
    assert torch.equal(T.tokenize("breast"), T.tokenize(["breast"]))
    assert T.tokenize([]).shape == (0, 77)
    assert T.default_tokenizer() is T.default_tokenizer()

    class Recorder:
        def __call__(self, texts, context_length, truncate):
            return ("called", texts, context_length, truncate)

    assert T.tokenize("x", 10, True, tokenizer=Recorder()) == ("called", "x", 10, True)


def test_bad_inputs(ours, tmp_path):
    with pytest.raises(TypeError, match="got int"):
        T.tokenize(["fine", 3])
    with pytest.raises(ValueError, match="outside CLIP's vocabulary"):
        ours.decode([5, 49408])
    with pytest.raises(ValueError, match="context_length must be at least 2"):
        T.tokenize("x", context_length=1)
    with pytest.raises(FileNotFoundError, match="missing.txt.gz"):
        T.SimpleTokenizer(tmp_path / "missing.txt.gz")
    truncated = tmp_path / "truncated.txt.gz"
    lines = gzip.decompress(T.VOCAB_PATH.read_bytes()).decode("utf-8").split("\n")[:1000]
    truncated.write_bytes(gzip.compress("\n".join(lines).encode("utf-8")))
    with pytest.raises(ValueError, match="not a complete CLIP BPE vocabulary"):
        T.SimpleTokenizer(truncated)
    not_gzip = tmp_path / "plain.txt.gz"
    not_gzip.write_text("#version: 0.2\ni n\n")
    with pytest.raises(ValueError, match="not a readable gzip file"):
        T.SimpleTokenizer(not_gzip)


def test_module_is_standalone(tmp_path):
    # tokenizer.py imports nothing from clip_us and works when copied alone with its vocab
    source = open(T.__file__, encoding="utf-8").read()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("clip_us")
        if isinstance(node, ast.Import):
            assert not any(alias.name.startswith("clip_us") for alias in node.names)
    shutil.copy(T.__file__, tmp_path / "tok_copy.py")
    shutil.copy(T.VOCAB_PATH, tmp_path / T.VOCAB_PATH.name)
    spec = importlib.util.spec_from_file_location("tok_copy", tmp_path / "tok_copy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.VOCAB_PATH.parent == tmp_path
    assert torch.equal(module.tokenize(CORPUS[:3]), T.tokenize(CORPUS[:3]))
