"""Tests for clip_us/baselines/unet.py: the official vendored U-Net's shape, parameter count,
dropout and errors."""
import pytest
import torch
from torch import nn

from clip_us.baselines.unet import UNet


def _block(cin, cout):
    """conv3x3 (+bias), BN (weight, bias), conv3x3 (+bias), BN: the ConvBlock's parameters."""
    return 9 * cin * cout + cout + 2 * cout + 9 * cout * cout + cout + 2 * cout


def _expected_params(in_ch, classes, ch=(16, 32, 64, 128, 256)):
    enc = _block(in_ch, ch[0]) + sum(_block(ch[i], ch[i + 1]) for i in range(4))
    # Up step i: ConvTranspose2d(ch[i+1] -> ch[i], k=2) + bias, then a block on 2*ch[i] channels.
    dec = sum(4 * ch[i + 1] * ch[i] + ch[i] + _block(2 * ch[i], ch[i]) for i in range(4))
    return enc + dec + 9 * ch[0] * classes + classes


@pytest.mark.parametrize("in_ch,classes", [(3, 2), (1, 4)])
def test_parameter_count_is_the_closed_form(in_ch, classes):
    model = UNet(in_ch, classes)
    assert sum(p.numel() for p in model.parameters()) == _expected_params(in_ch, classes)
    assert all(p.requires_grad for p in model.parameters())  # from scratch: everything trains


def test_param_count_figure():
    # 1.94 M with transposed-conv up-sampling; the bilinear + 1x1-conv variant of the same file
    # would have 3 * (256*128 + 128*64 + 64*32 + 32*16) = 130,560 fewer (the often-quoted 1.81 M).
    assert _expected_params(3, 2) == 1_944_322
    assert sum(p.numel() for p in UNet().parameters()) == 1_944_322


def test_output_shape_and_non_square_input():
    torch.manual_seed(0)
    model = UNet(3, 2).eval()
    x = torch.randn(2, 3, 64, 96)
    out = model(x)
    assert out.shape == (2, 2, 64, 96) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_dropout_per_level_and_decoder_without():
    model = UNet()
    enc = [m.p for m in model.encoder.modules() if isinstance(m, nn.Dropout)]
    dec = [m.p for m in model.decoder.modules() if isinstance(m, nn.Dropout)]
    assert enc == [0.05, 0.1, 0.2, 0.3, 0.5] and dec == [0.0] * 4
    acts = [m for m in model.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(acts) == 2 * 9 and all(a.negative_slope == 0.01 for a in acts)
    ups = [m for m in model.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [(u.in_channels, u.out_channels, u.kernel_size, u.stride) for u in ups] == [
        (256, 128, (2, 2), (2, 2)), (128, 64, (2, 2), (2, 2)), (64, 32, (2, 2), (2, 2)),
        (32, 16, (2, 2), (2, 2))]
    assert model.decoder.out_conv.kernel_size == (3, 3)


def test_official_key_names():
    keys = set(UNet().state_dict())
    assert {"encoder.in_conv.conv_conv.0.weight", "encoder.down4.maxpool_conv.1.conv_conv.5.running_mean",
            "decoder.up1.up.weight", "decoder.up4.conv.conv_conv.4.weight",
            "decoder.out_conv.bias"} <= keys


def test_skip_connection_is_used():
    """Changing only the top-level skip (not the bottleneck) changes the output: the concat is real."""
    torch.manual_seed(0)
    model = UNet().eval()
    feats = model.encoder(torch.randn(1, 3, 32, 32))
    base = model.decoder(feats)
    feats[0] = feats[0] + 1.0
    assert not torch.allclose(model.decoder(feats), base)


@pytest.mark.parametrize("shape", [(1, 3, 100, 96), (1, 3, 64, 72), (3, 64, 64)])
def test_size_not_divisible_by_16_is_a_clear_error(shape):
    with pytest.raises(ValueError, match="multiples of 16"):
        UNet()(torch.randn(*shape))
