"""Tests for clip_us/baselines/dinov2_heads.py: the official DINOv2 decoder and linear head,
against a literal re-implementation of the official forward and against timm's DINOv2
intermediate layers."""
import pytest
import timm
import torch
from torch import nn
from torchvision import transforms

from clip_us.baselines import backbones
from clip_us.baselines.dinov2_heads import DINOv2ClsHead, DINOv2SegHead, last_blocks


class _OfficialUp(nn.Module):
    """The official up-block as written there: nn.Upsample by a scale factor from the sizes."""

    def __init__(self, cin, cout, embed):
        super().__init__()
        self.upconv = nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2)
        self.conv = nn.Sequential(nn.Conv2d(cout * 2, cout, 3, padding=1), nn.BatchNorm2d(cout),
                                  nn.ReLU(inplace=True))
        self.skip_conv = nn.Sequential(nn.Conv2d(embed, cout, 3, padding=1), nn.BatchNorm2d(cout),
                                       nn.ReLU(inplace=True))

    def forward(self, x1, x2):
        x1 = self.upconv(x1)
        x2 = self.skip_conv(x2)
        x2 = nn.Upsample(scale_factor=x1.size()[2] / x2.size()[2], mode="bilinear",
                         align_corners=True)(x2)
        return self.conv(torch.concat([x1, x2], dim=1))


