"""The baseline backbones through the training scripts: `--backbone NAME` builds the model it names
(module types and parameter names, not just the row name), the default classification head of
each, ResNet18's every-weight training and checkpoint, and short phantom runs (tiny architecture,
random weights) with --eval-only on their checkpoints."""
from __future__ import annotations

import json

import pytest
import torch

from clip_us.adapters import AdapterConfig
from clip_us.baselines import backbones
from clip_us.config import ClsConfig, SupervisedConfig
from clip_us.model import QuickGELU
from clip_us.taskmodel import make_task_model, model_spec

SMALL = ["--arch", "tiny", "--weights", "none", "--image-size", "64", "--phantom-n", "24",
         "--phantom-size", "128", "--workers", "0", "--seeds", "1", "--batch-size", "8",
         "--eval-every", "1", "--epochs", "1", "--reduce-dim", "32", "--n-figures", "1"]
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def built(backbone, task="seg", adapter="none", **kw):
    cls = ClsConfig if task == "cls" else SupervisedConfig
    cfg = cls(backbone=backbone, arch="tiny", weights="none", adapter=adapter, reduce_dim=32, **kw)
    return make_task_model(model_spec(cfg, AdapterConfig(kind=adapter)), task, {}, torch.device("cpu"),
                           seed=1)


@pytest.mark.parametrize("backbone", ["metaclip", "biomedclip", "unimedclip", "dinov2"])
def test_flag_builds_the_named_vit_and_it_trains(backbone):
    extra = {"head": "proposed"} if backbone == "dinov2" else {}
    model = built(backbone, "seg", adapter="mona", **extra)
    keys = set(model.state_dict())
    block = model.visual.transformer.resblocks[0]
    if backbone in ("metaclip", "unimedclip"):  # OpenAI's layout, QuickGELU forced
        assert isinstance(block.mlp.gelu, QuickGELU) and "visual.ln_pre.weight" in keys
    else:  # timm's layout: GELU, no ln_pre, a patch-embedding bias
        assert isinstance(block.mlp.gelu, torch.nn.GELU) and "visual.conv1.bias" in keys
        assert not any(k.startswith("visual.ln_pre") for k in keys)
    if backbone == "dinov2":  # patch 14, layer-scale, ImageNet normalisation in front
        assert model.visual.patch_size == 14 and "visual.transformer.resblocks.0.ls_1.gamma" in keys
        assert isinstance(model.norm, backbones.Renormalize)
    else:
        assert model.norm is None  # CLIP's mean/std, as the data pipeline's
    assert "visual.transformer.resblocks.0.mona2.project1.weight" in keys
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains and all(n.startswith("head.") or "mona" in n for n in trains)
    x, mask = torch.randn(2, 3, 56, 56), torch.randint(0, 2, (2, 56, 56))
    loss = torch.nn.functional.cross_entropy(model(x), mask)
    loss.backward()  # the seg path of train_seg.py, one step
    assert model.head.conv.weight.grad is not None


def test_default_cls_heads():
    for backbone, kind in (("clip", "mlp"), ("metaclip", "linear"), ("biomedclip", "linear"),
                           ("unimedclip", "linear")):
        head = built(backbone, "cls").head
        assert head.kind == kind
        if kind == "linear":  # the official baselines' head: avg pool -> Dropout(0.5) -> Linear
            assert head.fc[0].p == 0.5 and head.fc[1].out_features == 2
    assert built("biomedclip", "cls", cls_head="mlp").head.kind == "mlp"  # --cls-head overrides


def test_resnet18_trains_every_weight_and_refuses_what_it_cannot_do():
    model = built("resnet18", "cls")
    assert isinstance(model, backbones.ResNetClassifier)
    assert type(model.visual).__name__ == "ResNet" and model.head.out_features == 2
    assert all(p.requires_grad for p in model.parameters())
    assert isinstance(model.norm, backbones.Renormalize)  # ImageNet's mean/std
    with pytest.raises(ValueError, match="train_cls.py"):
        built("resnet18", "seg")
    with pytest.raises(ValueError, match="--adapter none"):
        built("resnet18", "cls", adapter="lora")


def test_renormalize_maps_clip_to_imagenet():
    raw = torch.rand(1, 3, 4, 4)
    clip = (raw - torch.tensor(backbones.CLIP_MEAN).view(1, 3, 1, 1)) / \
        torch.tensor(backbones.CLIP_STD).view(1, 3, 1, 1)
    imagenet = (raw - torch.tensor(backbones.IMAGENET_MEAN).view(1, 3, 1, 1)) / \
        torch.tensor(backbones.IMAGENET_STD).view(1, 3, 1, 1)
    norm = backbones.input_norm("dinov2", clip_norm=True)
    torch.testing.assert_close(norm(clip), imagenet)
    assert backbones.input_norm("dinov2", clip_norm=False) is None  # official [0, 1] input
    assert not list(norm.state_dict())  # no keys in checkpoints


