"""Mona (clip_us/mona.py): CLS bypass, identity with a zeroed up-projection, grid layout on
non-square grids, placements, vision-only, freezing, checkpoints and ViT-B/16 parameter counts."""
import pytest
import torch

from clip_us.adapters import (
    AdapterConfig,
    MonaBlock,
    adapter_state_dict,
    add_mona,
    apply_adapter,
    count_parameters,
    load_adapter_state_dict,
)
from clip_us.model import build_model
from clip_us.mona import Mona


def tiny(seed=0):
    torch.manual_seed(seed)
    return build_model(config="tiny")


def mona(width=16, bottleneck=8, seed=0):
    torch.manual_seed(seed)
    m = Mona(width, bottleneck, dropout=0.1).eval()
    with torch.no_grad():
        m.gamma.fill_(0.5)  # make the LayerNorm branch count too
    return m


def tokens(grid, width=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 1 + grid[0] * grid[1], width, generator=g)


@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_cls_skips_the_convolutions(grid):
    m, x = mona(), tokens(grid)
    y = m(x, grid)
    x2 = x.clone()
    x2[:, 1:] += torch.randn_like(x2[:, 1:])  # perturb patches only
    y2 = m(x2, grid)
    torch.testing.assert_close(y2[:, 0], y[:, 0], rtol=0, atol=0)
    assert not torch.allclose(y2[:, 1:], y[:, 1:])
    x3 = x.clone()
    x3[:, 0] += 1.0  # and the CLS token does not leak into the patches
    torch.testing.assert_close(m(x3, grid)[:, 1:], y[:, 1:], rtol=0, atol=0)


def test_zeroed_up_projection_is_identity():
    m, x = mona(), tokens((3, 5))
    with torch.no_grad():
        m.project2.weight.zero_()
        m.project2.bias.zero_()
    assert torch.equal(m(x, (3, 5)), x)


def test_fresh_mona_is_not_identity():
    # The up-projection is not zero-initialised (official code), so a fresh Mona changes the output.
    x = tokens((3, 5))
    assert not torch.allclose(mona()(x, (3, 5)), x)


def test_patches_are_reshaped_row_major_on_a_non_square_grid():
    # Keep only the 3x3 depthwise conv: a change at patch (r, c) must reach exactly its 3x3
    # neighbourhood on the h x w grid. A transposed or mis-sized reshape reaches other tokens.
    h, w, c0 = 4, 6, (2, 0)
    m, x = mona(), tokens((h, w))
    with torch.no_grad():
        for conv in (m.adapter_conv.conv2, m.adapter_conv.conv3, m.adapter_conv.projector):
            conv.weight.zero_()
            conv.bias.zero_()
        m.adapter_conv.conv1.weight.fill_(1.0)
    x2 = x.clone()
    x2[:, 1 + c0[0] * w + c0[1]] += 1.0
    changed = (m(x2, (h, w)) - m(x, (h, w)))[0, 1:].abs().amax(-1) > 1e-6  # [h*w]
    want = torch.zeros(h, w, dtype=torch.bool)
    want[max(c0[0] - 1, 0):c0[0] + 2, max(c0[1] - 1, 0):c0[1] + 2] = True
    assert torch.equal(changed.reshape(h, w), want)


def test_token_count_must_match_grid():
    with pytest.raises(ValueError, match="grid 4x4"):
        mona()(tokens((3, 5)), (4, 4))


@pytest.mark.parametrize("size, placement", [((224, 224), "after_block"),
                                              ((320, 224), "after_block"),
                                              ((160, 288), "attn_and_mlp")])
def test_block_output_shapes_square_and_non_square(size, placement):
    model = add_mona(tiny(), placement=placement)  # a whole CLIP: Mona goes on model.visual
    x = torch.randn(2, 3, *size)
    pooled, feats = model.visual(x, return_blocks=(3, 6, 9))
    h, w = size[0] // 16, size[1] // 16  # positional embeddings are resized for 320x224 etc.
    assert pooled.shape == (2, model.visual.output_dim)
    assert [f.shape for f in feats] == [(2, 1 + h * w, model.visual.width)] * 3