def _official_seg(head_sd, pairs, embed, classes, image_size, patch):
    """[(patch_tokens, cls_token)] x 5 from get_intermediate_layers -> the official logits."""
    ups = nn.ModuleDict({f"up{i + 1}": _OfficialUp(c_in, c_out, embed) for i, (c_in, c_out) in
                         enumerate([(embed, embed // 2), (embed // 2, embed // 4),
                                    (embed // 4, embed // 8), (embed // 8, classes)])})
    ups.load_state_dict(head_sd)
    ups.eval()
    h = w = image_size // patch
    maps = [p.reshape(-1, h, w, embed).permute(0, 3, 1, 2) for p, _ in pairs]
    x = ups["up1"](maps[4], maps[3])
    x = ups["up2"](x, maps[2])
    x = ups["up3"](x, maps[1])
    x = ups["up4"](x, maps[0])
    return transforms.Resize((image_size, image_size),
                             interpolation=transforms.InterpolationMode.BICUBIC)(x)


def _randomise_bn(module):
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, 0.1)
                m.bias.normal_(0, 0.1)


def _tokens(B, grid, width, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 1 + grid * grid, width, generator=g) for _ in range(n)]


def test_seg_head_equals_the_official_forward_at_518():
    torch.manual_seed(0)
    width, grid = 32, 37                                   # 518 px / patch 14 = 37
    head = DINOv2SegHead(width, num_classes=2).eval()
    _randomise_bn(head)
    feats = _tokens(2, grid, width, 5)
    with torch.no_grad():
        got = head(feats, (grid, grid), (518, 518))
        want = _official_seg(head.state_dict(), [(f[:, 1:], f[:, 0]) for f in feats], width, 2,
                             518, 14)
    assert got.shape == (2, 2, 518, 518)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_seg_head_channels_and_non_negative_logits():
    head = DINOv2SegHead(768, num_classes=2)
    ups = [head.up1, head.up2, head.up3, head.up4]
    assert [(u.upconv.in_channels, u.upconv.out_channels) for u in ups] == [
        (768, 384), (384, 192), (192, 96), (96, 2)]
    assert all(u.skip_conv[0].in_channels == 768 for u in ups)
    small = DINOv2SegHead(16, num_classes=2).eval()
    out = small(_tokens(1, 4, 16, 5), (4, 4), (56, 56))
    assert out.shape == (1, 2, 56, 56)
    # The official decoder ends in ReLU: before the (bicubic) resize every logit is >= 0.
    raw = small.up4(torch.randn(1, 2, 32, 32), torch.randn(1, 16, 4, 4))
    assert (raw >= 0).all()


def test_seg_head_uses_every_block_in_its_place():
    """Changing any one block changes the output; the deepest one is the input (no skip_conv)."""
    torch.manual_seed(0)
    head = DINOv2SegHead(16).eval()
    feats = _tokens(1, 4, 16, 5)
    base = head(feats, (4, 4), (64, 64))
    for i in range(5):
        changed = [f + (1.0 if j == i else 0.0) for j, f in enumerate(feats)]
        assert not torch.allclose(head(changed, (4, 4), (64, 64)), base)
    with pytest.raises(ValueError, match="last 5 blocks"):
        head(feats[:4], (4, 4), (64, 64))
    with pytest.raises(ValueError, match="3x3 grid"):
        head(feats, (3, 3), (64, 64))


def test_cls_head_concatenation_and_init():
    torch.manual_seed(0)
    head = DINOv2ClsHead(768, num_classes=2)
    assert head.linear.in_features == 5 * 768 and torch.equal(head.linear.bias, torch.zeros(2))
    assert 0.008 < head.linear.weight.std().item() < 0.012
    small = DINOv2ClsHead(8, num_classes=3)
    feats = _tokens(2, 3, 8, 4)
    x = torch.cat([feats[0][:, 0], feats[1][:, 0], feats[2][:, 0], feats[3][:, 0],
                   feats[3][:, 1:].mean(1)], dim=1)
    torch.testing.assert_close(small(feats), small.linear(x))
    with pytest.raises(ValueError, match="last 4 blocks"):
        small(feats + feats[:1])


def test_last_blocks():
    assert last_blocks(12, 5) == (7, 8, 9, 10, 11) and last_blocks(12, 4) == (8, 9, 10, 11)
    with pytest.raises(ValueError, match="last 13 blocks"):
        last_blocks(12, 13)


def test_heads_on_our_dinov2_tower_match_timm_intermediate_layers(tmp_path):
    """timm's DINOv2 (layer-scale) with random weights, loaded by backbones.build in Meta's keys:
    both heads give the official outputs computed from timm's get_intermediate_layers(norm=True)."""
    torch.manual_seed(0)
    size, width = 70, 64                                   # 5 x 5 patches of 14
    ref = timm.create_model("vit_base_patch14_dinov2", pretrained=False, img_size=size,
                            embed_dim=width, depth=12, num_heads=2, init_values=0.5).eval()
    torch.save(ref.state_dict(), tmp_path / "dinov2_vitb14_pretrain.pth")
    tower = backbones.build("dinov2", weights=str(tmp_path / "dinov2_vitb14_pretrain.pth"), heads=2)
    x = torch.randn(2, 3, size, size)
    seg, cls = DINOv2SegHead(width).eval(), DINOv2ClsHead(width)
    _randomise_bn(seg)
    with torch.no_grad():
        pairs = ref.get_intermediate_layers(x, n=5, return_prefix_tokens=True, norm=True)
        _, feats = tower(x, return_blocks=last_blocks(12, 5), pool=False, norm=True)
        got = seg(feats, (5, 5), (size, size))
        want = _official_seg(seg.state_dict(), pairs, width, 2, size, 14)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        want_cls = cls.linear(torch.cat([c[:, 0] for _, c in pairs[1:]] + [pairs[4][0].mean(1)], 1))
        torch.testing.assert_close(cls(feats[1:]), want_cls, atol=1e-5, rtol=1e-5)


def test_task_model_on_the_tiny_dinov2_tower():
    from clip_us.baselines.dinov2_heads import DINOv2TaskModel
    tower = backbones.build("dinov2", weights="none", arch="tiny")
    seg = DINOv2TaskModel(tower, DINOv2SegHead(tower.width, 2))
    assert seg.blocks == (7, 8, 9, 10, 11)
    x = torch.randn(2, 3, 70, 70)
    assert seg(x).shape == (2, 2, 70, 70)
    cls = DINOv2TaskModel(backbones.build("dinov2", weights="none", arch="tiny"),
                          DINOv2ClsHead(64, 3))
    assert cls.blocks == (8, 9, 10, 11) and cls(x).shape == (2, 3)
    for model in (seg, cls):
        assert {k.split(".")[0] for k, p in model.named_parameters() if p.requires_grad} == {"head"}
    seg(x).sum().backward()
    assert all(p.grad is not None for p in seg.head.parameters())
