"""Engine: config CLI, schedule, weight-decay groups, atomic checkpoints, RNG round trip."""
import os
import random
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import nn

from clip_us import engine


@dataclass
class Cfg:
    name: str = "x"
    lr: float = 1e-4
    epochs: int = 3
    amp: bool = True
    seeds: list = field(default_factory=lambda: [1, 2, 3])
    mode: str = field(default="a", metadata={"choices": ["a", "b"]})
    hidden: int = field(default=0, metadata={"cli": False})


def test_parse_config_overrides_and_types():
    cfg = engine.parse_config(Cfg, ["--lr", "3e-4", "--no-amp", "--seeds", "7", "8", "--mode", "b"])
    assert cfg == Cfg(lr=3e-4, amp=False, seeds=[7, 8], mode="b")
    with pytest.raises(SystemExit):
        engine.parse_config(Cfg, ["--mode", "c"])
    with pytest.raises(SystemExit):
        engine.parse_config(Cfg, ["--hidden", "1"])


def test_cosine_schedule_matches_torch_cosine_annealing():
    p = nn.Parameter(torch.zeros(1))
    a, b = torch.optim.AdamW([p], lr=1e-3), torch.optim.AdamW([p], lr=1e-3)
    ours = engine.cosine_schedule(a, total_steps=50, min_lr=1e-8)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(b, T_max=50, eta_min=1e-8)
    for _ in range(50):
        a.step(), b.step(), ours.step(), ref.step()
        assert ours.get_last_lr()[0] == pytest.approx(ref.get_last_lr()[0], rel=1e-6, abs=1e-12)


def test_no_weight_decay_on_norms_biases_embeddings():
    m = nn.Module()
    m.fc = nn.Linear(4, 4)
    m.ln_1 = nn.LayerNorm(4)
    m.token_embedding = nn.Embedding(10, 4)
    m.frozen = nn.Linear(4, 4).requires_grad_(False)
    decay, no_decay = engine.param_groups(m, 0.01)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 4  # fc.bias, ln_1.weight/bias, token_embedding.weight
    with pytest.raises(ValueError, match="no trainable"):
        engine.build_optimizer(nn.Linear(2, 2).requires_grad_(False))


def test_checkpoint_is_atomic_and_roundtrips(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    engine.save_checkpoint(path, {"a": torch.arange(3)})
    def boom(*a, **k):
        raise RuntimeError("killed")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError):
        engine.save_checkpoint(path, {"a": torch.arange(5)})
    monkeypatch.undo()
    assert engine.load_checkpoint(path)["a"].tolist() == [0, 1, 2]  # old file intact
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"]  # no temporary left behind
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        engine.load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        engine.load_checkpoint(tmp_path / "missing.pt")


def test_rng_state_roundtrip_through_weights_only_checkpoint(tmp_path):
    engine.seed_everything(3)
    engine.save_checkpoint(tmp_path / "r.pt", {"rng": engine.rng_state()})
    first = (torch.rand(2), np.random.rand(), random.random())
    engine.set_rng_state(engine.load_checkpoint(tmp_path / "r.pt")["rng"])
    again = (torch.rand(2), np.random.rand(), random.random())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


def test_row_names():
    assert engine.row_name("clip", "mona", True) == "CLIP (Mona, ft.)"
    assert engine.row_name("clip", "none", False) == "CLIP (vanilla)"
    assert engine.row_name("clip", "lora", False) == "CLIP (LoRA)"


def test_summarize_seeds():
    s = engine.summarize_seeds([{"dice": 0.5}, {"dice": 0.7}], ["dice"])
    assert s["dice"]["mean"] == pytest.approx(0.6) and s["dice"]["per_seed"] == [0.5, 0.7]
    assert s["dice"]["std"] == pytest.approx(0.1)
