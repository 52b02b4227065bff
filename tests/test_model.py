"""Tests for clip_us/model.py: parity with open_clip's ViT-B-16-quickgelu on the same random
weights, the tiny architecture's shapes, dense block outputs (return_blocks / pool=False), non-square
inputs, and the bicubic positional-embedding resize against an independent numpy reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clip_us.model import ARCHS, VisionTransformer, build_model, config_from_state_dict, init_transformer

EOT = 49407


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def random_text(n, length=77, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.zeros(n, length, dtype=torch.long)
    for i in range(n):
        k = 3 + 7 * i
        text[i, :k] = torch.randint(1, 49000, (k,), generator=g)
        text[i, k] = EOT
    return text


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model(config="tiny")
    with torch.no_grad():  # LayerNorms and biases start at 1/0: randomise so swaps show
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


# ----------------------------------------------------------------------------- open_clip parity
def test_vit_b16_matches_open_clip_quickgelu():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    peer = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).eval()
    with torch.no_grad():
        for p in peer.parameters():
            p.add_(0.02 * torch.randn_like(p))
    sd = peer.state_dict()
    assert config_from_state_dict(sd) == ARCHS["ViT-B/16"]
    ours = build_model(sd)  # strict=True: open_clip's ViT keys are OpenAI's
    images, text = torch.randn(2, 3, 224, 224), random_text(2)
    with torch.inference_mode():
        pairs = [(ours.encode_image(images), peer.encode_image(images)),
                 (ours.encode_text(text), peer.encode_text(text))]
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


# ----------------------------------------------------------------------------- tiny architecture
def test_tiny_shapes_and_config(tiny):
    cfg = tiny.config
    assert (cfg.vision_layers, cfg.vision_width, cfg.vision_heads) == (12, 64, 2)
    assert config_from_state_dict(tiny.state_dict(), vision_heads=2, transformer_heads=2) == cfg
    images, text = torch.randn(3, 3, 224, 224), random_text(3)
    with torch.inference_mode():
        assert tiny.encode_image(images).shape == (3, 64)
        assert tiny.encode_text(text).shape == (3, 64)
        logits, logits_t = tiny(images, text[:2])
    assert logits.shape == (3, 2) and torch.equal(logits, logits_t.t())


def test_text_pools_at_end_of_text_and_is_causal(tiny):
    text = random_text(1)
    eot = int(text.argmax())
    changed = text.clone()
    changed[0, eot + 5] = 123  # after EOT: invisible to the causal pooled token
    with torch.inference_mode():
        assert torch.equal(tiny.encode_text(text), tiny.encode_text(changed))
        changed[0, 0] = 124  # before EOT: visible
        assert not torch.allclose(tiny.encode_text(text), tiny.encode_text(changed))


# ----------------------------------------------------------------------------- dense features
class _Counter:
    def __init__(self, blocks):
        self.calls = [0] * len(blocks)
        self.handles = [b.register_forward_hook(self.hook(i)) for i, b in enumerate(blocks)]

    def hook(self, i):
        def fn(module, args, out):
            self.calls[i] += 1
        return fn

    def remove(self):
        for h in self.handles:
            h.remove()


def test_return_blocks_semantics(tiny):
    x = torch.randn(2, 3, 224, 224)
    blocks = tiny.visual.transformer.resblocks
    with torch.inference_mode():
        plain = tiny.visual(x)
        pooled, feats = tiny.visual(x, return_blocks=(3, 6, 9))
        counter = _Counter(blocks)
        none, early = tiny.visual(x, return_blocks=(3, 6, 9), pool=False)
        counter.remove()
        # reference: run the blocks by hand
        h, _ = tiny.visual.embed(x)
        manual = []
        for i, block in enumerate(blocks):
            h = block(h)
            manual.append(h)
    torch.testing.assert_close(pooled, plain)
    assert none is None and counter.calls == [1] * 10 + [0] * 2  # stopped after block 9
    assert [f.shape for f in feats] == [(2, 197, 64)] * 3
    for i, f_full, f_early in zip((3, 6, 9), feats, early):
        torch.testing.assert_close(f_full, manual[i])
        torch.testing.assert_close(f_early, f_full)
    with pytest.raises(ValueError, match="out of range"):
        tiny.visual(x, return_blocks=(12,))


def test_non_square_input(tiny):
    x = torch.randn(1, 3, 224, 320)  # 14 x 20 patches
    with torch.inference_mode():
        pooled, (feat,) = tiny.visual(x, return_blocks=(11,))
        emb = tiny.encode_image(x)
    assert feat.shape == (1, 1 + 14 * 20, 64) and pooled.shape == (1, 64)
    torch.testing.assert_close(emb, pooled)
    assert torch.isfinite(emb).all()


# ----------------------------------------------------------------------------- other ViT layouts
def _vit(**options):
    torch.manual_seed(1)
    vit = VisionTransformer(64, 16, 64, 12, 2, options.pop("output_dim", 32), **options)
    init_transformer(vit.transformer)
    with torch.no_grad():  # non-trivial norms, biases and gammas
        for p in vit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vit.eval()


def test_vit_options_change_keys_and_pooling():
    """timm/DINOv2 layout: no ln_pre, patch bias, layer-scale, no projection (pooled = width)."""
    vit = _vit(pre_norm=False, ln_eps=1e-6, patch_bias=True, layer_scale=True, output_dim=0)
    keys = set(vit.state_dict())
    assert {"conv1.bias", "transformer.resblocks.0.ls_1.gamma",
            "transformer.resblocks.11.ls_2.gamma"} <= keys
    assert not any(k.startswith(("ln_pre", "proj")) for k in keys)
    assert vit.transformer.resblocks[0].ln_1.eps == 1e-6
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        pooled, (last,) = vit(x, return_blocks=(11,))
        torch.testing.assert_close(pooled, vit.ln_post(last[:, 0]))
    assert pooled.shape == (2, 64) and vit.output_dim == 64
    clip_keys = set(_vit().state_dict())  # the defaults keep CLIP's keys exactly
    assert {"ln_pre.weight", "proj"} <= clip_keys and not any(".ls_" in k for k in clip_keys)


def test_layer_scale_scales_each_branch():
    plain, scaled = _vit(), _vit(layer_scale=True)
    scaled.load_state_dict(plain.state_dict(), strict=False)  # same weights; gammas stay
    block = scaled.transformer.resblocks[0]
    x = torch.randn(1, 17, 64)
    with torch.inference_mode():
        ln = block.attn_residual(x) - x
        torch.testing.assert_close(ln, block.ls_1.gamma * block.attn(block.ln_1(x)))
        for b in scaled.transformer.resblocks:  # gamma = 1 gives the plain model back
            b.ls_1.gamma.fill_(1.0)
            b.ls_2.gamma.fill_(1.0)
        x = torch.randn(1, 3, 64, 64)
        torch.testing.assert_close(scaled(x), plain(x))


def test_norm_true_returns_final_normed_blocks():
    vit = _vit(output_dim=0)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        _, raw = vit(x, return_blocks=(8, 11), pool=False)
        _, normed = vit(x, return_blocks=(8, 11), pool=False, norm=True)
        for r, n in zip(raw, normed):
            torch.testing.assert_close(n, vit.ln_post(r))
    assert not torch.allclose(raw[0], normed[0])


def test_proj_bias_is_added_after_the_projection():
    vit = _vit(proj_bias=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        _, (last,) = vit(x, return_blocks=(11,))
        torch.testing.assert_close(vit(x), vit.ln_post(last[:, 0]) @ vit.proj + vit.proj_bias)


# ----------------------------------------------------------------------------- positional embedding
def _cubic_weights(t, a=-0.75):
    """Keys' cubic convolution weights for taps at offsets -1, 0, 1, 2 (PyTorch's A = -0.75)."""
    def near(x):
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.array([far(t + 1), near(t), near(1 - t), far(2 - t)])


def _resize_1d(arr, out, axis):
    """Bicubic along one axis, half-pixel centres (align_corners=False), edge taps clamped."""
    n = arr.shape[axis]
    result = []
    for j in range(out):
        src = (j + 0.5) * n / out - 0.5
        base = int(np.floor(src))
        w = _cubic_weights(src - base)
        taps = [np.take(arr, min(max(base + o, 0), n - 1), axis=axis) for o in (-1, 0, 1, 2)]
        result.append(sum(wi * ti for wi, ti in zip(w, taps)))
    return np.stack(result, axis=axis)


@pytest.mark.parametrize("grid", [(20, 20), (14, 20), (10, 7)])
def test_positional_embedding_interpolation(tiny, grid):
    pos = tiny.visual.positional_embedding.detach().double().numpy()  # [1 + 14*14, D]
    patch = pos[1:].reshape(14, 14, -1)  # [rows, cols, D]
    ref = _resize_1d(_resize_1d(patch, grid[0], 0), grid[1], 1).reshape(grid[0] * grid[1], -1)
    got = tiny.visual.pos_embed(grid).detach()
    assert got.shape == (1 + grid[0] * grid[1], 64)
    np.testing.assert_allclose(got[0].numpy(), pos[0], rtol=0, atol=1e-6)  # CLS untouched
    np.testing.assert_allclose(got[1:].numpy(), ref, rtol=0, atol=1e-5)
    assert tiny.visual.pos_embed((14, 14)) is tiny.visual.positional_embedding


def test_positional_embedding_matches_open_clip_resize(tiny):
    """open_clip's resize_pos_embed, with antialias off. (Its default antialias=True switches
    PyTorch to the PIL-style kernel, A = -0.5, which differs by a few percent even when
    upsampling; ours is plain F.interpolate bicubic, A = -0.75, checked above.)"""
    open_clip_model = pytest.importorskip("open_clip.model")

    class Target:  # what resize_pos_embed reads: model.visual.grid_size
        class visual:
            grid_size = (20, 20)
    sd = {"visual.positional_embedding": tiny.visual.positional_embedding.detach().clone()}
    open_clip_model.resize_pos_embed(sd, Target, antialias=False)
    torch.testing.assert_close(tiny.visual.pos_embed((20, 20)).detach(),
                               sd["visual.positional_embedding"])


# ----------------------------------------------------------------------------- folded QuickGELU
def test_folded_quick_gelu_equals_plain_and_leaves_weights_alone(tiny):
    from clip_us.model import folded_quick_gelu
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    params = [id(p) for p in tiny.parameters()]
    images, text = torch.randn(2, 3, 64, 64), random_text(2)
    with torch.inference_mode():
        plain = tiny.encode_image(images), tiny.encode_text(text)
        with folded_quick_gelu(tiny):
            assert isinstance(tiny.visual.transformer.resblocks[0].mlp.gelu, torch.nn.SiLU)
            folded = tiny.encode_image(images), tiny.encode_text(text)
    for a, b in zip(folded, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    after = tiny.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert [id(p) for p in tiny.parameters()] == params  # the same Parameter objects: optimisers
    assert not any(isinstance(m, torch.nn.SiLU) for m in tiny.modules())


def test_folded_quick_gelu_bf16_cosine(tiny):
    import copy

    from clip_us.model import folded_quick_gelu
    model = copy.deepcopy(tiny).to(torch.bfloat16)
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ref = tiny.encode_image(images)
        with folded_quick_gelu(model):
            folded = model.encode_image(images.to(torch.bfloat16)).float()
    assert torch.nn.functional.cosine_similarity(folded, ref).min() >= 0.999


def test_folded_quick_gelu_refuses_training_and_skips_lora(tiny):
    import copy

    from clip_us.lora import add_lora
    from clip_us.model import folded_quick_gelu
    with pytest.raises(RuntimeError, match="inference"):
        with folded_quick_gelu(tiny):
            pass
    model = add_lora(copy.deepcopy(tiny), targets=("mlp",)).eval()  # on c_fc/c_proj: not foldable
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
        x = torch.randn(1, 3, 64, 64)
        ref = model.encode_image(x)
        with folded_quick_gelu(model):
            torch.testing.assert_close(model.encode_image(x), ref)


def test_build_model_from_a_state_dict_owns_its_weights():
    """build_model builds on the meta device and adopts copies of the state dict's tensors: the
    same values, trainable, and training one model never changes the dict another is built from
    (the scripts build one model per seed from one cached state dict)."""
    from clip_us.model import CLIP
    torch.manual_seed(0)
    sd = CLIP(ARCHS["tiny"]).state_dict()
    model = build_model(sd, config="tiny")
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad and p.device.type == "cpu" for p in model.parameters())
    with torch.no_grad():
        model.visual.conv1.weight.add_(1.0)
    assert not torch.equal(model.visual.conv1.weight, sd["visual.conv1.weight"])
    assert torch.equal(build_model(sd, config="tiny").visual.conv1.weight, sd["visual.conv1.weight"])
