"""python -m clip_us.export: the written files load in open_clip and transformers (the peers, built
here from their own config classes) and give our embeddings, image and text, to 1e-5; LoRA is
merged; real tiny checkpoints of train_contrastive.py and train_seg.py export; Mona, EchoCare-CLIP
and bad paths are refused with one line; the safetensors writer is byte-identical to the package's.
"""
from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch
from conftest import exit_status
from test_weights import openai_to_hf as independent_openai_to_hf

from clip_us import export as X
from clip_us import weights as W
from clip_us.adapters import AdapterConfig, apply_adapter, load_adapter
from clip_us.model import ARCHS, build_model
from clip_us.tokenizer import tokenize
from clip_us.weights import build_clip

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
open_clip = pytest.importorskip("open_clip")  # test-only peers (requirements-dev.txt)
transformers = pytest.importorskip("transformers")

TINY = ["--arch", "tiny", "--image-size", "32", "--phantom-size", "64", "--phantom-n", "20",
        "--workers", "0", "--batch-size", "8", "--epochs", "1"]
CONTRASTIVE = TINY + ["--weights", "none", "--split", "70,30", "--lr", "1e-2"]


# ----------------------------------------------------------------------------- peers and inputs
@pytest.fixture(scope="module")
def inputs():
    """Two random images and two captions as our tokenizer gives them (end-of-text last)."""
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    return images, tokenize(["A hypoechoic breast lesion with irregular margins.", "Liver."])


def jittered(quick_gelu: bool):
    """A tiny CLIP whose every tensor is random, so a swapped or untransposed one shows."""
    torch.manual_seed(0)
    model = build_model(config="tiny", quick_gelu=quick_gelu)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def open_clip_peer(path, quick_gelu: bool):
    """open_clip's CLIP of the tiny sizes, from its own config classes, holding the file."""
    vision = open_clip.model.CLIPVisionCfg(layers=12, width=64, head_width=32, patch_size=16,
                                           image_size=224)
    text = open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2,
                                       layers=12)
    peer = open_clip.model.CLIP(64, vision, text, quick_gelu=quick_gelu)
    peer.load_state_dict(torch.load(path, weights_only=True))  # strict
    return peer.eval()


def features(out):
    return getattr(out, "pooler_output", out)  # transformers 5 returns an output object


@torch.inference_mode()
def embeddings(model, inputs, library="clip_us"):
    images, text = inputs
    if library == "hf":
        return (features(model.get_image_features(pixel_values=images)),
                features(model.get_text_features(input_ids=text)))
    return model.encode_image(images), model.encode_text(text)


