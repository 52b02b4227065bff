"""Tests for clip_us/backbones.py: each backbone against its peer on the same random weights, saved
in the authors' own file layout (open_clip for MetaCLIP and UniMedCLIP, open_clip's timm trunk for
BiomedCLIP, Meta's key names for DINOv2, torchvision for ResNet18); what each name builds; adapters
in the other ViTs; missing and wrong-kind files. open_clip, timm and torchvision are test peers."""
from __future__ import annotations

import pytest
import torch

from clip_us.adapters import add_mona
from clip_us.baselines import backbones
from clip_us.lora import add_lora
from clip_us.model import QuickGELU, VisionTransformer

BLOCKS = (3, 6, 9)
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _perturb(model, scale=0.02):
    """Random weights with non-trivial norms, biases and gammas, as trained weights have."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


def _hook_blocks(blocks, batch_first=True):
    """Forward hooks that keep the outputs of blocks 3, 6 and 9 as [B, L, D]."""
    out = {}

    def keep(i):
        def fn(module, args, y):
            out[i] = y if batch_first else y.transpose(0, 1)
        return fn
    handles = [blocks[i].register_forward_hook(keep(i)) for i in BLOCKS]
    return out, handles


def _close(ours, peer):
    torch.testing.assert_close(ours, peer, rtol=1e-4, atol=1e-4 * peer.abs().max().item())


def _compare(tower, peer_fn, peer_blocks, x, batch_first=True):
    feats, handles = _hook_blocks(peer_blocks, batch_first)
    with torch.inference_mode():
        peer_pooled = peer_fn(x)
        pooled, blocks = tower(x, return_blocks=BLOCKS)
    for h in handles:
        h.remove()
    for i, block in zip(BLOCKS, blocks):
        _close(block, feats[i])
    _close(pooled, peer_pooled)


# ----------------------------------------------------------------------------- open_clip layouts
@pytest.fixture(scope="module")
def open_clip_files(tmp_path_factory):
    """open_clip's ViT-B-16-quickgelu recipe (12 blocks, patch 16, 224 px, QuickGELU) at width 128
    to keep the suite fast (tests/test_model.py checks the full ViT-B/16), saved as MetaCLIP
    does ({"state_dict": {"module.<key>"}}) and as UniMedCLIP's visual keys beside a stand-in
    text tower."""
    oc = pytest.importorskip("open_clip.model")
    vision = oc.CLIPVisionCfg(layers=12, width=128, head_width=64, patch_size=16, image_size=224)
    text = oc.CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1)
    peer = _perturb(oc.CLIP(64, vision, text, quick_gelu=True))
    folder = tmp_path_factory.mktemp("open_clip")
    sd = peer.state_dict()
    torch.save({"epoch": 32, "state_dict": {f"module.{k}": v for k, v in sd.items()}},
               folder / "b16_400m.pt")
    unimed = {k: v for k, v in sd.items() if k.startswith("visual.")}
    unimed["text.transformer.embeddings.word_embeddings.weight"] = torch.randn(10, 8)
    torch.save(unimed, folder / "unimed_clip_vit_b16.pt")
    return peer, folder


@pytest.mark.parametrize("name,file", [("metaclip", "b16_400m.pt"),
                                       ("unimedclip", "unimed_clip_vit_b16.pt")])
def test_open_clip_layouts_match_open_clip(open_clip_files, name, file):
    peer, folder = open_clip_files
    tower = backbones.build(name, weights=str(folder / file))
    assert isinstance(tower.transformer.resblocks[0].mlp.gelu, QuickGELU)  # forced, not GELU
    batch_first = getattr(peer.visual.transformer, "batch_first", True)
    _compare(tower, peer.encode_image, peer.visual.transformer.resblocks,
             torch.randn(1, 3, 224, 224), batch_first)


# ----------------------------------------------------------------------------- BiomedCLIP
@pytest.fixture(scope="module")
def biomedclip_folder(tmp_path_factory):
    """open_clip's TimmModel as BiomedCLIP's config builds it (timm_pool "", timm_proj "linear"),
    saved with a stand-in text tower in a Hugging Face-style folder under its published file name.
    The trunk is timm's vit_tiny_patch16_224: vit_base_patch16_224's recipe and key names (no
    ln_pre, eps 1e-6, GELU, patch bias) at width 192, to keep the suite fast."""
    timm_model = pytest.importorskip("open_clip.timm_model")
    pytest.importorskip("timm")
    peer = _perturb(timm_model.TimmModel("vit_tiny_patch16_224", embed_dim=512, image_size=224,
                                         pool="", proj="linear", proj_bias=False))
    folder = tmp_path_factory.mktemp("biomedclip")
    sd = {f"visual.{k}": v for k, v in peer.state_dict().items()}
    sd["text.transformer.embeddings.word_embeddings.weight"] = torch.randn(10, 8)
    sd["logit_scale"] = torch.tensor(4.6)
    torch.save(sd, folder / "open_clip_pytorch_model.bin")
    return peer, folder


def test_biomedclip_matches_open_clip_timm_trunk(biomedclip_folder):
    peer, folder = biomedclip_folder
    tower = backbones.build("biomedclip", weights=str(folder))  # the folder finds the file
    assert isinstance(tower.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    _compare(tower, peer, peer.trunk.blocks, torch.randn(1, 3, 224, 224))


# ----------------------------------------------------------------------------- DINOv2
@pytest.fixture(scope="module")
def dinov2_file(tmp_path_factory):
    """timm's vit_base_patch14_dinov2 (layer-scale, patch 14) at width 192 and 224 px (16 x 16
    patches instead of 37 x 37) to keep the suite fast, saved in Meta's key names (+ mask_token)."""
    timm = pytest.importorskip("timm")
    peer = _perturb(timm.create_model("vit_base_patch14_dinov2", pretrained=False,
                                      embed_dim=192, num_heads=3, img_size=224))
    sd = dict(peer.state_dict())
    assert "blocks.0.ls1.gamma" in sd
    sd["mask_token"] = torch.zeros(1, 192)
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vitb14_pretrain.pth"
    torch.save(sd, path)
    return peer, path


