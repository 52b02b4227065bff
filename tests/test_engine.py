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


class Toy(nn.Module):
    """The smallest task model fit() accepts: a `head` and a forward."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(2, 2)

    def forward(self, x):
        return self.head(x)


@dataclass
class FitCfg:
    epochs: int = 7
    eval_every: int = 2
    patience: int = 2
    lr: float = 1e-3
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    amp: bool = False
    resume: bool = False
    seed_now: int = 1


def toy_fit(tmp_path, cfg, scores):
    from torch.utils.data import DataLoader, DistributedSampler
    data = [{"image": torch.randn(2), "label": i % 2} for i in range(8)]
    loader = DataLoader(data, batch_size=4, sampler=DistributedSampler(data, 1, 0, seed=1))
    calls, records = [], []

    def evaluate(model):
        calls.append(len(calls))
        return scores[len(calls) - 1], {"score": scores[len(calls) - 1]}
    state = engine.fit(Toy(), loader, evaluate, nn.functional.cross_entropy, cfg, tmp_path,
                       {"backbone_trained": False}, lambda **r: records.append(r),
                       torch.device("cpu"), True, "label")
    return state, records


def test_fit_validates_every_n_and_the_last_epoch_and_stops_early(tmp_path):
    # Validations at epochs 2, 4, 6, 7; the best is at 2; after 2 worse ones it stops.
    state, records = toy_fit(tmp_path, FitCfg(), [0.5, 0.4, 0.3, 0.9])
    assert [r["epoch"] for r in records if "val" in r] == [2, 4, 6]
    assert state["best_epoch"] == 2 and state["bad"] == 2
    assert engine.load_checkpoint(tmp_path / "best.pt")["epoch"] == 2
    assert engine.load_checkpoint(tmp_path / "last.pt")["epoch"] == 6


def test_fit_short_run_still_validates_its_last_epoch(tmp_path):
    state, records = toy_fit(tmp_path, FitCfg(epochs=3, eval_every=10), [float("nan")])
    assert [r["epoch"] for r in records if "val" in r] == [3]
    assert state["best_epoch"] == 3  # a NaN score (no finite metric) still yields a best.pt


def test_summarize_seeds_without_finite_values():
    s = engine.summarize_seeds([{"hd95": None}, {"hd95": 4.0}], ["hd95"])
    assert s["hd95"]["mean"] == 4.0 and s["hd95"]["per_seed"] == [None, 4.0]
    assert engine.summarize_seeds([{"hd95": None}], ["hd95"])["hd95"]["mean"] is None
