"""Tests for clip_us/echocare/ (model.py, data.py): the dual encoder with tiny encoders (a
small Swin, the tiny CLIP text tower, a small BERT) on both text families; each --train variant
trains exactly its parameters; counts match the closed forms (and the authors' 5,114,881 of
188,502,521); checkpoints round-trip, store no frozen encoder and refuse a changed encoder file;
the temperature trains and stays a scalar; CLIP's pooled text feature matches Hugging Face's."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from clip_us.captions.manifest import Pair
from clip_us.contrastive import CaptionDataset
from clip_us.echocare import bert as B
from clip_us.echocare import data as D
from clip_us.echocare import model as E
from clip_us.echocare import swin as S
from clip_us.loop import Settings, build_optimizer
from clip_us.losses import clip_loss
from clip_us.model import ARCHS, build_model

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
CAPTIONS = ["An ultrasound image of the breast with benign findings.",
            "Thyroid nodule: hypoechoic, irregular margins, 1.2 x 0.8 cm; TI-RADS 5.",
            "Liver parenchyma with increased echogenicity (steatosis).",
            "An ultrasound image of the breast with malignant findings."]
SIZE = 64


@pytest.fixture(scope="module", params=["clip", "bert"])
def model(request):
    return E.build(request.param, "tiny", random_weights=True, captions=CAPTIONS, image_size=SIZE)


def images(n=4, seed=0):
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def text_config(model):
    return ARCHS["tiny"] if model.text_family == "clip" else model.text_encoder.config


# ----------------------------------------------------------------------------- the model
def test_embeddings_are_normalised_256d(model):
    model.eval()
    with torch.no_grad():
        img, txt = model.encode_image(images()), model.encode_text(CAPTIONS)
        feats = model.text_features(CAPTIONS)
    assert img.shape == txt.shape == (4, 256)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(4))
    assert feats.shape == (4, model.text_width())
    assert model.image_features(images()).shape == (4, model.image_encoder.num_features)
    assert model.context_length == {"clip": 77, "bert": 128}[model.text_family]
    assert model.tokenize(CAPTIONS).shape == (4, 2, model.context_length)


def test_padding_cut_changes_nothing(model):
    """text_features_from_tokens drops the columns that are padding in every row."""
    model.eval()
    tokens = model.tokenize(CAPTIONS)
    with torch.no_grad():
        cut = model.text_features_from_tokens(tokens)
        if model.text_family == "clip":
            full = model.text_encoder.encode_text_pooled(tokens[:, 0])
        else:
            full = model.text_encoder(tokens[:, 0], tokens[:, 1])[1]
    torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-6)


def test_loss_is_symmetric_ce_on_cos_over_tau(model):
    """losses.clip_loss with model.scale() is the authors' loss: CE both ways on cos / exp(log_t)."""
    model.eval()
    with torch.no_grad():
        model.log_temperature.fill_(math.log(0.05))
        img, txt, scale = model(images(), model.tokenize(CAPTIONS))
        logits = img @ txt.t() / model.log_temperature.exp()
        labels = torch.arange(4)
        want = (torch.nn.functional.cross_entropy(logits, labels)
                + torch.nn.functional.cross_entropy(logits.t(), labels)) / 2
        torch.testing.assert_close(clip_loss(img, txt, scale, gather=False), want)
        model.log_temperature.fill_(math.log(0.07))


@pytest.mark.parametrize("mode", E.TRAIN_MODES)
def test_each_variant_trains_exactly_its_parameters(model, mode):
    names = set(E.set_trainable(model, mode))
    want = {n for n, _ in model.named_parameters() if n.startswith(E.HEADS) or
            (mode in ("image", "full") and n.startswith("image_encoder.")) or
            (mode in ("text", "full") and n.startswith("text_encoder."))}
    assert names == want and "log_temperature" in names
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert (trainable, total) == E.expected_counts(S.ARCHS["tiny"], model.text_family,
                                                   text_config(model), mode)
    opt = build_optimizer(model, Settings(lr=1e-3, weight_decay=1e-4, betas=(0.9, 0.999)))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for n, p in model.named_parameters() if n in want}
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    img, txt, scale = model(images(), model.tokenize(CAPTIONS))
    clip_loss(img, txt, scale, gather=False).backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == want, sorted(got ^ want)[:5]
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == want
    model.zero_grad(set_to_none=True)
    with torch.no_grad():  # undo the step for the other tests of this module
        for n, p in model.named_parameters():
            p.copy_(before[n])


