"""Mona (clip_us/mona.py): CLS bypass, identity with a zeroed up-projection, grid layout on
non-square grids, placements, vision-only, freezing, checkpoints and ViT-B/16 parameter counts;
the four official variants against the official classes, and official files of each variant."""
import pytest
import torch
import torch.nn as nn

from clip_us.adapters import (
    AdapterConfig,
    MonaBlock,
    adapter_config_of,
    adapter_state_dict,
    add_mona,
    apply_adapter,
    convert_official_mona,
    count_parameters,
    load_adapter,
    load_adapter_state_dict,
)
from clip_us.model import build_model
from clip_us.mona import VARIANTS, Mona


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


@pytest.mark.parametrize("bottleneck, placement, variant", [
    (64, "after_block", "baseline"), (64, "attn_and_mlp", "baseline"), (32, "after_block", "baseline"),
    (64, "after_block", "noise_aware"), (64, "after_block", "freq_enhanced"), (64, "after_block", "hybrid")])
def test_vit_b16_mona_counts(bottleneck, placement, variant):
    D, L, m = 768, 12, bottleneck
    # One Mona: LayerNorm 2D + gamma D + gammax D + project1 (D m + m)
    #   + depthwise 3x3, 5x5, 7x7 ((9 + 25 + 49) m + 3 m) + 1x1 conv (m m + m) + project2 (m D + D)
    per_mona = 2 * D + D + D + (D * m + m) + (83 * m + 3 * m) + (m * m + m) + (m * D + D)
    assert per_mona == 5 * D + 2 * D * m + m * m + 88 * m
    # noise_estimator: 1x1 conv m -> m/4 and m/4 -> 3 scales; freq_filter: one number a channel
    per_mona += {"baseline": 0, "noise_aware": (m * m // 4 + m // 4) + (3 * m // 4 + 3),
                 "freq_enhanced": m, "hybrid": (m * m // 4 + m // 4) + (3 * m // 4 + 3) + m}[variant]
    n = L * (2 if placement == "attn_and_mlp" else 1)
    with torch.device("meta"):
        visual = build_model(config="ViT-B/16").visual
    apply_adapter(visual, AdapterConfig(kind="mona", bottleneck=m, placement=placement,
                                        mona_variant=variant))
    assert count_parameters(visual) == (n * per_mona, BASE + n * per_mona)
    if (m, placement, variant) == (64, "after_block", "baseline"):
        assert n * per_mona == 1_342_464


# ----------------------------------------------------------------------------- the official variants
# The official classes (jinggqu/NextGen-UIA src/adapters/mona.py), re-implemented as written there:
# sequence-first [N, B, D] in and out, the frequency filter through rfft2/irfft2, the noise
# estimator on the (filtered) map, the identity the unfiltered map. Only the `hw_shapes` branch,
# the one inject_mona_variant_to_clip uses. Our Mona must equal them on the same weights.
class BaselineMonaOp(nn.Module):
    def __init__(self, in_features):
        super().__init__()
        self.conv1 = nn.Conv2d(in_features, in_features, 3, padding=1, groups=in_features)
        self.conv2 = nn.Conv2d(in_features, in_features, 5, padding=2, groups=in_features)
        self.conv3 = nn.Conv2d(in_features, in_features, 7, padding=3, groups=in_features)
        self.projector = nn.Conv2d(in_features, in_features, 1)

    def finish(self, x):
        return x + self.projector(x)

    def forward(self, x):
        return self.finish((self.conv1(x) + self.conv2(x) + self.conv3(x)) / 3.0 + x)


class NoiseAwareMonaOp(BaselineMonaOp):
    def __init__(self, in_features):
        super().__init__(in_features)
        self.noise_estimator = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_features, in_features // 4, 1), nn.ReLU(inplace=True),
            nn.Conv2d(in_features // 4, 3, 1), nn.Softmax(dim=1))

    def weighted(self, x, identity):
        w = self.noise_estimator(x)  # (B, 3, 1, 1)
        mixed = self.conv1(x) * w[:, 0:1] + self.conv2(x) * w[:, 1:2] + self.conv3(x) * w[:, 2:3]
        return self.finish(mixed + identity)

    def forward(self, x):
        return self.weighted(x, x)


def fft_filter(x, freq_filter):
    _, _, h, w = x.shape
    return torch.fft.irfft2(torch.fft.rfft2(x, dim=(-2, -1)) * freq_filter.view(1, -1, 1, 1),
                            s=(h, w), dim=(-2, -1))


class FreqEnhancedMonaOp(BaselineMonaOp):
    def __init__(self, in_features):
        super().__init__(in_features)
        self.freq_filter = nn.Parameter(torch.ones(in_features))

    def forward(self, x):
        f = fft_filter(x, self.freq_filter)
        return self.finish((self.conv1(f) + self.conv2(f) + self.conv3(f)) / 3.0 + x)


class HybridNoiseFreqMonaOp(NoiseAwareMonaOp):
    def __init__(self, in_features):
        super().__init__(in_features)
        self.freq_filter = nn.Parameter(torch.ones(in_features))

    def forward(self, x):
        return self.weighted(fft_filter(x, self.freq_filter), x)


class BaselineMona(nn.Module):
    Op = BaselineMonaOp

    def __init__(self, in_dim, bottleneck_dim=64):
        super().__init__()
        self.project1 = nn.Linear(in_dim, bottleneck_dim)
        self.project2 = nn.Linear(bottleneck_dim, in_dim)
        self.dropout = nn.Dropout(p=0.1)
        self.adapter_conv = self.Op(bottleneck_dim)
        self.norm = nn.LayerNorm(in_dim)
        self.gamma = nn.Parameter(torch.ones(in_dim) * 1e-6)
        self.gammax = nn.Parameter(torch.ones(in_dim))

    def forward(self, x, hw_shapes):
        x = x.permute(1, 0, 2)  # [N, B, D] -> [B, N, D]
        identity = x
        x = self.project1(self.norm(x) * self.gamma + x * self.gammax)
        b, n, c = x.shape
        h, w = hw_shapes
        spatial = self.adapter_conv(x[:, 1:].reshape(b, h, w, c).permute(0, 3, 1, 2))
        x = torch.cat([x[:, 0:1], spatial.permute(0, 2, 3, 1).reshape(b, h * w, c)], dim=1)
        x = self.project2(self.dropout(torch.nn.functional.gelu(x)))
        return (identity + x).permute(1, 0, 2)  # [B, N, D] -> [N, B, D]


class NoiseAwareMona(BaselineMona):
    Op = NoiseAwareMonaOp


class FreqEnhancedMona(BaselineMona):
    Op = FreqEnhancedMonaOp


class HybridNoiseFreqMona(BaselineMona):
    Op = HybridNoiseFreqMonaOp


OFFICIAL = {"baseline": BaselineMona, "noise_aware": NoiseAwareMona,
            "freq_enhanced": FreqEnhancedMona, "hybrid": HybridNoiseFreqMona}


def official(variant, width=16, bottleneck=8, seed=2):
    """An official Mona with every weight random (gamma and freq_filter included)."""
    torch.manual_seed(seed)
    m = OFFICIAL[variant](width, bottleneck)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(0.5 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (6, 2)])
def test_each_variant_equals_the_official_class(variant, grid):
    # float64, so that the FFT's rounding does not hide a difference of computation
    ref = official(variant).double()
    ours = Mona(16, 8, variant=variant).double()
    ours.load_state_dict(ref.state_dict())  # strict: the official parameter names
    for train in (False, True):  # train: the same dropout draw on the same [B, N, c] shape
        ref.train(train), ours.train(train)
        x = tokens(grid).double().requires_grad_()
        torch.manual_seed(5)
        y = ours(x, grid)
        x_ref = x.detach().clone().requires_grad_()
        torch.manual_seed(5)
        want = ref(x_ref.transpose(0, 1), grid).transpose(0, 1)
        torch.testing.assert_close(y, want)
    y.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():  # every weight learns, as the official one does
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, ref_grads[name].grad)


def test_default_variant_is_the_baseline_and_bad_variants_are_refused():
    assert Mona(16, 8).variant == "baseline"
    assert set(Mona(16, 8).state_dict()) == set(BaselineMona(16, 8).state_dict())
    with pytest.raises(ValueError, match="variant must be one of"):
        Mona(16, 8, variant="fractional")  # in the official choices, but no class builds it
    with pytest.raises(ValueError, match="bottleneck >= 4"):
        Mona(16, 2, variant="noise_aware")
    with pytest.raises(ValueError, match="variant must be one of"):
        apply_adapter(tiny(), AdapterConfig(kind="mona", mona_variant="noisy"))


class Injected(nn.Module):
    """The official injection: a block's own forward, then its Mona (sequence-first)."""

    def __init__(self, block, mona):
        super().__init__()
        self.block, self.mona = block, mona

    def forward(self, x, causal=False, grid=None):
        return self.mona(self.block(x, grid=grid).transpose(0, 1), grid).transpose(0, 1)


def official_model(variant, bottleneck=16):
    """(an official CLIP with `variant` Mona, its best_model.pth dict) on the tiny CLIP."""
    model = tiny().eval()
    blocks = model.visual.transformer.resblocks
    monas = [official(variant, width=64, bottleneck=bottleneck, seed=i) for i in range(len(blocks))]
    for i, mona in enumerate(monas):
        blocks[i] = Injected(blocks[i], mona.eval())
    sd = {f"visual.transformer.resblocks.{i}.mona.{k}": v.clone()
          for i, mona in enumerate(monas) for k, v in mona.state_dict().items()}
    return model, sd


@pytest.mark.parametrize("variant", VARIANTS)
def test_official_file_of_each_variant_loads_and_gives_the_official_outputs(variant, tmp_path):
    ref, sd = official_model(variant)
    assert convert_official_mona(sd)[0]["mona_variant"] == variant  # told from the keys alone
    torch.save(sd, tmp_path / "best_model.pth")
    ours = load_adapter(tiny(), tmp_path / "best_model.pth").eval()  # builds the variant
    cfg = adapter_config_of(ours)
    assert (cfg.mona_variant, cfg.bottleneck, cfg.placement) == (variant, 16, "after_block")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(x), ref.encode_image(x))
    # Our checkpoint records the variant; a model with another variant refuses it.
    other = VARIANTS[(VARIANTS.index(variant) + 1) % len(VARIANTS)]
    wrong = apply_adapter(tiny(), AdapterConfig(kind="mona", bottleneck=16, mona_variant=other))
    with pytest.raises(ValueError, match=f"mona_variant={variant} but the model has "
                                         f"mona_variant={other}"):
        load_adapter_state_dict(wrong, adapter_state_dict(ours), vars(cfg))


def test_official_files_that_fit_no_variant_are_refused():
    _, noise = official_model("noise_aware", bottleneck=8)
    _, base = official_model("baseline", bottleneck=8)
    mixed = {**base, **{k: v for k, v in noise.items() if ".resblocks.5." in k}}
    with pytest.raises(ValueError, match="different variants .*5: 'noise_aware'"):
        convert_official_mona(mixed)
    partial = {k: v for k, v in noise.items() if not k.endswith("noise_estimator.3.bias")}
    with pytest.raises(ValueError, match="block 0 .*noise_aware Mona.*lacks 1 of its keys "
                                         ".*resblocks.0.mona.adapter_conv.noise_estimator.3.bias"):
        convert_official_mona(partial)
    odd = {**base, "visual.transformer.resblocks.2.mona.adapter_conv.fractional": torch.ones(8)}
    with pytest.raises(ValueError, match="block 2 .*1 keys no variant has .*conv.fractional"):
        convert_official_mona(odd)
