"""Tests for clip_us/baselines/rows.py and its wiring: `--backbone unet|clipseg|dinov2` builds the module it
names, each row trains, the flags of these rows are refused where they would do nothing, and the
scripts run them end to end on the phantom (train, --eval-only; train_cls.py for DINOv2)."""
import json
from dataclasses import replace

import pytest
import torch

from clip_us import adapters
from clip_us.adapters import AdapterConfig
from clip_us.baselines import clipseg
from clip_us.baselines.backbones import IMAGENET_MEAN, IMAGENET_STD
from clip_us.baselines.dinov2_heads import DINOv2ClsHead, DINOv2SegHead, DINOv2TaskModel
from clip_us.baselines.unet import UNet
from clip_us.config import SupervisedConfig
from clip_us.losses import dice_ce_loss
from clip_us.taskmodel import make_task_model, model_spec
from clip_us.transform import CLIP_MEAN, CLIP_STD

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _cfg(backbone, **kw):
    base = SupervisedConfig(backbone=backbone, arch="tiny", weights="none", adapter="none",
                            image_size=64)
    if backbone == "clipseg":
        base = replace(base, clipseg_weights="none")  # no published decoder in the tests
    return replace(base, **kw)


def _build(cfg, task="seg"):
    return make_task_model(model_spec(cfg, AdapterConfig(kind=cfg.adapter)), task, {},
                           torch.device("cpu"), seed=1)


def _fits(model, x, target, loss_fn, steps=6, lr=3e-3):
    """A few AdamW steps on one batch lower the loss: the trainable part is wired to the output."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[-1] < losses[0]


@pytest.mark.parametrize("backbone,size,kind", [("unet", 64, UNet),
                                                ("clipseg", 64, clipseg.CLIPSegTaskModel),
                                                ("dinov2", 70, DINOv2TaskModel)])
def test_flag_builds_the_named_module_which_trains(backbone, size, kind):
    torch.manual_seed(0)
    model = _build(_cfg(backbone, image_size=size))
    assert type(model) is kind
    x, mask = torch.randn(2, 3, size, size), torch.zeros(2, 1, size, size, dtype=torch.long)
    mask[:, :, size // 4: size // 2, size // 4: size // 2] = 1
    assert model(x).shape == (2, 2, size, size)
    assert _fits(model, x, mask, dice_ce_loss)
    tensors = adapters.checkpoint_tensors(model)
    if backbone == "unet":   # from scratch: every weight trains, so the backbone is saved
        assert "encoder.in_conv.conv_conv.0.weight" in tensors["model_state_dict"]
        assert tensors["head_state_dict"] == {}
    else:                    # frozen CLIP / DINOv2: only the decoder or head is saved
        assert "model_state_dict" not in tensors
        key = "film_mul.weight" if backbone == "clipseg" else "up4.conv.1.running_mean"
        assert key in tensors["head_state_dict"]


def test_dinov2_classification_head():
    torch.manual_seed(0)
    model = _build(_cfg("dinov2", image_size=70), task="cls")
    assert isinstance(model.head, DINOv2ClsHead) and model.blocks == (8, 9, 10, 11)
    x, y = torch.randn(4, 3, 70, 70), torch.tensor([0, 1, 0, 1])
    # Random tiny-ViT features share one large direction: a small step, or Adam oscillates on it.
    assert _fits(model, x, y, torch.nn.functional.cross_entropy, lr=3e-4)
    seg = _build(_cfg("dinov2", image_size=70, dinov2_official=True))
    assert isinstance(seg.head, DINOv2SegHead)
    assert not any("ls_1" in k for k in seg.state_dict())      # built without layer-scale
    assert any("ls_1" in k for k in _build(_cfg("dinov2", image_size=70)).state_dict())
    # CLIP-normalised input is mapped to DINOv2's ImageNet mean/std; --no-clip-norm's [0, 1] is not.
    x = torch.rand(1, 3, 70, 70)
    clip_normed = (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    imagenet = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(seg.norm(clip_normed), imagenet, atol=1e-5, rtol=1e-5)
    assert _build(_cfg("dinov2", image_size=70, clip_norm=False)).norm is None


@pytest.mark.parametrize("cfg,task,match", [
    (_cfg("unet"), "cls", "segmentation row"),
    (_cfg("clipseg"), "cls", "segmentation row"),
    (_cfg("unet", adapter="mona"), "seg", "--adapter none"),
    (_cfg("dinov2", init="x.pt"), "seg", "no --init"),
    (_cfg("unet", image_size=72), "seg", "divisible by 16"),
    (_cfg("clip", dinov2_official=True), "seg", "--dinov2-official do"),
    (_cfg("clip", head="proposed"), "seg", "--head proposed do"),
    (_cfg("unet", prompt="words"), "seg", "--prompt do"),
    (_cfg("dinov2", clipseg_weights="some/folder"), "seg", "--clipseg-weights do"),
    (_cfg("resnet9"), "seg", "cannot be built"),
])
def test_refusals(cfg, task, match):
    with pytest.raises(ValueError, match=match):
        _build(cfg, task)


def test_clipseg_weights_default_names_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIP_US_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="clipseg-rd64-refined"):
        _build(_cfg("clipseg", clipseg_weights="default"))


# ----------------------------------------------------------------------------- the scripts
SMALL = ["--arch", "tiny", "--weights", "none", "--adapter", "none", "--phantom-n", "24",
         "--phantom-size", "128", "--workers", "0", "--seeds", "1", "--batch-size", "8",
         "--eval-every", "1", "--epochs", "1", "--n-figures", "2"]


@pytest.mark.parametrize("backbone,extra,row", [
    ("unet", ["--image-size", "64"], "UNet"),
    ("clipseg", ["--image-size", "64", "--clipseg-weights", "none"], "CLIPSeg"),
    ("dinov2", ["--image-size", "70", "--dinov2-official"], "DINOv2")])
def test_train_seg_then_eval_only(backbone, extra, row, tmp_path, run_script):
    env = {"CLIP_US_CACHE": str(tmp_path / "cache")}
    out, ev = tmp_path / "train", tmp_path / "eval"
    run_script("train_seg.py", SMALL + extra + ["--backbone", backbone, "--out-dir", out], env)
    res = json.loads((out / "results.json").read_text())
    assert res["backbone"] == backbone and res["row"] == row  # the table row, as the paper spells it
    assert res["config"]["image_size"] == int(extra[1])
    ckpt = torch.load(out / "seed1" / "best.pt", weights_only=True)
    assert ("model_state_dict" in ckpt) == (backbone == "unet")
    run_script("train_seg.py", ["--eval-only", "--checkpoint", out / "seed1" / "best.pt", "--phantom-n", "24",
                         "--phantom-size", "128", "--workers", "0", "--out-dir", ev], env)
    again = json.loads((ev / "results.json").read_text())
    assert again["backbone"] == backbone and again["config"]["eval_only"]
    assert 0 <= again["metrics"]["dice"]["mean"] <= 1


def test_train_cls_dinov2(tmp_path, run_script):
    out = tmp_path / "cls"
    run_script("train_cls.py", SMALL + ["--backbone", "dinov2", "--image-size", "70", "--out-dir", out],
        {"CLIP_US_CACHE": str(tmp_path / "cache")})
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "cls" and res["backbone"] == "dinov2" and "acc" in res["metrics"]
