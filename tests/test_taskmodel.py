"""The model a training script builds: `--backbone` builds what it names, the one freezing rule,
and the adapter checkpoint format (`load_adapter`, heads never in adapter_state_dict)."""
import dataclasses

import pytest
import torch

import clip_us
from clip_us.adapters import AdapterConfig, adapter_config_of, checkpoint_tensors, load_task_state
from clip_us.config import SupervisedConfig
from clip_us.fileio import save_checkpoint
from clip_us.model import VisionTransformer, build_model
from clip_us.taskmodel import make_task_model, model_spec


def task_model(adapter="mona", seed=1, **kw):
    cfg = dataclasses.replace(SupervisedConfig(weights="none", arch="tiny", reduce_dim=16), **kw)
    return make_task_model(model_spec(cfg, AdapterConfig(kind=adapter)), "seg", {}, "cpu", seed=seed)


def test_backbone_clip_builds_a_clip_vision_tower_and_refuses_what_it_cannot_build():
    model = task_model()
    assert isinstance(model.visual, VisionTransformer)
    names = {n for n, _ in model.named_parameters()}
    assert "visual.conv1.weight" in names and "visual.transformer.resblocks.0.attn.in_proj_weight" in names
    with pytest.raises(ValueError, match="resnet18"):
        task_model(backbone="resnet18")


def test_freezing_rule_head_and_adapters_train_backbone_frozen():
    trainable = {n for n, p in task_model().named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("head.") or "mona" in n for n in trainable)
    assert any("mona" in n for n in trainable)
    assert not any("resblocks.10." in n for n in trainable)  # past block 9: never runs
    frozen_lora = task_model("lora", adapter_train="no")
    assert all(n.startswith("head.") for n, p in frozen_lora.named_parameters() if p.requires_grad)


def test_model_spec_holds_what_builds_the_model_and_nothing_of_the_run():
    cfg = SupervisedConfig(weights="none", arch="tiny", reduce_dim=16, adapter="lora",
                           adapter_train="yes", dataset="busi", lr=3e-4)
    spec = model_spec(cfg, AdapterConfig(kind="lora", r=4))
    assert spec.train_adapters and spec.layers == (3, 6, 9) and spec.adapter.r == 4
    assert not any(hasattr(spec, name) for name in ("lr", "dataset", "seeds", "out_dir"))
    model = make_task_model(spec, "seg", {}, "cpu", seed=1)  # the spec alone builds it
    assert any("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_checkpoint_never_puts_the_head_in_adapter_state_dict(tmp_path):
    model = task_model()
    tensors = checkpoint_tensors(model)
    assert tensors["adapter_state_dict"] and tensors["head_state_dict"]
    assert not any("head" in k for k in tensors["adapter_state_dict"])
    assert "model_state_dict" not in tensors  # the backbone is frozen
    path = tmp_path / "best.pt"
    save_checkpoint(path, {"adapter_config": {"kind": "mona"}, **tensors})
    # --init takes the adapter and nothing else: the new model's head keeps its own weights.
    other = task_model(init=str(path), seed=2)
    for k, v in tensors["adapter_state_dict"].items():
        assert torch.equal(other.state_dict()[k], v)
    assert not torch.equal(other.head.state_dict()["conv.weight"], tensors["head_state_dict"]["conv.weight"])
    restored = load_task_state(task_model(), {"adapter_config": {"kind": "mona"}, **tensors})
    assert torch.equal(restored.head.conv.weight, model.head.conv.weight)


def test_load_adapter_adds_the_adapter_to_a_plain_clip(tmp_path):
    torch.manual_seed(0)
    src = build_model(config="tiny")
    clip_us.adapters.apply_adapter(src, AdapterConfig(kind="lora", r=4))
    with torch.no_grad():
        for n, p in src.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    path = tmp_path / "lora.pt"
    save_checkpoint(path, {"adapter_config": vars(AdapterConfig(kind="lora", r=4)),
                           "adapter_state_dict": clip_us.adapters.adapter_state_dict(src)})
    torch.manual_seed(0)
    dst = clip_us.load_adapter(build_model(config="tiny"), path)
    assert adapter_config_of(dst).r == 4
    x = torch.randn(1, 3, 64, 64)
    src.eval(), dst.eval()
    assert torch.equal(dst.encode_image(x), src.encode_image(x))
    bad = tmp_path / "with_head.pt"
    save_checkpoint(bad, {"adapter_config": {"kind": "lora", "r": 4},
                          "adapter_state_dict": {**clip_us.adapters.adapter_state_dict(src),
                                                 "head.conv.weight": torch.zeros(1)}})
    with pytest.raises(ValueError, match="not adapter tensors"):
        clip_us.load_adapter(build_model(config="tiny"), bad)