def test_dinov2_matches_timm_with_layer_scale(dinov2_file):
    peer, path = dinov2_file
    tower = backbones.build("dinov2", weights=str(path))
    assert tower.input_resolution == 224 and tower.patch_size == 14  # read from the tensors
    x = torch.randn(1, 3, 224, 224)
    _compare(tower, lambda im: peer.forward_features(im)[:, 0], peer.blocks, x)
    with torch.inference_mode():  # get_intermediate_layers(n=4, norm=True), CLS kept
        _, normed = tower(x, return_blocks=(8, 9, 10, 11), pool=False, norm=True)
        ref = peer.get_intermediate_layers(x, n=4, norm=True, return_prefix_tokens=True)
    for ours, (patches, prefix) in zip(normed, ref):
        _close(ours, torch.cat([prefix, patches], dim=1))


def test_dinov2_official_drops_layer_scale(dinov2_file, capsys):
    """NextGen-UIA's model: no layer-scale, every gamma ignored = the peer with gammas at 1."""
    peer, path = dinov2_file
    tower = backbones.build("dinov2", weights=str(path), official=True)
    assert "24 layer-scale gammas" in capsys.readouterr().out
    assert not any(".ls_" in k for k in tower.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        before = peer.forward_features(x)[:, 0]
        for block in peer.blocks:
            block.ls1.gamma.fill_(1.0)
            block.ls2.gamma.fill_(1.0)
        _close(tower(x), peer.forward_features(x)[:, 0])
    assert not torch.allclose(before, tower(x).detach(), atol=1e-3)


# ----------------------------------------------------------------------------- ResNet18
def test_resnet18_logits_equal_torchvision(tmp_path, capsys):
    from torchvision.models import resnet18
    ref = _perturb(resnet18(weights=None))
    torch.save(ref.state_dict(), tmp_path / "mine.pth")
    model = backbones.build("resnet18", weights=str(tmp_path / "mine.pth")).eval()
    assert "without a hash check" in capsys.readouterr().out
    assert type(model) is type(ref) and model.fc.out_features == 2
    ref.fc = model.fc
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


def test_resnet18_published_name_is_hash_checked(tmp_path):
    from torchvision.models import resnet18
    fake = tmp_path / "resnet18-f37072fd.pth"
    torch.save(resnet18(weights=None).state_dict(), fake)
    with pytest.raises(ValueError, match="SHA256 .* f37072fd47e89c5e"):
        backbones.build("resnet18", weights=str(fake))


# ----------------------------------------------------------------------------- the name builds it
def test_each_name_builds_its_architecture():
    towers = {n: backbones.build(n, None, arch="tiny") for n in backbones.BACKBONES}
    keys = {n: set(m.state_dict()) for n, m in towers.items()}
    for n in ("clip", "metaclip", "unimedclip"):  # OpenAI's layout, QuickGELU
        assert {"ln_pre.weight", "proj"} <= keys[n] and "conv1.bias" not in keys[n]
        assert isinstance(towers[n].transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert "conv1.bias" in keys["biomedclip"] and "ln_pre.weight" not in keys["biomedclip"]
    assert towers["biomedclip"].transformer.resblocks[0].ln_1.eps == 1e-6
    assert "transformer.resblocks.0.ls_1.gamma" in keys["dinov2"] and "proj" not in keys["dinov2"]
    assert towers["dinov2"].patch_size == 14 and towers["dinov2"].input_resolution == 518
    assert "fc.weight" in keys["resnet18"] and towers["resnet18"].fc.out_features == 2
    assert all(isinstance(towers[n], VisionTransformer) for n in keys if n != "resnet18")
    assert backbones.spec("dinov2").mean == backbones.IMAGENET_MEAN
    assert backbones.spec("biomedclip").cls_head == "linear"


def test_random_backbone_is_announced_and_fixed(capsys):
    a = backbones.build("biomedclip", None, arch="tiny")
    assert "RANDOM weights" in capsys.readouterr().out
    b = backbones.build("biomedclip", "none", arch="tiny")
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


# ----------------------------------------------------------------------------- adapters
def test_lora_and_mona_go_into_dinov2_and_biomedclip():
    x = torch.randn(2, 3, 56, 56)
    for name in ("dinov2", "biomedclip"):
        tower = backbones.build(name, None, arch="tiny")
        with torch.no_grad():  # gammas of 1e-5 would hide a dropped layer-scale
            for p in tower.parameters():
                p.add_(0.05 * torch.randn_like(p))
        with torch.inference_mode():
            plain = tower(x, return_blocks=BLOCKS)[1]
        add_mona(add_lora(tower))
        for m in tower.modules():  # Mona with a zero up-projection is the identity
            if hasattr(m, "project2"):
                torch.nn.init.zeros_(m.project2.weight)
                torch.nn.init.zeros_(m.project2.bias)
        with torch.inference_mode():
            adapted = tower(x, return_blocks=BLOCKS)[1]
        assert any("lora_A_q" in k for k in tower.state_dict())
        for a, b in zip(adapted, plain):  # LoRA B starts at zero: same outputs, layer-scale kept
            torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- bad input
def test_wrong_kind_lists_the_keys_that_do_not_fit(biomedclip_folder, open_clip_files):
    _, bio = biomedclip_folder
    with pytest.raises(ValueError, match=r"not a MetaCLIP checkpoint.*visual\.trunk\..*"
                                         r"look like biomedclip"):
        backbones.build("metaclip", weights=str(bio / "open_clip_pytorch_model.bin"))
    _, oc = open_clip_files
    with pytest.raises(ValueError, match=r"not a BiomedCLIP checkpoint.*unknown "
                                         r"visual\.conv1\.weight.*look like clip, metaclip"):
        backbones.build("biomedclip", weights=str(oc / "b16_400m.pt"))
    with pytest.raises(ValueError, match=r"not a DINOv2 checkpoint.*unknown visual\."):
        backbones.build("dinov2", weights=str(oc / "b16_400m.pt"))


def test_missing_file_says_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIP_US_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"dl\.fbaipublicfiles\.com/dinov2.*"
                                                r"dinov2_vitb14_pretrain\.pth"):
        backbones.build("dinov2")
    with pytest.raises(FileNotFoundError, match="BiomedCLIP-PubMedBERT"):
        backbones.build("biomedclip", weights=str(tmp_path / "nothing.bin"))
    with pytest.raises(ValueError, match="unknown backbone"):
        backbones.build("vit-h")
