"""Tests for clip_us/clipseg.py: parity with transformers' CLIPSegForImageSegmentation (random
rd64-refined-style weights saved with save_pretrained), loading choices and bad input."""
import json
from dataclasses import replace

import pytest
import torch
from transformers import CLIPConfig as HFCLIPConfig
from transformers import CLIPModel, CLIPSegConfig, CLIPSegForImageSegmentation

import clip_us
from clip_us.baselines import clipseg
from clip_us.baselines.clipseg import CLIPSeg, load_clipseg, two_class_logits

PROMPT = ("Benign: Oval shape, smooth margins, parallel orientation. Malignant: Irregular shape, "
          "spiculated margins, non-parallel orientation.")


def _hf_config(refined=True):
    """rd64-refined's decoder settings on a small CLIP (10 blocks so 3/6/9 exist, width 64,
    MLP ratio 4 as in CLIP)."""
    return CLIPSegConfig(
        text_config={"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 2},
        vision_config={"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 10,
                       "num_attention_heads": 2, "patch_size": 16, "image_size": 64},
        projection_dim=32, extract_layers=[3, 6, 9], reduce_dim=16, decoder_num_attention_heads=4,
        decoder_intermediate_size=48, conditional_layer=0,
        use_complex_transposed_convolution=refined)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = CLIPSegForImageSegmentation(_hf_config()).eval()
    with torch.no_grad():  # transformers leaves some tensors at 0 or 1: randomise everything
        for p in model.parameters():
            p.normal_(0, 0.2)
    folder = tmp_path_factory.mktemp("clipseg")
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def ours(hf_folder):
    return load_clipseg(str(hf_folder[0]))


def _inputs(batch=2, size=64):
    torch.manual_seed(1)
    return torch.randn(batch, 3, size, size), clip_us.tokenize([PROMPT] * batch)


def test_logits_match_transformers(hf_folder, ours):
    folder, hf = hf_folder
    assert (folder / "model.safetensors").exists()
    images, ids = _inputs()
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=images).logits
        got = ours(images, ids)
    assert got.shape == want.shape == (2, 64, 64)  # refined up-sampling: x16, the input's size
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    one = ours(images, ids[:1])                         # one prompt for the whole batch
    torch.testing.assert_close(one, got, atol=1e-5, rtol=1e-5)


def test_interpolated_position_embedding_matches_transformers(hf_folder, ours):
    hf = hf_folder[1]
    images, ids = _inputs(1, 96)                          # not the config's 64 px: bicubic resize
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=images).logits
        got = ours(images, ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_decoder_keys_are_the_authors_and_only_the_decoder_trains(hf_folder):
    model = load_clipseg(str(hf_folder[0]))  # its own copy: this test trains it
    keys = {"film_mul.weight", "film_add.bias", "reduces.2.weight", "blocks.0.self_attn.in_proj_weight",
            "blocks.1.linear1.weight", "blocks.2.norm2.bias", "trans_conv.0.weight", "trans_conv.4.bias"}
    assert keys <= set(model.decoder.state_dict())
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"decoder"}
    images, ids = _inputs()
    model.train()
    model(images, ids).square().mean().backward()
    assert all(p.grad is not None for p in model.decoder.parameters())


def test_clip_weights_from_elsewhere_and_pytorch_bin(hf_folder, ours, tmp_path):
    folder, hf = hf_folder
    clip_folder = tmp_path / "clip"                  # the same towers as a Hugging Face CLIPModel
    cfg = _hf_config()
    clip_hf = CLIPModel(HFCLIPConfig(text_config=cfg.text_config.to_dict(),
                                     vision_config=cfg.vision_config.to_dict(), projection_dim=32))
    clip_hf.load_state_dict(hf.clip.state_dict())
    clip_hf.save_pretrained(clip_folder)
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    (bin_folder / "config.json").write_text((folder / "config.json").read_text())
    torch.save(hf.state_dict(), bin_folder / "pytorch_model.bin")
    images, ids = _inputs()
    with torch.no_grad():
        ref = ours(images, ids)
        torch.testing.assert_close(load_clipseg(str(bin_folder))(images, ids), ref)
        other = load_clipseg(str(folder), clip_weights=str(clip_folder))
        torch.testing.assert_close(other(images, ids), ref)
        onto = clipseg.load_decoder(str(folder), ours.clip)   # the decoder onto a CLIP we have
        torch.testing.assert_close(onto(images, ids), ref)


