"""Heads: shapes, parameter counts, and equality with the official code's layer order."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clip_us.heads import ClsHead, FeatureReducer, SegHead, build_task_model
from clip_us.model import build_model


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(config="tiny")


def feats_for(B=2, grid=(4, 5), width=64, n=3):
    return [torch.randn(B, 1 + grid[0] * grid[1], width) for _ in range(n)]


def official_reduce(red: FeatureReducer, feats):
    """NextGen-UIA's CLIPAdapter loop, written out: deepest first, reduce, block, sum."""
    a = None
    for act, reduce, block in zip(feats[::-1], red.reduces[::-1], red.blocks[::-1]):
        r = block(reduce(act[:, 1:]))
        a = r if a is None else r + a
    return a


def test_reducer_matches_official_sum_and_shapes():
    torch.manual_seed(0)
    red = FeatureReducer(64, dim=32)
    feats = feats_for()
    out = red(feats, (4, 5))
    ref = official_reduce(red, feats).transpose(1, 2).reshape(2, 32, 4, 5)
    assert out.shape == (2, 32, 4, 5)
    torch.testing.assert_close(out, ref)


def test_reducer_concat_is_deepest_first():
    torch.manual_seed(0)
    red = FeatureReducer(64, dim=16, fuse="concat")
    feats = feats_for()
    out = red(feats, (4, 5))
    assert out.shape == (2, 48, 4, 5) and red.out_dim == 48
    first = red.blocks[2](red.reduces[2](feats[2][:, 1:])).transpose(1, 2).reshape(2, 16, 4, 5)
    torch.testing.assert_close(out[:, :16], first)


def test_seg_head_conv_before_upsample_equals_official_order():
    torch.manual_seed(0)
    head = SegHead(64, dim=32)
    feats = feats_for()
    ours = head(feats, (4, 5), (64, 80))
    x = head.reducer(feats, (4, 5))
    official = head.conv(F.interpolate(x, size=(64, 80), mode="bilinear", align_corners=False))
    assert ours.shape == (2, 2, 64, 80)
    torch.testing.assert_close(ours, official, atol=1e-5, rtol=1e-5)


def test_pool_head_equals_upsample_pool_order():
    torch.manual_seed(0)
    head = ClsHead(64, dim=32, kind="pool")
    feats = feats_for()
    ours = head(feats, (4, 5), (64, 80))
    x = F.interpolate(head.reducer(feats, (4, 5)), size=(64, 80), mode="bilinear")
    official = F.adaptive_avg_pool2d(head.conv(x), 1).flatten(1)
    torch.testing.assert_close(ours, official, atol=1e-5, rtol=1e-5)


def count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts_vit_b16_width():
    w, d, n = 768, 512, 3
    reducer = n * (w * d + d) + n * (2 * d + 2 * (d * d + d))  # Linear + (LN, Linear, Linear)
    assert count(FeatureReducer(w)) == reducer
    assert count(SegHead(w)) == reducer + d * 2 + 2
    assert count(ClsHead(w, kind="mlp")) == reducer + (d * d + d) + (d * 2 + 2)
    # The paper's head: only our assumed 1x1 conv to the classes is trainable beyond the reducer.
    assert count(ClsHead(w, kind="pool")) - reducer == 1026
    assert count(ClsHead(w, kind="linear")) - reducer == d * 2 + 2  # Linear(512, 2)


def test_linear_head_is_pool_dropout_linear():
    """The official baseline head: average pool -> Dropout(0.5) -> Linear."""
    torch.manual_seed(0)
    head = ClsHead(64, dim=32, kind="linear").eval()
    assert head.fc[0].p == 0.5 and head.fc[1].in_features == 32
    feats = feats_for()
    with torch.no_grad():
        ref = head.fc[1](head.reducer(feats, (4, 5)).mean(dim=(2, 3)))
        torch.testing.assert_close(head(feats, (4, 5), (64, 80)), ref)


def test_task_model_stops_after_deepest_block(tiny):
    model = build_task_model(tiny.visual, "seg", layers=(3, 6, 9), dim=32)
    ran = []
    for i, block in enumerate(model.visual.transformer.resblocks):
        block.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
    out = model(torch.randn(2, 3, 64, 96))
    assert out.shape == (2, 2, 64, 96)
    assert max(ran) == 9


def test_task_model_cls_shapes(tiny):
    for kind in ("mlp", "pool", "linear"):
        model = build_task_model(tiny.visual, "cls", dim=32, cls_head=kind)
        assert model(torch.randn(3, 3, 64, 64)).shape == (3, 2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="fuse"):
        FeatureReducer(64, fuse="mean")
    with pytest.raises(ValueError, match="kind"):
        ClsHead(64, kind="attention")
    red = FeatureReducer(64, dim=8)
    with pytest.raises(ValueError, match="grid"):
        red(feats_for(grid=(4, 5)), (5, 5))
