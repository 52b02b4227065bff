"""Tests for clip_us/swin.py: the same random weights give our Swin and MONAI's
SwinTransformer(spatial_dims=2, use_v2=True) the same five feature maps and gradients, at a small
configuration and once at EchoCare's; the EchoCare checkpoint loads strictly without its
mask_token; wrong files fail with errors that name them."""
from __future__ import annotations

import json

import pytest
import torch

from clip_us.echocare import swin as S

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
SMALL = S.ARCHS["tiny"]


def monai_swin(cfg: S.SwinConfig, perturb: float = 0.05):
    """MONAI's encoder as the EchoCare authors build it, every parameter made random (LayerNorms
    and biases too), so a swapped or mis-ordered tensor changes the outputs."""
    from monai.networks.nets.swin_unetr import SwinTransformer
    model = SwinTransformer(in_chans=cfg.in_chans, embed_dim=cfg.embed_dim,
                            window_size=(cfg.window_size,) * 2, patch_size=(cfg.patch_size,) * 2,
                            depths=list(cfg.depths), num_heads=list(cfg.num_heads),
                            mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, spatial_dims=2,
                            use_v2=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(perturb * torch.randn_like(p))
    return model.eval()


def assert_maps_close(ours, peer, rtol=1e-4):
    assert len(ours) == len(peer) == 5
    for a, b in zip(ours, peer):
        assert a.shape == b.shape
        rel = ((a - b).abs().max() / b.abs().max()).item()
        assert rel < rtol, rel


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    peer = monai_swin(SMALL)
    ours = S.SwinTransformer(SMALL).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    return ours, peer


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 3, 70, 50), (1, 3, 24, 40)])
def test_five_maps_match_monai(pair, shape):
    """64 px: shifted windows and masks at every stage; 70x50: odd sizes pad the patch embedding,
    the windows and the merging; 24x40: windows shrink to the map (and lose their shift)."""
    ours, peer = pair
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got, want = ours(x), peer(x)
        assert_maps_close(got, want)
        assert_maps_close(ours(x, normalize=False), peer(x, normalize=False))
    # normalize=True: each map is layer-normed over channels, without parameters
    assert got[-1].mean(1).abs().max() < 1e-4 and (got[-1].var(1, unbiased=False) - 1).abs().max() < 1e-2


def test_gradients_match_monai_with_and_without_checkpointing(pair):
    ours, peer = pair
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    weights = [torch.randn_like(t) for t in peer(x)]  # a random linear loss: no cancellation
    peer.zero_grad()
    sum((t * w).sum() for t, w in zip(peer(x), weights)).backward()
    want = {k: p.grad.clone() for k, p in peer.named_parameters()}
    for flag in (False, True):
        ours.zero_grad()
        ours.set_gradient_checkpointing(flag)
        assert all(layer.gradient_checkpointing == flag for _, layer in ours.stages())
        sum((t * w).sum() for t, w in zip(ours(x), weights)).backward()
        for k, p in ours.named_parameters():
            torch.testing.assert_close(p.grad, want[k], rtol=1e-4, atol=1e-5 * want[k].abs().max())
    ours.set_gradient_checkpointing(False)


def test_echocare_configuration_matches_monai_at_256px():
    """EchoCare's real sizes: 120,221,688 parameters, last map [1, 2048, 8, 8] at 256 px."""
    torch.manual_seed(3)
    peer = monai_swin(S.SwinConfig(), perturb=0.01)
    with torch.device("meta"):  # no random initialisation of 120M parameters: MONAI's are used
        ours = S.SwinTransformer(S.SwinConfig()).eval()
    ours.load_state_dict(peer.state_dict(), strict=True, assign=True)
    assert sum(p.numel() for p in ours.parameters()) == 120_221_688
    assert sum(p.numel() for p in peer.parameters()) == 120_221_688 and ours.num_features == 2048
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        got, want = ours(x), peer(x)
    assert [tuple(t.shape[1:]) for t in got] == [(128, 128, 128), (256, 64, 64), (512, 32, 32),
                                                  (1024, 16, 16), (2048, 8, 8)]
    assert_maps_close(got, want)


def test_state_dict_keys_are_monais(pair):
    ours, peer = pair
    assert list(ours.state_dict()) == list(peer.state_dict())


# ----------------------------------------------------------------------------- loading
@pytest.fixture
def echocare_file(pair, tmp_path):
    """A checkpoint in EchoCare's format: MONAI's flat state dict plus the stray mask_token."""
    _, peer = pair
    sd = dict(peer.state_dict(), mask_token=torch.zeros(1, 1, SMALL.embed_dim))
    path = tmp_path / S.ECHOCARE_FILE
    torch.save(sd, path)
    return path, sd


def test_load_drops_mask_token_and_matches(pair, echocare_file):
    ours, peer = pair
    path, _ = echocare_file
    for where in (str(path), str(path.parent)):  # the file, or a folder that holds it
        model = S.load_echocare_encoder(where)  # sizes read from the tensors
        assert model.config == SMALL and S.config_from_state_dict(peer.state_dict()) == SMALL
        assert "mask_token" not in model.state_dict() and not model.training
        x = torch.randn(1, 3, 32, 32)
        with torch.inference_mode():
            assert_maps_close(model(x), peer(x))


def test_load_from_cache(echocare_file, monkeypatch, tmp_path):
    path, _ = echocare_file
    monkeypatch.setenv("CLIP_US_CACHE", str(path.parent))
    assert S.find_echocare_encoder() == str(path)
    S.load_echocare_encoder(config=SMALL)


def test_bad_keys_are_listed(echocare_file, tmp_path):
    _, sd = echocare_file
    sd = dict(sd)
    sd["layers2.0.blocks.1.extra.weight"] = torch.zeros(3)
    del sd["layers3c.0.layer.conv2.conv.weight"]
    sd["patch_embed.proj.bias"] = torch.zeros(5)
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(ValueError) as e:
        S.load_echocare_encoder(str(bad), config=SMALL)
    msg = str(e.value)
    for part in (str(bad), "unexpected layers2.0.blocks.1.extra.weight",
                 "missing layers3c.0.layer.conv2.conv.weight",
                 "patch_embed.proj.bias: shape (5,), expected (16,)"):
        assert part in msg
    assert "mask_token" not in msg


def test_wrong_family_and_missing_file(tmp_path, monkeypatch):
    bert = tmp_path / "Bio_ClinicalBERT"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (bert / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(FileNotFoundError, match="BERT folder") as e:
        S.load_echocare_encoder(str(bert))
    assert str(bert) in str(e.value) and "CAIR-HKISI/EchoCare" in str(e.value)
    weights = bert / "pytorch_model.bin"
    torch.save({"bert.embeddings.word_embeddings.weight": torch.zeros(4, 2)}, weights)
    with pytest.raises(ValueError, match="holds BERT weights") as e:
        S.load_echocare_encoder(str(weights))
    assert str(weights) in str(e.value)
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="not a MONAI SwinTransformer state dict"):
        S.load_echocare_encoder(str(tmp_path / "resnet.pth"))
    monkeypatch.setenv("CLIP_US_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(FileNotFoundError) as e:
        S.load_echocare_encoder()
    msg = str(e.value)
    assert "CAIR-HKISI/EchoCare" in msg and str(tmp_path / "empty-cache" / S.ECHOCARE_FILE) in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        S.load_echocare_encoder(str(tmp_path / "nowhere.pth"))
