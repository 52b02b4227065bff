"""Tests for clip_us/bert.py: a random transformers.BertModel saved with save_pretrained gives the
same outputs through load_bert (safetensors, and a BertForPreTraining pytorch_model.bin); the
WordPiece tokenizer gives transformers.BertTokenizer's ids and masks on a hard corpus, cased and
uncased, with a vocabulary built here; bad folders fail with errors that say what is wrong."""
from __future__ import annotations

import json
import unicodedata

import pytest
import torch

from clip_us.echocare import bert as B

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

LONG_WORD = "pneumonoultramicroscopicsilicovolcanoconiosis" * 3  # 135 characters
CORPUS = [
    "Hypoechoic nodule in the LEFT lobe, 1.2 x 0.8 cm; BI-RADS 4a.",
    "Heterogeneous liver parenchyma with posterior acoustic shadowing (TI-RADS 5).",
    "Résumé of the naïve café patient: Ångström-level detail, Straße, ÉCHO.",
    "Unaffable unbelievably ##hash İstanbul ǅ Σίσυφος ﬁle",
    "甲状腺结节 thyroid nodule 乳腺超声 mixed中文text",
    "Lesion 😀 benign 👍🏽 emoji",
    "Wait!!! ...??? (((nested))) --- ;; $5 ^_^ `tick` ~tilde~",
    "12.5mm, 3cm x 4cm, 37.5°C, 120/80 mmHg, 5-10% ± 2.0 µm",
    LONG_WORD, "a" * 101, "x" * 100,
    "", "   \t\n  ", "\u00a0\u3000",
    "abc\x00def\x07 ghi\u200b jkl\ufffd \u2028next \x1cfs",
    "see [SEP] and [MASK] or [cls] [UNK]x",
    " ".join(["long text with many words to exceed the maximum length"] * 30),
]
DECOMPOSED = "Cafe\u0301 decomposed"  # see test_legacy_python_tokenizer_differs_only_by_nfc


def build_vocab(corpus: list[str]) -> list[str]:
    """Special tokens, whole words of both cases, a few real sub-words, and every character
    (bare and ##) except two, so that [UNK] words occur."""
    words = {w for t in corpus for w in t.split()} | {w.lower() for t in corpus for w in t.split()}
    chars = {c for t in corpus for c in t + unicodedata.normalize("NFD", t.lower())}
    chars -= {"😀", "Ø"} | {c for c in chars if c.isspace()}
    pieces = ["hypo", "##echo", "##ic", "nod", "##ule", "un", "##aff", "##able", "##believ",
              "##ably", "##mm", "##cm", "pneumono", "##ultra", "hetero", "##gene", "##ous"]
    tokens = list(B.SPECIALS) + sorted(w for w in words if len(w) < 12) + pieces
    tokens += sorted(chars) + sorted("##" + c for c in chars)
    return list(dict.fromkeys(tokens))  # unique, order kept


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(build_vocab(CORPUS + [DECOMPOSED])) + "\n", encoding="utf-8")
    return path


def peer_ids(peer, texts, max_length):
    enc = peer(texts, padding="max_length", truncation=True, max_length=max_length,
               return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


# ----------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("lower", [True, False])
@pytest.mark.parametrize("max_length", [128, 16])
def test_wordpiece_matches_bert_tokenizer(vocab_file, lower, max_length):
    from transformers import BertTokenizer
    peer = BertTokenizer(str(vocab_file), do_lower_case=lower)
    ours = B.WordPieceTokenizer.from_file(str(vocab_file), do_lower_case=lower)
    texts = CORPUS + [DECOMPOSED]
    ids, mask = ours(texts, max_length=max_length)
    assert ids.dtype == mask.dtype == torch.long and ids.shape == (len(texts), max_length)
    want_ids, want_mask = peer_ids(peer, texts, max_length)
    for i, text in enumerate(texts):
        assert torch.equal(ids[i], want_ids[i]) and torch.equal(mask[i], want_mask[i]), repr(text)
    unk = ours.vocab["[UNK]"]
    assert (ids == unk).any(), "the corpus must exercise [UNK]"


def test_legacy_python_tokenizer_differs_only_by_nfc(vocab_file):
    """Hugging Face's legacy Python tokenizer NFC-normalises first; Google's BERT and the Rust
    BertTokenizer do not. Both settings agree everywhere else, and lower-casing (which strips
    accents after NFD) makes even that text agree."""
    from transformers.models.bert import BertTokenizerLegacy
    for lower in (True, False):
        peer = BertTokenizerLegacy(str(vocab_file), do_lower_case=lower)
        ours = B.WordPieceTokenizer.from_file(str(vocab_file), do_lower_case=lower)
        assert torch.equal(ours(CORPUS, 64)[0], peer_ids(peer, CORPUS, 64)[0])
        same = torch.equal(ours([DECOMPOSED], 64)[0], peer_ids(peer, [DECOMPOSED], 64)[0])
        assert same == lower


def test_wordpiece_details(vocab_file):
    tok = B.WordPieceTokenizer.from_file(str(vocab_file))
    v = tok.vocab
    assert tok.encode("HYPOECHOECHOIC") == [v["hypo"], v["##echo"], v["##echo"], v["##ic"]]
    assert tok.encode("a" * 101) == [v["[UNK]"]] and tok.encode("x" * 100) != [v["[UNK]"]]
    assert tok.encode("[SEP]") == [v["[SEP]"]]
    ids, mask = tok(["", "   "], max_length=4)
    assert ids.tolist() == [[v["[CLS]"], v["[SEP]"], v["[PAD]"], v["[PAD]"]]] * 2
    assert mask.tolist() == [[1, 1, 0, 0]] * 2
    ids, mask = tok("one text", max_length=3)  # a single string is a batch of one
    assert ids.shape == (1, 3) and ids[0, -1] == v["[SEP]"] and mask.all()
    with pytest.raises(ValueError, match="max_length"):
        tok(["x"], max_length=1)


# ----------------------------------------------------------------------------- model
SMALL = dict(vocab_size=0, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=40)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, vocab_file):
    """A random BertModel saved with save_pretrained (model.safetensors + config.json), plus the
    test vocabulary. Every parameter is random, LayerNorms included."""
    import transformers
    folder = tmp_path_factory.mktemp("hf-bert")
    n_vocab = len(vocab_file.read_text(encoding="utf-8").splitlines())
    torch.manual_seed(0)
    peer = transformers.BertModel(transformers.BertConfig(**dict(SMALL, vocab_size=n_vocab))).eval()
    with torch.no_grad():
        for p in peer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    peer.save_pretrained(str(folder))
    (folder / "vocab.txt").write_bytes(vocab_file.read_bytes())
    return folder, peer