def test_temperature_trains_and_stays_a_scalar(model):
    E.set_trainable(model, "heads")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    start = model.log_temperature.item()
    assert start == pytest.approx(math.log(0.07))
    tokens = model.tokenize(CAPTIONS)
    for _ in range(3):
        img, txt, scale = model(images(), tokens)
        opt.zero_grad()
        clip_loss(img, txt, scale, gather=False).backward()
        opt.step()
    assert model.log_temperature.shape == () and model.log_temperature.item() != start
    with torch.no_grad():
        model.log_temperature.fill_(math.log(0.07))


def test_authors_parameter_counts():
    """EchoCare Swin + ViT-B/32 text tower, heads only: the authors' logged 5,114,881 trainable of
    188,502,521; BioClinicalBERT's sizes for the BERT family. Built on the meta device (no memory)."""
    assert E.expected_counts(S.SwinConfig(), "clip", ARCHS["ViT-B/32"], "heads") == (5_114_881, 188_502_521)
    bert_cfg = B.BertConfig(vocab_size=28996)
    with torch.device("meta"):
        swin = S.SwinTransformer(S.SwinConfig())
        for family, tower, cfg in (("clip", E.clip_text_tower(ARCHS["ViT-B/32"]), ARCHS["ViT-B/32"]),
                                   ("bert", B.BertModel(bert_cfg), bert_cfg)):
            model = E.EchoCareCLIP(swin, tower, None, {"image_encoder": {"path": None},
                                                       "text_encoder": {"family": family, "path": None}})
            for mode in E.TRAIN_MODES:
                E.set_trainable(model, mode)
                got = (sum(p.numel() for p in model.parameters() if p.requires_grad),
                       sum(p.numel() for p in model.parameters()))
                assert got == E.expected_counts(S.SwinConfig(), family, cfg, mode), (family, mode)


def test_clip_pooled_text_matches_hugging_face():
    """CLIP.encode_text_pooled = transformers CLIPModel's text pooler_output (same random weights)."""
    import transformers

    from clip_us.weights import hf_to_openai
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, hidden_act="quick_gelu", eos_token_id=2),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=16, hidden_act="quick_gelu"),
        projection_dim=32)
    hf = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sd = hf_to_openai({k: v for k, v in hf.state_dict().items()})
    ours = build_model(sd, config=E.CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=2,
                                               vision_width=64, vision_heads=2, transformer_width=64,
                                               transformer_heads=2, transformer_layers=2))
    tower = E.clip_text_tower(ours.config, {k: v for k, v in sd.items() if not k.startswith("visual.")
                                             and k not in ("text_projection", "logit_scale")})
    model = E.EchoCareCLIP(S.SwinTransformer(S.ARCHS["tiny"]), tower, None,
                           {"image_encoder": {"path": None}, "text_encoder": {"family": "clip", "path": None}})
    tokens = model.tokenize(CAPTIONS)
    with torch.no_grad():
        want = hf.text_model(input_ids=tokens[:, 0], attention_mask=tokens[:, 1]).pooler_output
        torch.testing.assert_close(ours.encode_text_pooled(tokens[:, 0]), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.text_features_from_tokens(tokens), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def source_files(tmp_path_factory):
    """Encoder files in their published formats, tiny: echocare_encoder.pth (with mask_token), a
    CLIP state dict, and a Hugging Face BERT folder."""
    import transformers
    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(1)
    swin = S.SwinTransformer(S.ARCHS["tiny"])
    torch.save(dict(swin.state_dict(), mask_token=torch.zeros(1, 1, 16)), root / "echocare_encoder.pth")
    torch.save(build_model(config="tiny").state_dict(), root / "clip-tiny.pt")
    bert = root / "bert"
    vocab = D.tiny_vocab(CAPTIONS)
    transformers.BertModel(transformers.BertConfig(vocab_size=len(vocab), **E.TINY_BERT)).save_pretrained(str(bert))
    (bert / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (bert / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    return root


def _from_files(root, family):
    text = str(root / "clip-tiny.pt") if family == "clip" else str(root / "bert")
    return E.build(family, image_weights=str(root / "echocare_encoder.pth"), text_weights=text,
                   image_size=SIZE)


@pytest.mark.parametrize("family,mode", [("clip", "heads"), ("bert", "text"), ("clip", "image")])
def test_checkpoint_round_trip_stores_only_what_trained(source_files, tmp_path, family, mode):
    model = _from_files(source_files, family)
    E.set_trainable(model, mode)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # as if trained: differ from the source files and the init
                p.add_(0.01 * torch.randn_like(p))
    E.save(model, tmp_path / "best.pt", config={"note": "test"})
    ck = torch.load(tmp_path / "best.pt", weights_only=True)
    assert ck["model"] == "echocare" and ck["train"] == mode and ck["config"] == {"note": "test"}
    assert ck["image_size"] == SIZE and ck["mean"] == list(D.AUTHORS_MEAN)
    stored = {k.split(".")[0] for k in ck["state_dict"]}
    assert stored == {"image_head", "text_head", "log_temperature"} | \
        ({"image_encoder"} if mode == "image" else set()) | ({"text_encoder"} if mode == "text" else set())
    for part in ("image_encoder", "text_encoder"):
        assert len(ck[part]["sha256"]) == 64 and ck[part]["path"].startswith(str(source_files))
    loaded = E.load(tmp_path / "best.pt")
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images()), model.encode_image(images()))
        assert torch.equal(loaded.encode_text(CAPTIONS), model.encode_text(CAPTIONS))
    assert loaded.train_mode == mode and not loaded.training


def test_changed_encoder_file_is_refused(source_files, tmp_path):
    model = _from_files(source_files, "clip")
    E.set_trainable(model, "heads")
    E.save(model, tmp_path / "best.pt")
    sd = torch.load(source_files / "clip-tiny.pt", weights_only=True)
    sd["ln_final.weight"] = sd["ln_final.weight"] + 1  # a different file with the same name
    changed = tmp_path / "clip-tiny.pt"
    torch.save(sd, changed)
    with pytest.raises(ValueError, match="SHA256") as e:
        E.load(tmp_path / "best.pt", text_weights=str(changed))
    assert str(changed) in str(e.value)
    with pytest.raises(FileNotFoundError, match="does not exist here"):
        E.load(tmp_path / "best.pt", image_weights=str(tmp_path / "moved.pth"))


def test_random_encoders_are_stored_and_reloaded(model, tmp_path):
    E.set_trainable(model, "heads")
    E.save(model, tmp_path / "best.pt")
    loaded = E.load(tmp_path / "best.pt")
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(CAPTIONS), model.encode_text(CAPTIONS))
        assert torch.equal(loaded.encode_image(images()), model.encode_image(images()))


