"""Tests for clip_us/weights.py and clip_us/transform.py: every checkpoint format loads into the
same model, bad files fail with errors naming the file and the keys, downloads are hash-checked,
and preprocessing matches open_clip's. No network: URLs are file:// or urlopen is patched."""
from __future__ import annotations

import builtins
import hashlib
import json
import os
import pickle
import struct
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from clip_us import weights as W
from clip_us.model import build_model
from clip_us.transform import Preprocess

EOT = 49407


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny():
    """A tiny CLIP whose every parameter (LayerNorms and biases too) is random, so any swapped or
    untransposed tensor in a conversion changes the outputs."""
    torch.manual_seed(0)
    model = build_model(config="tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 224, 224, generator=g)
    text = torch.zeros(2, 77, dtype=torch.long)
    for i, n in enumerate((5, 12)):
        text[i, :n] = torch.randint(1, 49000, (n,), generator=g)
        text[i, n] = EOT
    return images, text


@torch.inference_mode()
def outputs(model, inputs):
    images, text = inputs
    return model.encode_image(images), model.encode_text(text)


_REFERENCE = {}


def assert_same_model(loaded, reference, inputs):
    """Same embeddings as `reference` (whose outputs are computed once per module)."""
    if id(reference) not in _REFERENCE:
        _REFERENCE[id(reference)] = outputs(reference, inputs)
    for a, b in zip(outputs(loaded, inputs), _REFERENCE[id(reference)]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- test-side formats
def openai_to_hf(sd: dict) -> dict:
    """Inverse of HF's convert_clip_original_pytorch_to_hf.py, written independently of weights.py."""
    out = {"logit_scale": sd["logit_scale"],
           "visual_projection.weight": sd["visual.proj"].t().contiguous(),
           "text_projection.weight": sd["text_projection"].t().contiguous(),
           "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
           "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
           "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
           "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": sd["positional_embedding"]}
    for ours, hf in (("visual.ln_pre", "vision_model.pre_layrnorm"),
                     ("visual.ln_post", "vision_model.post_layernorm"),
                     ("ln_final", "text_model.final_layer_norm")):
        for leaf in ("weight", "bias"):
            out[f"{hf}.{leaf}"] = sd[f"{ours}.{leaf}"]
    for ours, hf in (("visual.transformer.resblocks", "vision_model.encoder.layers"),
                     ("transformer.resblocks", "text_model.encoder.layers")):
        n = 0
        while f"{ours}.{n}.ln_1.weight" in sd:
            o, h = f"{ours}.{n}", f"{hf}.{n}"
            q, k, v = sd[f"{o}.attn.in_proj_weight"].chunk(3)
            qb, kb, vb = sd[f"{o}.attn.in_proj_bias"].chunk(3)
            for name, w, b in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
                out[f"{h}.self_attn.{name}.weight"] = w.contiguous()
                out[f"{h}.self_attn.{name}.bias"] = b.contiguous()
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                         ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                for leaf in ("weight", "bias"):
                    out[f"{h}.{b}.{leaf}"] = sd[f"{o}.{a}.{leaf}"]
            n += 1
    return out


ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
            torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.float64: "F64"}


def write_safetensors(path, tensors: dict, metadata=None):
    """A minimal safetensors writer: u64-LE header length, JSON header (space-padded to 8), data."""
    header, chunks, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for name, t in tensors.items():
        raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    js = json.dumps(header).encode()
    js += b" " * (-len(js) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(js)) + js + b"".join(chunks))


def hf_config_json(folder, act="quick_gelu", heads=2):
    cfg = {"architectures": ["CLIPModel"], "projection_dim": 64,
           "text_config": {"hidden_act": act, "num_attention_heads": heads, "hidden_size": 64},
           "vision_config": {"hidden_act": act, "num_attention_heads": heads, "hidden_size": 64}}
    (folder / "config.json").write_text(json.dumps(cfg))