def assert_same_outputs(model, peer, ids, mask):
    with torch.inference_mode():
        want = peer(input_ids=ids, attention_mask=mask)
        hidden, pooled = model(ids, mask)
    torch.testing.assert_close(hidden, want.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, want.pooler_output, rtol=1e-5, atol=1e-5)


def test_load_bert_matches_transformers_with_padding(hf_folder):
    folder, peer = hf_folder
    assert (folder / "model.safetensors").is_file()
    model, tok = B.load_bert(str(folder))
    assert not model.training and tok.do_lower_case  # no tokenizer_config.json: HF's default
    ids, mask = tok(CORPUS[:6], max_length=40)
    assert (mask == 0).any() and (mask == 1).any()
    assert_same_outputs(model, peer, ids, mask)
    assert list(model.state_dict()) == list(peer.state_dict())


def test_pretraining_checkpoint_bin_with_old_names(hf_folder, tmp_path):
    """BertForPreTraining's pytorch_model.bin: `bert.` prefix, `cls.*` heads, a position_ids
    buffer and TensorFlow-era LayerNorm gamma/beta names."""
    folder, peer = hf_folder
    sd = {}
    for k, v in peer.state_dict().items():
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        sd["bert." + k] = v
    sd["bert.embeddings.position_ids"] = torch.arange(40)[None]
    sd["cls.predictions.bias"] = torch.zeros(5)
    sd["cls.seq_relationship.weight"] = torch.zeros(2, 32)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    for name in ("config.json", "vocab.txt"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    model, tok = B.load_bert(str(tmp_path))
    assert tok.do_lower_case is False
    ids, mask = tok(CORPUS[6:9], max_length=40)
    assert_same_outputs(model, peer, ids, mask)


def test_cache_folder(hf_folder, tmp_path, monkeypatch):
    folder, _ = hf_folder
    monkeypatch.setenv("CLIP_US_CACHE", str(folder.parent))
    folder.rename(folder.parent / "Bio_ClinicalBERT")
    try:
        assert B.find_bert_folder() == str(folder.parent / "Bio_ClinicalBERT")
    finally:
        (folder.parent / "Bio_ClinicalBERT").rename(folder)


# ----------------------------------------------------------------------------- bad input
def test_bad_folders(hf_folder, tmp_path, monkeypatch):
    folder, _ = hf_folder
    monkeypatch.setenv("CLIP_US_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError) as e:
        B.load_bert()
    assert "emilyalsentzer/Bio_ClinicalBERT" in str(e.value)
    assert str(tmp_path / "cache" / "Bio_ClinicalBERT") in str(e.value)
    swin = tmp_path / "swin"
    swin.mkdir()
    torch.save({}, swin / "echocare_encoder.pth")
    with pytest.raises(FileNotFoundError, match="no config.json and no vocab.txt.*Swin image encoder"):
        B.load_bert(str(swin))
    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
        B.load_bert(str(swin / "echocare_encoder.pth"))
    novocab = tmp_path / "novocab"
    novocab.mkdir()
    (novocab / "config.json").write_bytes((folder / "config.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="no vocab.txt") as e:
        B.load_bert(str(novocab))
    assert str(novocab) in str(e.value)


def test_wrong_weights_are_listed(hf_folder, tmp_path):
    folder, peer = hf_folder
    for name in ("config.json", "vocab.txt"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    sd = dict(peer.state_dict())
    del sd["encoder.layer.1.output.dense.bias"]
    sd["encoder.layer.0.attention.self.query.weight"] = torch.zeros(3, 3)
    sd["visual.conv1.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError) as e:
        B.load_bert(str(tmp_path))
    msg = str(e.value)
    for part in ("pytorch_model.bin", "missing encoder.layer.1.output.dense.bias",
                 "unexpected visual.conv1.weight",
                 "encoder.layer.0.attention.self.query.weight: shape (3, 3), expected (32, 32)"):
        assert part in msg
    torch.save(peer.state_dict(), tmp_path / "pytorch_model.bin")
    with open(tmp_path / "vocab.txt", "a", encoding="utf-8") as f:
        f.write("extra1\nextra2\n")  # a vocabulary from another model
    with pytest.raises(ValueError, match="do not belong together"):
        B.load_bert(str(tmp_path))