def test_block_outputs_are_taken_after_mona():
    model = add_mona(tiny()).eval()
    x = torch.randn(1, 3, 224, 224)
    _, feats = model.visual(x, return_blocks=(0,), pool=False)
    block = model.visual.transformer.resblocks[0]
    tokens0, grid = model.visual.embed(x)
    plain = tokens0 + block.attn(block.ln_1(tokens0))
    plain = plain + block.mlp(block.ln_2(plain))
    torch.testing.assert_close(feats[0], block.mona2(plain, grid))


def test_attn_and_mlp_placement_puts_one_after_each_residual():
    model = add_mona(tiny(), placement="attn_and_mlp").eval()
    block, x = model.visual.transformer.resblocks[2], tokens((2, 3), width=64)
    h = block.mona1(x + block.attn(block.ln_1(x)), (2, 3))
    want = block.mona2(h + block.mlp(block.ln_2(h)), (2, 3))
    torch.testing.assert_close(block(x, grid=(2, 3)), want)


def test_mona_keeps_openai_keys():
    model = tiny()
    base_keys = set(model.state_dict())
    add_mona(model.visual)
    new = set(model.state_dict()) - base_keys
    assert base_keys <= set(model.state_dict()) and new and all("mona" in k for k in new)
    assert "visual.transformer.resblocks.0.mona2.adapter_conv.conv1.weight" in new


def test_text_tower_is_refused():
    model = tiny()
    with pytest.raises(TypeError, match="vision tower only"):
        add_mona(model.transformer)
    with pytest.raises(ValueError, match="placement"):
        add_mona(model, placement="everywhere")
    block = MonaBlock(model.transformer.resblocks[0])
    with pytest.raises(ValueError, match="vision tower only"):
        block(torch.randn(1, 5, 64), causal=True)


def test_only_mona_gets_gradients():
    model = apply_adapter(tiny(), AdapterConfig(kind="mona")).train()
    model.visual(torch.randn(2, 3, 96, 160)).square().sum().backward()
    for name, p in model.named_parameters():
        if "mona" in name:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_checkpoint_round_trip_and_mismatch():
    cfg = AdapterConfig(kind="mona", bottleneck=16)
    src = apply_adapter(tiny(), cfg)
    with torch.no_grad():
        for name, p in src.named_parameters():
            if "mona" in name:
                p.add_(0.01 * torch.randn_like(p))  # move away from the (seeded) initialisation
    sd = adapter_state_dict(src)
    dst = apply_adapter(tiny(seed=0), AdapterConfig(kind="mona", bottleneck=16))
    load_adapter_state_dict(dst, sd, vars(cfg))
    x = torch.randn(1, 3, 112, 112)
    src.eval(), dst.eval()
    assert torch.equal(dst.visual(x), src.visual(x))
    with pytest.raises(ValueError, match="Mona bottleneck=16 but the model has bottleneck=64"):
        load_adapter_state_dict(apply_adapter(tiny(), AdapterConfig(kind="mona")), sd, cfg)
    wrong = apply_adapter(tiny(), AdapterConfig(kind="mona", bottleneck=16,
                                                placement="attn_and_mlp"))
    with pytest.raises(ValueError, match="placement=after_block but the model has placement="
                                         "attn_and_mlp"):
        load_adapter_state_dict(wrong, sd, cfg)


# ----------------------------------------------------------------------------- ViT-B/16 counts
BASE = 86_192_640  # ViT-B/16 vision tower (its closed form is in test_lora.py)


@pytest.mark.parametrize("bottleneck, placement", [(64, "after_block"), (64, "attn_and_mlp"),
                                                   (32, "after_block")])
def test_vit_b16_mona_counts(bottleneck, placement):
    D, L, m = 768, 12, bottleneck
    # One Mona: LayerNorm 2D + gamma D + gammax D + project1 (D m + m)
    #   + depthwise 3x3, 5x5, 7x7 ((9 + 25 + 49) m + 3 m) + 1x1 conv (m m + m) + project2 (m D + D)
    per_mona = 2 * D + D + D + (D * m + m) + (83 * m + 3 * m) + (m * m + m) + (m * D + D)
    assert per_mona == 5 * D + 2 * D * m + m * m + 88 * m
    n = L * (2 if placement == "attn_and_mlp" else 1)
    with torch.device("meta"):
        visual = build_model(config="ViT-B/16").visual
    apply_adapter(visual, AdapterConfig(kind="mona", bottleneck=m, placement=placement))
    assert count_parameters(visual) == (n * per_mona, BASE + n * per_mona)
    if (m, placement) == (64, "after_block"):
        assert n * per_mona == 1_342_464