def test_plain_transposed_conv_variant(tmp_path):
    torch.manual_seed(0)
    hf = CLIPSegForImageSegmentation(_hf_config(refined=False)).eval()
    hf.save_pretrained(tmp_path)
    ours = load_clipseg(str(tmp_path))
    assert isinstance(ours.decoder.trans_conv, torch.nn.ConvTranspose2d)
    images, ids = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(images, ids), hf(input_ids=ids, pixel_values=images).logits,
                                   atol=1e-4, rtol=1e-4)


def test_random_decoder_on_our_clip_non_square_and_two_class_logits():
    clip = clip_us.build_model(config="tiny")
    model = CLIPSeg(clip)  # sizes read from the CLIP; the decoder starts random
    assert model.config.vision_width == 64 and model.config.cond_dim == 64
    images = torch.randn(2, 3, 64, 96)
    z = model(images, clip_us.tokenize([PROMPT]))
    assert z.shape == (2, 64, 96)
    two = two_class_logits(z, (64, 96))
    assert two.shape == (2, 2, 64, 96) and torch.equal(two[:, 0], -two[:, 1])
    torch.testing.assert_close(two.softmax(1)[:, 1], torch.sigmoid(2 * z))
    assert two_class_logits(z, (32, 48)).shape == (2, 2, 32, 48)
    with pytest.raises(ValueError, match="3 prompts for 2 images"):
        model(images, clip_us.tokenize([PROMPT] * 3))


def test_not_a_clipseg_folder_is_a_clear_error(tmp_path, hf_folder):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_clipseg(str(tmp_path))
    clip_folder = tmp_path / "clip"
    CLIPModel(HFCLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64,
                                        "num_hidden_layers": 1, "num_attention_heads": 2},
                           vision_config={"hidden_size": 32, "intermediate_size": 64,
                                          "num_hidden_layers": 1, "num_attention_heads": 2,
                                          "image_size": 32, "patch_size": 16},
                           projection_dim=16)).save_pretrained(clip_folder)
    with pytest.raises(ValueError, match="not 'clipseg'"):
        load_clipseg(str(clip_folder))
    cfg = json.loads((clip_folder / "config.json").read_text())
    (clip_folder / "config.json").write_text(json.dumps({**cfg, "model_type": "clipseg"}))
    with pytest.raises(ValueError, match="not a CLIPSegForImageSegmentation checkpoint"):
        load_clipseg(str(clip_folder))
    decoder_cfg = clipseg.config_from_hf(json.loads((hf_folder[0] / "config.json").read_text()))
    with pytest.raises(ValueError, match="expects a CLIP with vision width"):
        CLIPSeg(clip_us.build_model(config="tiny"), decoder_cfg)   # width 64 but embedding 64, not 32