class _Holder(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.logit_scale.exp()


def jit_archive(model, path):
    """An OpenAI-style TorchScript archive: a scripted module holding the tiny model's tensors
    under OpenAI's dotted names, plus the three extra entries OpenAI's archives carry."""
    root = _Holder()
    extras = {"input_resolution": 224, "context_length": 77, "vocab_size": 49408}
    entries = dict(model.state_dict(), **{k: torch.tensor(v) for k, v in extras.items()})
    for key, value in entries.items():
        *parents, leaf = key.split(".")
        mod = root
        for name in parents:
            if not hasattr(mod, name):
                mod.add_module(name, torch.nn.Module())
            mod = getattr(mod, name)
        if key in extras:
            mod.register_buffer(leaf, value)
        else:
            mod.register_parameter(leaf, torch.nn.Parameter(value.clone()))
    torch.jit.save(torch.jit.script(root), str(path))


# ----------------------------------------------------------------------------- formats
def test_torchscript_archive_loads_and_matches(tiny, inputs, tmp_path, capsys):
    path = tmp_path / "ViT-tiny.pt"
    jit_archive(tiny, path)
    model, preprocess = W.load(str(path))
    assert_same_model(model, tiny, inputs)
    sd, info = W.load_state_dict(str(path))
    assert info["format"] == "torchscript" and "input_resolution" not in sd
    assert model.config.quick_gelu and model.config.vision_heads == 2
    assert "activation QuickGELU" in capsys.readouterr().out
    assert preprocess.size == 224


def test_plain_state_dict_and_open_clip_checkpoint(tiny, inputs, tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save(tiny.state_dict(), plain)
    ckpt = tmp_path / "epoch_3.pt"  # open_clip's training checkpoint layout, saved from DDP
    torch.save({"epoch": 3, "name": "run", "state_dict":
                {"module." + k: v for k, v in tiny.state_dict().items()}}, ckpt)
    for path in (plain, ckpt):
        model, _ = W.load(str(path), quick_gelu=True)
        assert_same_model(model, tiny, inputs)
    sd, info = W.load_state_dict(str(ckpt), quick_gelu=True)
    assert sorted(sd) == sorted(tiny.state_dict()) and info["keys"] == "openai"


def test_default_activation_for_other_checkpoints_is_gelu_and_printed(tiny, tmp_path, capsys):
    path = tmp_path / "plain.pt"
    torch.save(tiny.state_dict(), path)
    _, info = W.load_state_dict(str(path))
    assert info["config"].quick_gelu is False
    assert "activation GELU" in capsys.readouterr().out


@pytest.mark.parametrize("layout", ["safetensors-folder", "safetensors-file", "bin-folder"])
def test_hugging_face_round_trip(tiny, inputs, tmp_path, layout):
    hf = openai_to_hf(tiny.state_dict())
    hf["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # older HF checkpoints
    if layout.startswith("safetensors"):
        write_safetensors(tmp_path / "model.safetensors", hf, {"format": "pt"})
    else:
        torch.save(hf, tmp_path / "pytorch_model.bin")
    hf_config_json(tmp_path, act="quick_gelu", heads=2)
    target = tmp_path / "model.safetensors" if layout == "safetensors-file" else tmp_path
    model, _ = W.load(str(target))
    assert model.config.quick_gelu and model.config.vision_heads == 2
    assert_same_model(model, tiny, inputs)


def test_hf_config_decides_activation_and_heads(tiny, tmp_path):
    write_safetensors(tmp_path / "model.safetensors", openai_to_hf(tiny.state_dict()))
    hf_config_json(tmp_path, act="gelu", heads=4)
    with pytest.warns(UserWarning, match="config.json decides"):
        _, info = W.load_state_dict(str(tmp_path), quick_gelu=True)
    assert info["config"].quick_gelu is False and info["config"].vision_heads == 4
    hf_config_json(tmp_path, act="gelu_new")
    with pytest.raises(ValueError, match="gelu_new"):
        W.load_state_dict(str(tmp_path))


def test_hf_conversion_is_exact_and_rejects_unknown_keys(tiny):
    sd = tiny.state_dict()
    back = W.hf_to_openai(openai_to_hf(sd))
    assert sorted(back) == sorted(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    hf = openai_to_hf(sd)
    hf["vision_model.encoder.layers.0.self_attn.extra.weight"] = torch.zeros(1)
    del hf["text_model.encoder.layers.2.self_attn.k_proj.bias"]
    with pytest.raises(ValueError) as e:
        W.hf_to_openai(hf)
    assert "self_attn.extra.weight" in str(e.value) and "layers.2.self_attn.k_proj.bias" in str(e.value)


def test_safetensors_reader_dtypes_and_peer(tmp_path):
    tensors = {"f32": torch.randn(3, 4), "f16": torch.randn(5).half(),
               "bf16": torch.randn(2, 3).bfloat16(), "i64": torch.arange(7),
               "u8": torch.arange(3, dtype=torch.uint8), "f64": torch.randn(2).double(),
               "empty": torch.zeros(0, 4)}
    write_safetensors(tmp_path / "a.safetensors", tensors, {"k": "v"})
    paths = [tmp_path / "a.safetensors"]
    try:  # the peer library is not a dependency; check against it when it is installed
        from safetensors.torch import save_file
        save_file(tensors, str(tmp_path / "b.safetensors"))
        paths.append(tmp_path / "b.safetensors")
    except ImportError:
        pass
    for path in paths:
        got = W.read_safetensors(str(path))
        assert sorted(got) == sorted(tensors)
        for k, t in tensors.items():
            assert got[k].dtype == t.dtype and torch.equal(got[k], t), k


# ----------------------------------------------------------------------------- bad inputs
def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("kind", ["zip", "legacy", "safetensors", "torchscript", "empty"])
def test_truncated_file_is_named(tiny, inputs, tmp_path, kind):
    path = tmp_path / f"ckpt-{kind}.pt"
    path.touch()
    sd = tiny.state_dict()
    if kind == "zip":
        torch.save(sd, path)
    elif kind == "legacy":
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    elif kind == "safetensors":
        write_safetensors(path, openai_to_hf(sd))
    elif kind == "torchscript":
        jit_archive(tiny, path)
    _truncate(path, 0.0 if kind == "empty" else 0.6)
    with pytest.raises(ValueError, match="truncated|empty") as e:
        W.load(str(path))
    assert str(path) in str(e.value)


def test_non_clip_state_dict_lists_keys(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(2, 8)}, path)
    with pytest.raises(ValueError) as e:
        W.load(str(path))
    msg = str(e.value)
    assert str(path) in msg and "visual.conv1.weight" in msg and "conv1.weight" in msg
    torch.save({"epoch": 1, "optimizer": {}}, path)
    with pytest.raises(ValueError, match="not a CLIP checkpoint"):
        W.load(str(path))


def test_wrong_shapes_and_extra_keys_are_listed(tiny, tmp_path):
    sd = dict(tiny.state_dict())
    sd["visual.transformer.resblocks.4.mlp.c_fc.weight"] = torch.zeros(10, 64)
    sd["visual.extra_head.weight"] = torch.zeros(3)
    del sd["transformer.resblocks.7.ln_2.bias"]
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(ValueError) as e:
        W.load(str(path))
    msg = str(e.value)
    for key in ("resblocks.4.mlp.c_fc.weight: shape (10, 64), expected (256, 64)",
                "unexpected visual.extra_head.weight", "missing transformer.resblocks.7.ln_2.bias"):
        assert key in msg


class _Evil:
    """Unpickling this would create a file (builtins.open(..., "w")): the exploit stand-in."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, how):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    payload = {"state_dict": {"visual.conv1.weight": _Evil(marker)}}
    if how == "pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path)
    assert not marker.exists()
    with pytest.raises(ValueError, match="refused") as e:
        W.load(str(path))
    assert str(path) in str(e.value) and "weights_only" in str(e.value)
    assert not marker.exists()


def test_unknown_names_and_missing_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="ViT-B/16"):
        W.load("ViT-B/99")
    with pytest.raises(FileNotFoundError, match="ResNet"):
        W.load("RN50")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        W.load(str(tmp_path))


# ----------------------------------------------------------------------------- names, cache, download
def test_model_table_matches_open_clip():
    from open_clip.pretrained import get_pretrained_url
    assert W.available_models() == ["ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"]
    for name in W.available_models():
        oc = name.replace("/", "-").replace("@336px", "-336")
        assert W._MODELS[name] == get_pretrained_url(oc, "openai")
        assert len(W.model_sha256(name)) == 64


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("CLIP_US_CACHE", raising=False)
    assert W.cache_dir() == os.path.expanduser("~/.cache/clip_us")
    monkeypatch.setenv("CLIP_US_CACHE", str(tmp_path / "env"))
    assert W.cache_dir() == str(tmp_path / "env")
    assert W.cache_dir(str(tmp_path / "arg")) == str(tmp_path / "arg")


@pytest.fixture
def source(tmp_path):
    """A 'remote' file served by a file:// URL, with its SHA256."""
    src = tmp_path / "remote" / "ViT-T-16.pt"
    src.parent.mkdir()
    src.write_bytes(os.urandom(3 << 20))  # > 1 chunk
    return src.as_uri(), hashlib.sha256(src.read_bytes()).hexdigest(), src.read_bytes()


def _no_leftovers(root):
    """No temporary file (fileio.atomic_path names them ".tmp-*") left in the cache folder."""
    return not os.path.isdir(root) or [p for p in os.listdir(root) if p.startswith(".")] == []


def test_download_checks_hash_and_caches(tmp_path, source):
    url, sha, data = source
    root = tmp_path / "cache"
    path = W.download(url, sha, str(root))
    assert path == str(root / "ViT-T-16.pt") and open(path, "rb").read() == data
    assert _no_leftovers(root)


def test_download_with_wrong_hash_leaves_nothing(tmp_path, source):
    url, sha, _ = source
    root = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="SHA256") as e:
        W.download(url, "0" * 64, str(root))
    assert sha in str(e.value) and not (root / "ViT-T-16.pt").exists() and _no_leftovers(root)


def test_cached_file_with_wrong_hash_is_reported_and_redownloaded(tmp_path, source):
    url, sha, data = source
    root = tmp_path / "cache"
    root.mkdir()
    (root / "ViT-T-16.pt").write_bytes(data[:1000])  # an interrupted copy
    with pytest.warns(UserWarning, match="ViT-T-16.pt"):
        path = W.download(url, sha, str(root))
    assert open(path, "rb").read() == data and _no_leftovers(root)


def _offline(*args, **kwargs):
    raise urllib.error.URLError("no network in tests")


def test_good_cache_needs_no_network(tmp_path, source, monkeypatch):
    url, sha, data = source
    root = tmp_path / "cache"
    W.download(url, sha, str(root))
    monkeypatch.setattr(urllib.request, "urlopen", _offline)
    assert open(W.download(url, sha, str(root)), "rb").read() == data


def test_offline_error_names_url_and_destination(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", _offline)
    root = tmp_path / "cache"
    with pytest.raises(RuntimeError) as e:
        W.load("ViT-B/16", download_root=str(root))
    msg = str(e.value)
    assert W._MODELS["ViT-B/16"] in msg and str(root / "ViT-B-16.pt") in msg
    assert W.model_sha256("ViT-B/16") in msg and _no_leftovers(root)


def test_named_model_loads_from_cache_with_quickgelu(tiny, inputs, tmp_path, monkeypatch, capsys):
    """A name resolves to the cached file when its hash matches the table (patched for the test)."""
    root = tmp_path / "cache"
    root.mkdir()
    jit_archive(tiny, root / "ViT-T-16.pt")
    sha = W.file_sha256(str(root / "ViT-T-16.pt"))
    monkeypatch.setitem(W._MODELS, "ViT-T/16", f"https://example.invalid/{sha}/ViT-T-16.pt")
    monkeypatch.setattr(urllib.request, "urlopen", _offline)
    model, _ = W.load("ViT-T/16", download_root=str(root))
    assert_same_model(model, tiny, inputs)
    assert "ViT-T/16: activation QuickGELU" in capsys.readouterr().out


# ----------------------------------------------------------------------------- preprocess
@pytest.fixture(scope="module")
def rgb_image():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)  # smooth-ish: upsampled noise
    return Image.fromarray(base).resize((300, 260), Image.BILINEAR)


def test_preprocess_matches_open_clip_on_rgb(rgb_image):
    from open_clip.transform import image_transform
    peer = image_transform(224, is_train=False)
    ours = Preprocess(224)(rgb_image)
    assert ours.shape == (3, 224, 224) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, peer(rgb_image), rtol=0, atol=1e-5)
    tall = rgb_image.transpose(Image.Transpose.ROTATE_90)
    torch.testing.assert_close(Preprocess(224)(tall), peer(tall), rtol=0, atol=1e-5)


def test_preprocess_modes(rgb_image):
    pre = Preprocess(224)
    gray = rgb_image.convert("L")
    g = pre(gray)
    assert torch.allclose(g, pre(gray.convert("RGB")))
    # grayscale is repeated: un-normalised channels are equal
    raw = g * pre.std + pre.mean
    assert torch.allclose(raw[0], raw[1], atol=1e-6) and torch.allclose(raw[1], raw[2], atol=1e-6)
    rgba = rgb_image.copy()
    rgba.putalpha(Image.fromarray(np.full((260, 300), 7, np.uint8)))
    assert torch.equal(pre(rgba), pre(rgb_image))  # alpha dropped, as OpenAI's convert("RGB")
    pal = rgb_image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    assert torch.equal(pre(pal), pre(pal.convert("RGB")))


@pytest.mark.parametrize("bits", [16, 12])
def test_preprocess_high_bit_depth(rgb_image, bits):
    pre = Preprocess(224)
    gray8 = np.asarray(rgb_image.convert("L"), dtype=np.float64)
    gray8[0, 0] = 255  # the peak sets the bit depth
    scaled = np.round(gray8 * (2 ** bits - 1) / 255).astype(np.uint16)
    im16 = Image.fromarray(scaled)
    assert im16.mode.startswith("I;16")
    ref = pre(Image.fromarray(gray8.astype(np.uint8)))
    torch.testing.assert_close(pre(im16), ref, rtol=0, atol=3 / 255 / 0.26)
    assert pre(im16).abs().max() < 3  # not saturated: 16-bit values were scaled, not clipped


def test_preprocess_path_and_bad_path(rgb_image, tmp_path):
    pre = Preprocess(224)
    rgb_image.save(tmp_path / "x.png")
    assert torch.equal(pre(str(tmp_path / "x.png")), pre(rgb_image))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="bad.png"):
        pre(str(tmp_path / "bad.png"))
