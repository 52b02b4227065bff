"""clip_us.load_biomedclip against open_clip (test-only peer): a CustomTextCLIP built from a
BiomedCLIP open_clip_config.json with small towers (timm's vit_tiny_patch16_224, a 2-layer BERT),
its random weights saved as the published folder; the same embeddings from both, and the same
token ids as open_clip's HFTokenizer on awkward text. Bad folders name what is wrong."""
from __future__ import annotations

import json
import unicodedata

import pytest
import torch

import clip_us
from clip_us.baselines import biomedclip as BC

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("transformers")
pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

LONG = " ".join(["hypoechoic breast lesion with posterior acoustic shadowing"] * 40)  # > 256 ids
TEXTS = [
    "An ultrasound image of a BENIGN breast lesion.",
    "Résumé of the naïve café patient: Ångström-level detail, ÉCHO.",
    "乳腺超声 thyroid nodule 甲状腺 mixed中文text",
    "3.5cm,lesion;(irregular)!!! ... ??? $5 ^_^ `tick` ~tilde~ 120/80 ± 2.0 µm",
    "cafÃ© &amp;lt;b&amp;gt; bold &lt;i&gt;",        # mojibake (ftfy) and HTML entities (unescape x2)
    "x < y &amp;amp; z",                              # with "<" ftfy leaves entities to the unescapes
    "  tabs\tand\nnewlines \u00a0 nbsp\u3000ideographic  ",
    "abc\x00def\x07 ghi\u200b jkl \ufffd end",
    "see [SEP] and [MASK] or [cls] [UNK]x", "lesion 😀 emoji",
    "", LONG,
]
WORDS = ["hypo", "##echo", "##ic", "breast", "lesion", "benign", "ultra", "##sound", "image",
         "with", "posterior", "acoustic", "shadow", "##ing", "an", "of", "a", "cafe", "nod", "##ule"]
TEXT_CFG = dict(vocab_size=0, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=256)


def vocab() -> list[str]:
    """[PAD] first (id 0, as BERT's), some words and pieces, every character bare and ##."""
    chars = {c for t in TEXTS for c in t + unicodedata.normalize("NFD", t.lower())}
    chars = sorted(c for c in chars if not c.isspace() and c != "😀")  # an [UNK]
    return list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *chars,
                               *("##" + c for c in chars)]))


def open_clip_config(folder) -> dict:
    """BiomedCLIP's published open_clip_config.json, with small towers: the text tower is the
    BERT whose config.json is in `folder` (open_clip reads it through AutoConfig)."""
    return {"model_cfg": {
        "embed_dim": 48,
        "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                       "timm_pool": "", "timm_proj": "linear", "image_size": 224},
        "text_cfg": {"hf_model_name": str(folder), "hf_tokenizer_name": str(folder),
                     "hf_model_pretrained": False, "hf_proj_type": "mlp",
                     "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256}},
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711]}}


def write_tokenizer(folder) -> None:
    (folder / "vocab.txt").write_text("\n".join(vocab()) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"do_lower_case": True, "strip_accents": None, "tokenize_chinese_chars": True,
         "tokenizer_class": "BertTokenizer"}))


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """(folder laid out as published, open_clip's CustomTextCLIP with the same random weights)."""
    folder = tmp_path_factory.mktemp("biomedclip")
    write_tokenizer(folder)
    bert = dict(TEXT_CFG, vocab_size=len(vocab()), model_type="bert", pad_token_id=0)
    (folder / "config.json").write_text(json.dumps(bert))
    cfg = open_clip_config(folder)
    (folder / BC.CONFIG).write_text(json.dumps(cfg))
    torch.manual_seed(0)
    peer = open_clip.CustomTextCLIP(**cfg["model_cfg"]).eval()
    with torch.no_grad():  # timm zero-initialises biases and open_clip the logit scale: vary all
        for p in peer.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    torch.save(peer.state_dict(), folder / BC.WEIGHTS)
    return folder, peer