def test_task_model_two_class_logits_and_what_trains():
    clip = clip_us.build_model(config="tiny")
    core = CLIPSeg(clip)
    model = clipseg.CLIPSegTaskModel(core, clip_us.tokenize([PROMPT]))
    images = torch.randn(2, 3, 64, 64)
    out = model(images)
    assert out.shape == (2, 2, 64, 64) and torch.equal(out[:, 0], -out[:, 1])
    torch.testing.assert_close(out[:, 1], core(images, clip_us.tokenize([PROMPT])))
    trainable = {k.split(".")[0] for k, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head"} and "prompt_ids" not in model.state_dict()


# The official CLIPSeg row's texts, NextGen-UIA src/models/clipseg/prompt.py (commit 2e5fd63),
# picked by get_prompt in src/models/clipseg/segmentation.py.
OFFICIAL_LN = ("Benign lymph node: Oval shape, preserved echogenic hilum, thin homogeneous cortex. "
               "Malignant lymph node: Round, lost hilum, thickened/heterogeneous cortex, "
               "microcalcifications, irregular margins.")
OFFICIAL_BUSI = ("Benign breast lesion: Oval shape, smooth margins, parallel orientation, "
                 "homogeneous hypoechoic echotexture, posterior enhancement. Malignant breast "
                 "lesion: Irregular shape, spiculated margins, non-parallel orientation, "
                 "heterogeneous hypoechoic echotexture, microcalcifications, posterior shadowing.")
OFFICIAL_THYROID = ("Benign thyroid nodule: oval, wider-than-tall, homogeneous, smooth margins, "
                    "intact capsule. Malignant thyroid nodule: taller-than-wide, hypoechoic, "
                    "irregular margins, microcalcifications, capsular/extra-thyroidal invasion.")
OFFICIAL_PROSTATE = ("Benign prostate: smooth, symmetric TZ enlargement with heterogeneous "
                     "nodules and intact capsule; Malignant prostate: focal peripheral-zone "
                     "hypoechoic lesion with irregular margins, capsular breach and increased "
                     "Doppler flow.")


def test_default_prompts_are_the_official_rows():
    official = {"ln1": OFFICIAL_LN, "ln2": OFFICIAL_LN, "busi": OFFICIAL_BUSI,
                "ddti": OFFICIAL_THYROID, "tn3k": OFFICIAL_THYROID, "prostate": OFFICIAL_PROSTATE}
    for ds, text in official.items():
        assert clipseg.prompt_for(ds) == text
        assert clipseg.prompt_for(ds, prompts="ours") != text
        clip_us.tokenize([text])  # the official code's clip.tokenize raises beyond 77 tokens too
    # the phantom is ours in both sets: the official code has none
    assert clipseg.prompt_for("phantom") == clipseg.prompt_for("phantom", prompts="ours")


def test_our_prompts_fit_77_tokens():
    from clip_us.evaluation.prompts import PAPER_PROMPTS
    for ds in ("ln1", "ln2", "busi", "ddti", "tn3k", "prostate", "phantom"):
        text = clipseg.prompt_for(ds, prompts="ours")
        assert text.startswith("Benign:") and "Malignant:" in text and "{label}" not in text
        clip_us.tokenize([text])  # raises beyond 77 tokens
    assert PAPER_PROMPTS["busi"].startswith(clipseg.prompt_for("busi", prompts="ours"))
    assert PAPER_PROMPTS["ln"].startswith(clipseg.prompt_for("ln2", prompts="ours"))
    assert clipseg.prompt_for("folder", override="my words") == "my words"
    with pytest.raises(ValueError, match="--prompt"):
        clipseg.prompt_for("folder")
    with pytest.raises(ValueError, match="not both"):
        clipseg.prompt_for("busi", override="my words", prompts="ours")


def test_clipseg_prompts_flag_reaches_the_model_spec():
    from clip_us.adapters import AdapterConfig
    from clip_us.config import SupervisedConfig
    from clip_us.taskmodel import model_spec
    cfg = SupervisedConfig(backbone="clipseg", dataset="busi", arch="tiny", weights="none",
                           adapter="none")
    assert cfg.clipseg_prompts == "official"
    adapter = AdapterConfig(kind="none")
    assert model_spec(cfg, adapter).prompt == OFFICIAL_BUSI
    ours = model_spec(replace(cfg, clipseg_prompts="ours"), adapter).prompt
    assert ours == clipseg.OUR_PROMPTS["busi"]
    ln = replace(cfg, dataset="nextgen", nextgen_name="LN-INT")   # the official code's name
    assert model_spec(ln, adapter).prompt == OFFICIAL_LN
    with pytest.raises(ValueError, match="--nextgen-name"):
        model_spec(replace(cfg, dataset="nextgen"), adapter)
    with pytest.raises(ValueError, match="--clipseg-prompts ours do"):
        model_spec(replace(cfg, backbone="unet", clipseg_prompts="ours"), adapter)