# ----------------------------------------------------------------------------- the scripts
def eval_only(run_script, script, out, ev, cache):
    """`SCRIPT --eval-only` on the best checkpoint of the run in `out`, the phantom as its data."""
    run_script(script, ["--eval-only", "--checkpoint", out / "seed1" / "best.pt", "--phantom-n",
                        "24", "--phantom-size", "128", "--workers", "0", "--out-dir", ev], cache)


def test_train_seg_biomedclip_mona_then_eval_only(tmp_path, run_script):
    out, ev = tmp_path / "train", tmp_path / "eval"
    cache = {"CLIP_US_CACHE": tmp_path}
    run_script("train_seg.py", SMALL + ["--backbone", "biomedclip", "--adapter", "mona",
                                        "--out-dir", out], cache)
    res = json.loads((out / "results.json").read_text())
    assert res["row"] == "BiomedCLIP (Mona)" and res["backbone"] == "biomedclip"
    ckpt = torch.load(out / "seed1" / "best.pt", weights_only=True)
    assert any(".mona2." in k for k in ckpt["adapter_state_dict"])
    assert "model_state_dict" not in ckpt  # the backbone is frozen
    eval_only(run_script, "train_seg.py", out, ev, cache)
    again = json.loads((ev / "results.json").read_text())
    assert again["row"].startswith("BiomedCLIP (Mona)") and again["config"]["eval_only"]


def test_train_cls_resnet18_then_eval_only(tmp_path, run_script):
    out, ev = tmp_path / "train", tmp_path / "eval"
    cache = {"CLIP_US_CACHE": tmp_path}
    run_script("train_cls.py", SMALL + ["--backbone", "resnet18", "--adapter", "none",
                                        "--out-dir", out], cache)
    res = json.loads((out / "results.json").read_text())
    assert res["row"] == "ResNet18" and "acc" in res["metrics"]
    ckpt = torch.load(out / "seed1" / "best.pt", weights_only=True)
    assert "visual.layer4.1.conv2.weight" in ckpt["model_state_dict"]  # torchvision's names
    assert set(ckpt["head_state_dict"]) == {"weight", "bias"}
    eval_only(run_script, "train_cls.py", out, ev, cache)
    again = json.loads((ev / "results.json").read_text())
    assert again["row"].startswith("ResNet18") and "acc" in again["metrics"]


@pytest.mark.parametrize("backbone", ["metaclip", "unimedclip", "dinov2"])
def test_train_cls_runs(backbone, tmp_path, run_script):
    extra = ["--head", "proposed", "--image-size", "56"] if backbone == "dinov2" else []
    run_script("train_cls.py", SMALL + ["--backbone", backbone, "--adapter", "none", "--out-dir",
                                        tmp_path / "out"] + extra, {"CLIP_US_CACHE": tmp_path})
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["backbone"] == backbone and res["row"] == backbones.spec(backbone).row
    ckpt = torch.load(tmp_path / "out" / "seed1" / "best.pt", weights_only=True)
    head = "fc.1.weight" if backbone != "dinov2" else "mlp.0.weight"  # official / proposed head
    assert head in ckpt["head_state_dict"]


def test_backbone_choices_are_the_registered_names():
    import dataclasses

    from clip_us.baselines import rows as rowmodels
    field = {f.name: f for f in dataclasses.fields(SupervisedConfig)}["backbone"]
    assert set(field.metadata["choices"]) == set(backbones.BACKBONES) | set(rowmodels.SEG_ONLY)


def test_lora_shared_dropout_flag_builds_shared_lora():
    from types import SimpleNamespace

    from clip_us.lora import LoRAAttention
    from clip_us.runs import Run
    cfg = SupervisedConfig(adapter="lora", lora_shared_dropout=True, arch="tiny", weights="none")
    adapter_cfg = Run.adapter_config(SimpleNamespace(cfg=cfg, ckpt=None))
    assert adapter_cfg.lora_shared_dropout
    model = make_task_model(model_spec(cfg, adapter_cfg), "seg", {}, torch.device("cpu"), seed=1)
    attns = [m for m in model.modules() if isinstance(m, LoRAAttention)]
    assert attns and all(m.lora_shared_dropout for m in attns)
    with pytest.raises(ValueError, match="--adapter lora"):  # never accepted and ignored
        Run.adapter_config(SimpleNamespace(cfg=SupervisedConfig(adapter="mona",
                                                                lora_shared_dropout=True)))