def test_embeddings_equal_open_clips_custom_text_clip(published):
    folder, peer = published
    model, tokenizer = clip_us.load_biomedclip(str(folder))
    ids = tokenizer(TEXTS)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids), peer.encode_text(ids), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.encode_image(pixels), peer.encode_image(pixels),
                                   atol=1e-5, rtol=1e-4)
        pad_changed = ids.clone()
        pad_changed[ids == 0] = 7  # padding counts: unmasked it changes the text embedding
        assert not torch.allclose(model.encode_text(pad_changed[:1]), model.encode_text(ids[:1]))
    assert model.logit_scale.item() == pytest.approx(peer.logit_scale.item())
    assert model.text.config.num_attention_heads == 4  # from config.json
    assert model.visual.transformer.resblocks[0].attn.heads == 3  # vit_tiny: width 192 / 64
    assert isinstance(model.text_head[1], torch.nn.GELU) and model.text_head[0].weight.shape == (40, 32)
    std = open_clip_config(folder)["preprocess_cfg"]["std"]
    assert model.transform().size == 224 and model.std == tuple(std)


def test_tokenizer_ids_equal_open_clips_hf_tokenizer(published):
    folder, _ = published
    _, tokenizer = clip_us.load_biomedclip(str(folder))
    peer = open_clip.get_tokenizer(f"local-dir:{folder}")
    ours, theirs = tokenizer(TEXTS), peer(TEXTS)
    assert ours.shape == (len(TEXTS), 256) and ours.dtype == torch.long
    for text, a, b in zip(TEXTS, ours, theirs):
        assert a.tolist() == b.tolist(), text
    assert (ours[-1] != 0).all() and ours[-1, -1] == 3  # the long text: truncated, ends in [SEP]
    assert 1 in ours[-3].tolist() and tokenizer("one text").shape == (1, 256)  # 😀: [UNK]


def test_default_text_shape_is_pubmedbert_base(published, tmp_path):
    """Without config.json the text tower is PubMedBERT-base's (12 layers): the small tower's
    file does not fit, and the error says which shape it was checked against."""
    folder, _ = published
    for f in BC.FILES:
        (tmp_path / f).symlink_to(folder / f)
    with pytest.raises(ValueError, match=r"fitting PubMedBERT-base's shape \(the folder has no "
                                         r"config.json\).*missing text.encoder.layer.2.attention"):
        clip_us.load_biomedclip(str(tmp_path))
    (tmp_path / BC.WEIGHTS).unlink()
    (tmp_path / BC.WEIGHTS).write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        clip_us.load_biomedclip(str(tmp_path))


@pytest.mark.parametrize("name", BC.FILES)
def test_a_missing_file_is_named(published, tmp_path, name):
    folder, _ = published
    for f in BC.FILES:
        if f != name:
            (tmp_path / f).symlink_to(folder / f)
    with pytest.raises(FileNotFoundError, match=f"has no {name}.*huggingface.co/microsoft/BiomedCLIP"):
        clip_us.load_biomedclip(str(tmp_path))


def test_bad_layouts_and_keys_are_refused(published, tmp_path):
    folder, peer = published
    for f in ("vocab.txt", "tokenizer_config.json", "config.json", BC.WEIGHTS):
        (tmp_path / f).symlink_to(folder / f)
    cfg = open_clip_config(folder)
    cfg["model_cfg"]["text_cfg"]["hf_proj_type"] = "linear"
    (tmp_path / BC.CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="text_cfg.hf_proj_type is 'linear', not 'mlp'"):
        clip_us.load_biomedclip(str(tmp_path))
    (tmp_path / BC.CONFIG).write_text(json.dumps(open_clip_config(folder)))
    sd = dict(peer.state_dict(), **{"visual.extra.weight": torch.zeros(1)})
    del sd["text.proj.2.weight"]
    (tmp_path / BC.WEIGHTS).unlink()
    torch.save(sd, tmp_path / BC.WEIGHTS)
    with pytest.raises(ValueError, match=r"unknown visual.extra.weight.*missing text_head.2.weight"):
        clip_us.load_biomedclip(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        clip_us.load_biomedclip(str(tmp_path / "nope"))