def assert_same(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def assert_loads_everywhere(out, quick_gelu: bool, reference, inputs):
    """OUT/clip.pt in open_clip and OUT/hf in transformers give `reference`'s embeddings."""
    want = embeddings(reference, inputs)
    assert_same(embeddings(open_clip_peer(out / "clip.pt", quick_gelu), inputs), want)
    hf = transformers.CLIPModel.from_pretrained(out / "hf").eval()
    assert hf.config.vision_config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    assert_same(embeddings(hf, inputs, "hf"), want)


# ----------------------------------------------------------------------------- safetensors, keys
MIXED = {"f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 3).bfloat16(),
         "i64": torch.arange(7), "u8": torch.arange(3, dtype=torch.uint8), "f64": torch.randn(2).double(),
         "i8": torch.tensor([1, -2], dtype=torch.int8), "i16": torch.tensor([3], dtype=torch.int16),
         "i32": torch.tensor([4, 5], dtype=torch.int32), "bool": torch.tensor([True, False]),
         "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5), "a.b": torch.ones(1)}


def test_safetensors_writer_reads_back(tmp_path):
    W.write_safetensors(tmp_path / "a.safetensors", MIXED, {"format": "pt"})
    got = W.read_safetensors(tmp_path / "a.safetensors")
    assert sorted(got) == sorted(MIXED)
    assert all(got[k].dtype == t.dtype and torch.equal(got[k], t) for k, t in MIXED.items())
    assert not list(tmp_path.glob(".tmp-*"))  # written through a temporary file
    with pytest.raises(ValueError, match="complex64"):
        W.write_safetensors(tmp_path / "c.safetensors", {"c": torch.zeros(2, dtype=torch.complex64)})


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_safetensors_writer_is_byte_identical_to_the_package(tmp_path, metadata):
    st = pytest.importorskip("safetensors.torch")  # comes with transformers
    W.write_safetensors(tmp_path / "ours", MIXED, metadata)
    st.save_file(MIXED, str(tmp_path / "theirs"), metadata=metadata)
    assert (tmp_path / "ours").read_bytes() == (tmp_path / "theirs").read_bytes()
    got = st.load_file(str(tmp_path / "ours"))
    assert all(torch.equal(got[k], t) for k, t in MIXED.items())


def test_openai_to_hf_inverts_hf_to_openai():
    sd = jittered(True).state_dict()
    hf = W.openai_to_hf(sd)
    oracle = independent_openai_to_hf(sd)  # test_weights.py's, written without weights.py
    assert sorted(hf) == sorted(oracle) and all(torch.equal(hf[k], oracle[k]) for k in oracle)
    back = W.hf_to_openai(hf)
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(ValueError, match="resblocks.0.attn.lora_A_q"):
        W.openai_to_hf({**sd, "visual.transformer.resblocks.0.attn.lora_A_q": torch.zeros(1)})


def test_hf_keys_from_views_write_as_the_package_does(tmp_path):
    """openai_to_hf's q/k/v are views of in_proj, its other tensors the state dict's own: the
    file is still byte-identical to the package's, which accepts views that do not overlap."""
    st = pytest.importorskip("safetensors.torch")
    model = jittered(True)
    hf = W.openai_to_hf(X.plain_state_dict(model))
    q = hf["text_model.encoder.layers.0.self_attn.q_proj.weight"]
    in_proj = model.state_dict()["transformer.resblocks.0.attn.in_proj_weight"]
    assert q.data_ptr() == in_proj.data_ptr()  # the first row block: no copy
    W.write_safetensors(tmp_path / "ours", hf, {"format": "pt"})
    st.save_file(hf, str(tmp_path / "theirs"), metadata={"format": "pt"})
    assert (tmp_path / "ours").read_bytes() == (tmp_path / "theirs").read_bytes()


def test_plain_state_dict_copies_views_only():
    base = torch.arange(12.0)
    transposed = base.view(3, 4).t()
    assert X.own_bytes(base) is base
    assert X.own_bytes(transposed) is transposed  # its storage is its own: saved as it is
    part = X.own_bytes(base[4:8])  # torch.save would write all 12 numbers
    assert part.untyped_storage().nbytes() == 16 and torch.equal(part, base[4:8])
    model = jittered(True)
    plain = X.plain_state_dict(model)
    assert all(plain[k].data_ptr() == v.data_ptr() for k, v in model.state_dict().items())


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_hf_config_round_trips_through_our_reader_and_transformers(quick_gelu):
    cfg = replace(ARCHS["ViT-L/14"], quick_gelu=quick_gelu)
    written = W.hf_config_for(cfg)
    assert W.hf_settings(written, "config.json") == {
        "quick_gelu": quick_gelu, "vision_heads": 16, "transformer_heads": 12}
    theirs = transformers.CLIPConfig.from_dict(written)
    assert (theirs.vision_config.hidden_size, theirs.vision_config.patch_size,
            theirs.text_config.hidden_size, theirs.projection_dim) == (1024, 14, 768, 768)


# ----------------------------------------------------------------------------- parity on random weights
@pytest.mark.parametrize("quick_gelu", [True, False])
def test_exported_random_model_loads_in_open_clip_and_transformers(tmp_path, inputs, quick_gelu):
    model = jittered(quick_gelu)
    X.save_plain(model, tmp_path / "clip.pt")
    X.save_hf(model, tmp_path / "hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    assert all(torch.is_tensor(v) for v in torch.load(tmp_path / "clip.pt", weights_only=True).values())
    assert_loads_everywhere(tmp_path, quick_gelu, model, inputs)
    ours, _ = W.load(str(tmp_path / "hf"))  # and back into clip_us: config.json decides
    assert ours.config == model.config
    assert_same(embeddings(ours, inputs), embeddings(model, inputs))


@pytest.mark.parametrize("arch", ["ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"])
@pytest.mark.parametrize("quick_gelu", [True, False])
def test_printed_open_clip_name_has_our_sizes_and_activation(arch, quick_gelu):
    cfg = replace(ARCHS[arch], quick_gelu=quick_gelu)
    line = X.open_clip_line(cfg, "out.pt")
    name = line.split("'")[1]
    assert name.endswith("-quickgelu") == quick_gelu
    oc = open_clip.get_model_config(name)
    v, t = oc["vision_cfg"], oc["text_cfg"]
    assert (oc["embed_dim"], v["image_size"], v["layers"], v["width"], v["patch_size"]) == (
        cfg.embed_dim, cfg.image_resolution, cfg.vision_layers, cfg.vision_width, cfg.vision_patch_size)
    assert (t["width"], t["heads"], t["layers"], bool(oc.get("quick_gelu"))) == (
        cfg.transformer_width, cfg.transformer_heads, cfg.transformer_layers, quick_gelu)


# ----------------------------------------------------------------------------- real checkpoints
@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The tiny runs' folder and what is made there (kept for the module; see `runs`)."""
    root = tmp_path_factory.mktemp("runs")
    gelu_file = root / "tiny-gelu.pt"  # a plain state dict: loaded with GELU (weights.py)
    torch.manual_seed(3)
    torch.save(build_model(config="tiny").state_dict(), gelu_file)
    return root, {"gelu_file": gelu_file}


def recipes(root):
    """name -> (script, arguments) of each tiny run."""
    return {
        "lora": ("train_contrastive.py", CONTRASTIVE + ["--adapter", "lora"]),
        "full": ("train_contrastive.py", TINY + ["--weights", root / "tiny-gelu.pt", "--split",
                                                 "70,30", "--train", "full", "--lr", "1e-3"]),
        "mona": ("train_contrastive.py", CONTRASTIVE),
        "echocare": ("train_contrastive.py", CONTRASTIVE + ["--model", "echocare"]),
        "seg": ("train_seg.py", TINY + ["--weights", "none", "--seeds", "1", "--reduce-dim", "32",
                                        "--adapter", "lora", "--adapter-train", "yes", "--lr",
                                        "1e-2", "--init", root / "lora" / "best.pt"]),
    }


@pytest.fixture
def runs(made, run_script):
    """get(name) -> the best.pt of that tiny run, run once per module when first asked for."""
    root, done = made

    def get(name):
        if name not in done:
            if name == "seg":
                get("lora")  # its --init
            script, args = recipes(root)[name]
            run_script(script, args + ["--out-dir", root / name], {"CLIP_US_CACHE": root / "cache"})
            done[name] = root / name / ("seed1/best.pt" if name == "seg" else "best.pt")
        return done[name]
    return get


def cli(*args) -> int:
    return exit_status(lambda: X.main([str(a) for a in args]))


def export_both(ckpt, out, *more):
    assert cli(ckpt, "--to", "open_clip", out / "clip.pt", *more) == 0
    assert cli(ckpt, "--to", "hf", out / "hf", *more) == 0


def unmerged(ckpt):
    """The fine-tuned CLIP as --init builds it, LoRA left as an adapter (eval: no dropout)."""
    return load_adapter(build_clip("none", "tiny"), ckpt).eval()


def test_lora_checkpoint_exports_merged(runs, tmp_path, inputs, capsys):
    ckpt = runs("lora")
    lora_b = [v for k, v in torch.load(ckpt, weights_only=True)["adapter_state_dict"].items()
              if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 1e-4 for v in lora_b)  # it trained: not a no-op
    export_both(ckpt, tmp_path)
    assert "LoRA merged" in capsys.readouterr().out
    assert_loads_everywhere(tmp_path, True, unmerged(ckpt), inputs)
    base = build_clip("none", "tiny").state_dict()
    exported = torch.load(tmp_path / "clip.pt", weights_only=True)
    key = "visual.transformer.resblocks.0.attn.in_proj_weight"
    assert not torch.allclose(exported[key], base[key])
    assert torch.equal(exported["transformer.resblocks.0.attn.in_proj_weight"],
                       base["transformer.resblocks.0.attn.in_proj_weight"])  # LoRA: vision only


def test_full_fine_tune_exports_with_gelu(runs, tmp_path, inputs, capsys):
    ckpt = runs("full")
    ours = build_clip(str(runs("gelu_file")), "tiny")  # GELU: a plain file's default
    ours.load_state_dict(torch.load(ckpt, weights_only=True)["model_state_dict"])
    export_both(ckpt, tmp_path)
    printed = capsys.readouterr().out
    assert "activation GELU" in printed and "hidden_act gelu" in printed
    assert_loads_everywhere(tmp_path, False, ours.eval(), inputs)
    base = build_clip(str(runs("gelu_file")), "tiny").state_dict()
    exported = torch.load(tmp_path / "clip.pt", weights_only=True)
    assert not torch.equal(exported["token_embedding.weight"], base["token_embedding.weight"])
    line = next(x for x in printed.splitlines() if "open_clip.model.CLIP(" in x)
    namespace = {"open_clip": open_clip, "torch": torch}
    exec(line.split("load it with: ")[1], namespace)  # noqa: S102 -- our printed line, as a user runs it
    assert_same(embeddings(namespace["model"].eval(), inputs), embeddings(ours, inputs))


def test_export_reads_the_checkpoint_tensors_once(runs, tmp_path, monkeypatch):
    """fine_tuned_clip maps the file (its record only), load_adapter reads it; a legacy
    (non-zip) file, which torch cannot map, is read twice and exports the same bytes."""
    ckpt, real, reads = runs("full"), torch.load, []

    def counted(f, *args, **kwargs):
        reads.append((str(f), kwargs.get("mmap", False)))
        return real(f, *args, **kwargs)
    monkeypatch.setattr(torch, "load", counted)
    assert cli(ckpt, "--to", "hf", tmp_path / "zip") == 0
    assert [m for f, m in reads if f == str(ckpt)] == [True, False]
    monkeypatch.setattr(torch, "load", real)
    torch.save(torch.load(ckpt, weights_only=True), tmp_path / "legacy.pt",
               _use_new_zipfile_serialization=False)
    assert cli(tmp_path / "legacy.pt", "--to", "hf", tmp_path / "legacy") == 0
    assert ((tmp_path / "zip" / "model.safetensors").read_bytes()
            == (tmp_path / "legacy" / "model.safetensors").read_bytes())


def test_openai_target_is_the_plain_state_dict_with_a_caveat(runs, tmp_path, capsys):
    assert cli(runs("lora"), "--to", "openai", tmp_path / "openai.pt") == 0
    assert "not with OpenAI's clip.load" in capsys.readouterr().out  # tiny: 2 heads at width 64
    assert cli(runs("lora"), "--to", "open_clip", tmp_path / "open_clip.pt") == 0
    a, b = (torch.load(tmp_path / n, weights_only=True) for n in ("openai.pt", "open_clip.pt"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_seg_lora_checkpoint_exports_its_vision_tower(runs, tmp_path, inputs):
    ckpt = runs("seg")
    export_both(ckpt, tmp_path)
    assert_loads_everywhere(tmp_path, True, unmerged(ckpt), inputs)
    ours = embeddings(unmerged(ckpt), inputs)
    assert not torch.allclose(ours[0], embeddings(unmerged(runs("lora")), inputs)[0])
    # gone --init: named, since it may have held the backbone
    shutil.move(runs("lora"), tmp_path / "moved.pt")
    try:
        assert cli(ckpt, "--to", "hf", tmp_path / "again") == 2
    finally:
        shutil.move(tmp_path / "moved.pt", runs("lora"))


def official_lora_file(path):
    """An official NextGen-UIA LoRA dict (`<attn>.q_proj.w_lora_A`, ...) with random tensors for
    the tiny CLIP; the LoRA keys are ours renamed (adapters.LORA_KEY)."""
    model = apply_adapter(build_model(config="tiny"), AdapterConfig(kind="lora", r=4, alpha=8))
    official = {}
    for key, value in model.state_dict().items():
        attn, _, part = key.rpartition(".attn.")
        if part.startswith("out_proj.lora_"):  # out_proj.lora_B -> proj.w_lora_B
            official[f"{attn}.attn.proj.w_lora_{part[-1]}"] = 0.1 * torch.randn_like(value)
        elif part.startswith("lora_"):  # lora_A_q -> q_proj.w_lora_A
            _, ab, target = part.split("_")
            official[f"{attn}.attn.{target}_proj.w_lora_{ab}"] = 0.1 * torch.randn_like(value)
    torch.save({"adapter_type": "lora", "lora_state_dict": official, "lora_r": 4, "lora_alpha": 8},
               path)


def test_official_lora_file_exports_on_the_weights_given(runs, tmp_path, inputs, capsys):
    official_lora_file(tmp_path / "lora.pt")
    assert cli(tmp_path / "lora.pt", "--to", "hf", tmp_path / "hf") == 2  # it records no base
    assert "pass --weights" in capsys.readouterr().err
    export_both(tmp_path / "lora.pt", tmp_path, "--weights", runs("gelu_file"))
    ours = load_adapter(build_clip(str(runs("gelu_file")), "tiny"), tmp_path / "lora.pt").eval()
    assert_loads_everywhere(tmp_path, False, ours, inputs)


def assert_refused(capsys, status, *message):
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err and err.startswith("error: "), err
    assert all(m in err for m in message), err


@pytest.mark.parametrize("run,message", [
    ("mona", "Mona adds a module after each vision block"),
    ("echocare", "EchoCare-CLIP dual-encoder checkpoint"),
])
def test_mona_and_echocare_are_refused(runs, tmp_path, capsys, run, message):
    ckpt = runs(run)
    capsys.readouterr()  # the training run's own output
    assert_refused(capsys, cli(ckpt, "--to", "hf", tmp_path / "out"), message)
    assert not (tmp_path / "out").exists()


def test_bad_paths_and_missing_base_weights_are_one_line(runs, tmp_path, capsys):
    ck = torch.load(runs("lora"), weights_only=True)
    capsys.readouterr()
    assert_refused(capsys, cli(tmp_path / "nothing.pt", "--to", "hf", tmp_path / "o"), "does not exist")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert_refused(capsys, cli(tmp_path / "notes.txt", "--to", "hf", tmp_path / "o"), "text file")
    ck["config"]["weights"] = str(tmp_path / "gone.pt")  # as if the base weights were moved
    torch.save(ck, tmp_path / "moved.pt")
    assert_refused(capsys, cli(tmp_path / "moved.pt", "--to", "hf", tmp_path / "o"),
                   "gone.pt", "--weights PATH")
    assert cli(tmp_path / "moved.pt", "--to", "hf", tmp_path / "o", "--weights", "none") == 0
    assert_refused(capsys, cli(tmp_path / "moved.pt", "--to", "openai", tmp_path / "moved.pt"),
                   "is the checkpoint itself")
    assert_refused(capsys, cli(runs("lora"), "--to", "openai", tmp_path / "o"), "is a folder")
