"""The training loop and its pieces: config CLI, schedule, weight-decay groups, atomic checkpoints,
RNG round trip, validation cadence, early stopping, best by max/min, non-finite batches, resume,
and which tensors a checkpoint holds."""
import os
import random
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from clip_us import loop
from clip_us.config import parse_config
from clip_us.fileio import load_checkpoint, save_checkpoint
from clip_us.loop import rng_state, seed_everything, set_rng_state
from clip_us.runs import row_name, summarize_seeds


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
    cfg = parse_config(Cfg, ["--lr", "3e-4", "--no-amp", "--seeds", "7", "8", "--mode", "b"])
    assert cfg == Cfg(lr=3e-4, amp=False, seeds=[7, 8], mode="b")
    with pytest.raises(SystemExit):
        parse_config(Cfg, ["--mode", "c"])
    with pytest.raises(SystemExit):
        parse_config(Cfg, ["--hidden", "1"])


def test_settings_take_the_config_fields_they_know():
    s = loop.Settings.of(Cfg(lr=3e-4, epochs=9), best="min")
    assert (s.lr, s.epochs, s.best, s.amp) == (3e-4, 9, "min", True)
    with pytest.raises(ValueError, match="schedule"):
        loop.Settings(schedule="step")


def test_cosine_schedule_matches_torch_cosine_annealing():
    p = nn.Parameter(torch.zeros(1))
    a, b = torch.optim.AdamW([p], lr=1e-3), torch.optim.AdamW([p], lr=1e-3)
    ours = loop.cosine_schedule(a, total_steps=50, min_lr=1e-8)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(b, T_max=50, eta_min=1e-8)
    for _ in range(50):
        a.step(), b.step(), ours.step(), ref.step()
        assert ours.get_last_lr()[0] == pytest.approx(ref.get_last_lr()[0], rel=1e-6, abs=1e-12)


def decay_toy():
    m = nn.Module()
    m.fc = nn.Linear(4, 4)
    m.ln_1 = nn.LayerNorm(4)
    m.token_embedding = nn.Embedding(10, 4)
    m.frozen = nn.Linear(4, 4).requires_grad_(False)
    return m


def test_weight_decay_on_every_trainable_parameter_or_matrices_only():
    on, off = loop.param_groups(decay_toy(), 0.01, "all")
    assert len(on["params"]) == 5 and not off["params"]  # frozen ones are left out
    on, off = loop.param_groups(decay_toy(), 0.01, "matrices")
    assert [p.shape for p in on["params"]] == [torch.Size([4, 4])]
    assert len(off["params"]) == 4  # fc.bias, ln_1.weight/bias, token_embedding.weight
    with pytest.raises(ValueError, match="no trainable"):
        loop.build_optimizer(nn.Linear(2, 2).requires_grad_(False), loop.Settings())


def test_checkpoint_is_atomic_and_roundtrips(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"a": torch.arange(3)})

    def boom(*a, **k):
        raise RuntimeError("killed")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError):
        save_checkpoint(path, {"a": torch.arange(5)})
    monkeypatch.undo()
    assert load_checkpoint(path)["a"].tolist() == [0, 1, 2]  # old file intact
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"]  # no temporary left behind
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_rng_state_roundtrip_through_weights_only_checkpoint(tmp_path):
    seed_everything(3)
    save_checkpoint(tmp_path / "r.pt", {"rng": rng_state()})
    first = (torch.rand(2), np.random.rand(), random.random())
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    again = (torch.rand(2), np.random.rand(), random.random())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


def test_row_names():
    assert row_name("clip", "mona", True) == "CLIP (Mona, ft.)"
    assert row_name("clip", "none", False) == "CLIP (vanilla)"
    assert row_name("clip", "lora", False) == "CLIP (LoRA)"


def test_summarize_seeds():
    s = summarize_seeds([{"dice": 0.5}, {"dice": 0.7}], ["dice"])
    assert s["dice"]["mean"] == pytest.approx(0.6) and s["dice"]["per_seed"] == [0.5, 0.7]
    assert s["dice"]["std"] == pytest.approx(0.1)