def test_not_an_echocare_checkpoint(tmp_path):
    torch.save({"model_state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an EchoCare-CLIP checkpoint"):
        E.load(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="heads"):
        E.set_trainable(E.build("clip", "tiny", True), "adapter")


# ----------------------------------------------------------------------------- data
def _png(path, value, size=(80, 60)):
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(path)
    return path


def test_transforms_and_norm_stats(tmp_path):
    paths = [_png(tmp_path / f"{i}.png", i) for i in range(2)]
    train = D.image_transform(32, train=True)
    evalt = D.image_transform(32, train=False)
    im = D.read_rgb(paths[0])
    assert train(im).shape == evalt(im).shape == (3, 32, 32)
    mean, std = D.norm_stats(paths, 32)
    raw = torch.stack([D.image_transform(32, False, (0,) * 3, (1,) * 3)(D.read_rgb(p)) for p in paths])
    want_mean = raw.transpose(0, 1).reshape(3, -1).double().mean(1)
    want_std = raw.transpose(0, 1).reshape(3, -1).double().std(1, unbiased=False)
    assert np.allclose(mean, want_mean.numpy(), atol=1e-6) and np.allclose(std, want_std.numpy(), atol=1e-6)
    # 16-bit grayscale is scaled by its bit depth, not clipped
    a = (np.arange(60 * 80, dtype=np.uint16).reshape(60, 80) % 4096)
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert np.asarray(D.read_rgb(tmp_path / "g16.png")).max() == 255


def test_caption_dataset_is_the_one_class_with_the_authors_pipeline(tmp_path):
    pairs = [Pair(f"{i}.png", _png(tmp_path / f"{i}.png", i), CAPTIONS[i], i + 2) for i in range(2)]
    tokenize = lambda texts: torch.arange(len(texts))[:, None].expand(-1, 4)  # noqa: E731
    ds = D.caption_dataset(pairs, tokenize, 32, train=False)
    assert isinstance(ds, CaptionDataset) and len(ds) == 2
    item = ds[1]
    torch.testing.assert_close(item["image"], D.image_transform(32, False)(D.read_rgb(pairs[1].image)))
    assert item["text"].tolist() == [1] * 4 and (item["caption"], item["key"], item["index"]) == \
        (CAPTIONS[1], "1.png", 1)
    assert "text" not in CaptionDataset(pairs, ds.transform)[0]  # no tokenizer: images alone


def test_tiny_vocab_covers_captions():
    vocab = {t: i for i, t in enumerate(D.tiny_vocab(CAPTIONS, size=60))}
    tok = B.WordPieceTokenizer(vocab)
    ids, _ = tok(CAPTIONS, 64)
    assert not (ids == vocab["[UNK]"]).any()
    assert D.tiny_vocab(CAPTIONS) == D.tiny_vocab(list(CAPTIONS))  # deterministic