def test_summarize_seeds_without_finite_values():
    s = summarize_seeds([{"hd95": None}, {"hd95": 4.0}], ["hd95"])
    assert s["hd95"]["mean"] == 4.0 and s["hd95"]["per_seed"] == [None, 4.0]
    assert summarize_seeds([{"hd95": None}], ["hd95"])["hd95"]["mean"] is None


# ----------------------------------------------------------------------------- the loop
class Toy(nn.Module):
    """A backbone layer and a `head`, the layout a task model has."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(2, 2)
        self.head = nn.Linear(2, 2)

    def forward(self, x):
        return self.head(self.body(x))


def toy_loader():
    data = [{"image": torch.randn(2), "label": i % 2} for i in range(8)]
    return DataLoader(data, batch_size=4, sampler=DistributedSampler(data, 1, 0, seed=1))


def ce_step(batch, model):
    return nn.functional.cross_entropy(model(batch["image"]), batch["label"])


def toy_train(tmp_path, scores, step=ce_step, model=None, **settings):
    """Train a Toy whose body is frozen unless `model` says otherwise; scores feed validation."""
    if model is None:
        model = Toy()
        model.body.requires_grad_(False)
    calls, records = [], []

    def evaluate(m):
        assert m is model  # the model itself, never a wrapper or another copy
        calls.append(len(calls))
        return scores[len(calls) - 1], {"score": scores[len(calls) - 1]}
    s = loop.Settings(**{"epochs": 7, "eval_every": 2, "patience": 2, "lr": 1e-3, "amp": False,
                         **settings})
    state = loop.train(model, toy_loader(), step, evaluate, seed=1, out_dir=tmp_path, settings=s,
                       extra={"config": {"x": 1}}, log=lambda **r: records.append(r))
    return state, records


def test_validates_every_n_and_the_last_epoch_and_stops_early(tmp_path):
    # Validations at epochs 2, 4, 6, 7; the best is at 2; after 2 worse ones it stops.
    state, records = toy_train(tmp_path, [0.5, 0.4, 0.3, 0.9])
    assert [r["epoch"] for r in records if "val" in r] == [2, 4, 6]
    assert state["best_epoch"] == 2 and state["bad"] == 2
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 2
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["epoch"] == 6 and last["config"] == {"x": 1} and "optimizer" in last


def test_best_by_minimum_validation_loss(tmp_path):
    state, _ = toy_train(tmp_path, [0.5, 0.4, 0.3, 0.9], best="min", patience=9)
    assert state["best_epoch"] == 6 and state["best_score"] == 0.3


def test_short_run_still_validates_its_last_epoch(tmp_path):
    state, records = toy_train(tmp_path, [float("nan"), 0.2], epochs=3, eval_every=10)
    assert [r["epoch"] for r in records if "val" in r] == [3]
    assert state["best_epoch"] == 3  # a NaN score (no finite metric) still yields a best.pt


def test_a_finite_score_beats_an_earlier_nan(tmp_path):
    state, _ = toy_train(tmp_path, [float("nan"), 0.1, 0.05], epochs=6, eval_every=2)
    assert state["best_epoch"] == 4


def nan_every(bad_batches):
    """A loss step whose n-th call (0-based) is NaN for n in bad_batches."""
    count = [0]

    def step(batch, model):
        loss = ce_step(batch, model)
        count[0] += 1
        return loss * float("nan") if count[0] - 1 in bad_batches else loss
    return step


def test_nonfinite_loss_stops_or_skips_and_counts(tmp_path):
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        toy_train(tmp_path / "stop", [0.5] * 9, step=nan_every({3}))
    state, records = toy_train(tmp_path / "skip", [0.5] * 9, step=nan_every({3, 6}),
                               nonfinite="skip", epochs=4)
    assert state["skipped"] == 2 and records[-1]["skipped_batches"] == 2
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    with pytest.raises(FloatingPointError, match="3 batches in a row"):
        toy_train(tmp_path / "many", [0.5] * 9, step=nan_every({2, 3, 4}), nonfinite="skip",
                  max_skips=3)


def test_schedule_per_epoch_or_per_iteration(tmp_path):
    _, per_iter = toy_train(tmp_path / "i", [0.5] * 9, epochs=4, eval_every=9)
    _, per_epoch = toy_train(tmp_path / "e", [0.5] * 9, epochs=4, eval_every=9, schedule="epoch")
    # 2 batches an epoch: after epoch 1 the per-iteration cosine is 2 steps of 8 in, per-epoch 1 of 4.
    lr = [r["lr"] for r in per_iter]
    assert lr[0] == pytest.approx(1e-8 + (1e-3 - 1e-8) * 0.5 * (1 + np.cos(np.pi * 2 / 8)))
    assert [r["lr"] for r in per_epoch][0] == pytest.approx(
        1e-8 + (1e-3 - 1e-8) * 0.5 * (1 + np.cos(np.pi * 1 / 4)))
    assert per_iter[-1]["lr"] == per_epoch[-1]["lr"] == pytest.approx(1e-8)


def test_gradient_clipping_on_and_off(tmp_path, monkeypatch):
    real, norms = torch.nn.utils.clip_grad_norm_, []

    def spy(params, max_norm):
        real(params, max_norm)
        norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item())
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)

    def huge(batch, model):
        return 1e6 * ce_step(batch, model)
    toy_train(tmp_path / "off", [0.5], step=huge, epochs=1, eval_every=1, grad_clip=0.0)
    assert norms == []
    toy_train(tmp_path / "on", [0.5], step=huge, epochs=1, eval_every=1, grad_clip=1e-3)
    assert len(norms) == 2 and max(norms) == pytest.approx(1e-3, rel=1e-3)


def test_model_state_dict_only_when_backbone_weights_train(tmp_path):
    toy_train(tmp_path / "frozen", [0.5], epochs=1, eval_every=1)
    frozen = load_checkpoint(tmp_path / "frozen" / "best.pt")
    assert "model_state_dict" not in frozen and set(frozen["head_state_dict"]) == {"weight", "bias"}
    model = Toy()  # body trains too
    toy_train(tmp_path / "full", [0.5], model=model, epochs=1, eval_every=1)
    full = load_checkpoint(tmp_path / "full" / "best.pt")
    assert set(full["model_state_dict"]) == {"body.weight", "body.bias"}
    assert torch.equal(full["model_state_dict"]["body.weight"], model.body.weight)


def test_resume_continues_where_the_last_checkpoint_left(tmp_path):
    _, whole = toy_train(tmp_path / "a", [0.5] * 9, epochs=4, eval_every=9)

    def stop_after_epoch_2(**record):  # called after last.pt is written, like a kill there
        if record["epoch"] == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        toy_train_with_log(tmp_path / "b", stop_after_epoch_2)
    records = []
    toy_train_with_log(tmp_path / "b", lambda **r: records.append(r), resume=True)
    assert [r["epoch"] for r in records] == [3, 4]
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in whole[2:]], rel=1e-6)


def toy_train_with_log(out, log, resume=False):
    model = Toy()
    model.body.requires_grad_(False)
    s = loop.Settings(epochs=4, eval_every=9, patience=2, lr=1e-3, amp=False)
    loop.train(model, toy_loader(), ce_step, lambda m: (0.5, {}), seed=1, out_dir=out,
               settings=s, log=log, resume=resume)


def test_validation_epochs_as_the_official_code_counts_them():
    """--eval-at official (train_seg/train_cls's default): after epochs 11, 21, ... and the last,
    the official `(epoch > 0 and epoch % 10 == 0) or epoch == max_epoch - 1` on 0-based epochs;
    --eval-at every: 10, 20, ... and the last."""
    def at(eval_at):
        s = loop.Settings(epochs=25, eval_every=10, eval_at=eval_at)
        return [e + 1 for e in range(25) if loop.validates(e, s)]
    assert at("official") == [11, 21, 25]
    assert at("every") == [10, 20, 25]
    official = [e + 1 for e in range(25) if (e > 0 and e % 10 == 0) or e == 24]
    assert at("official") == official
    with pytest.raises(ValueError, match="eval_at"):
        loop.Settings(eval_at="sometimes")


def test_eval_at_reaches_the_loop_from_the_command_line():
    from clip_us.config import ContrastiveConfig, SupervisedConfig, parse_config
    assert loop.Settings.of(parse_config(SupervisedConfig, [])).eval_at == "official"
    assert loop.Settings.of(parse_config(SupervisedConfig, ["--eval-at", "every"])).eval_at == "every"
    assert loop.Settings.of(parse_config(ContrastiveConfig, [])).eval_at == "every"  # each epoch
